"""Tunable behaviour of the simulator (one dataclass, every field has a default)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SimSettings:
    """Knobs of a :class:`~agentd.sim.Simulator`.

    The defaults mirror the real service (rate limit, keepalive, queue size, 1 h call cap) and a
    human-paced caller; tests shrink the time constants.
    """

    #: TTS playback speed; ``/say`` audio takes ``len(text) / playback_chars_per_s`` seconds.
    playback_chars_per_s: float = 15.0
    #: How fast the simulated caller speaks (drives speech events and transcript timing).
    speech_words_per_s: float = 3.0
    #: Per-customer token bucket on every ``/v1.0/*`` request, including the WebSocket upgrade.
    rate_limit: bool = True
    rate_per_s: float = 17.0
    burst: int = 33
    #: Send legacy ``{"type", "data"}`` frames instead of the bare resource.
    wrapped_frames: bool = False
    #: ``POST /speakings`` answers ``initiating`` and activates after ``speaking_activate_s``.
    speaking_initiating: bool = False
    speaking_activate_s: float = 0.2
    #: WebSocket keepalive: server ping period, and the pong deadline that drops a silent client.
    ping_interval_s: float = 10.0
    pong_timeout_s: float = 60.0
    #: Per-connection outgoing frame queue; frames beyond it are silently dropped for that client.
    ws_queue_limit: int = 2000
    #: Hard cap on a call's life (hangup reason ``timeout``).
    max_call_s: float = 3600.0
    #: Credentials accepted by ``POST /auth/login``.
    username: str = "demo"
    password: str = "demo"
    #: Lifetime of a JWT from ``/auth/login`` or :meth:`Simulator.make_token`.
    token_ttl_s: float = 7 * 24 * 3600.0
    # -- TTS (tts.py)
    # -- STT (stt.py)
