"""Tunable behaviour of the simulator (one dataclass, every field has a default)."""

from __future__ import annotations

from dataclasses import dataclass, replace


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
    #: ``POST /speakings`` answers this long after the request (measured ~0.6 s).
    speaking_create_s: float = 0.6
    #: A say's audio starts this long after its ``/say`` at the earliest (measured 0.9-1.3 s).
    say_latency_s: float = 1.1
    #: ``/stop`` answers, and the audio falls silent, this long after the request (~0.5 s).
    stop_latency_s: float = 0.5
    #: Playback speed of CJK text (``playback_chars_per_s`` is the Latin one).
    playback_cjk_chars_per_s: float = 6.0
    #: The gateway's budget for a pod-routed request (say/flush/stop) before it answers 503.
    pod_rpc_timeout_s: float = 3.0
    #: How long the gateway's circuit breaker fails a pod's requests fast once it opened.
    pod_breaker_open_s: float = 30.0
    #: ``aws.go``: the audio Polly's stream buffers ahead of playback (64 chunks of 0.256 s);
    #: a say whose audio does not fit waits for room inside its ``/say`` request.
    aws_buffer_s: float = 64 * 4096 / 16000
    #: tts-manager replicas new speakings are spread over (round robin).
    tts_pods: int = 2
    # -- STT (stt.py)
    #: ``POST /transcribes``: the streaming start between the duplicate check and the row's
    #: insert (``start.go`` ``startLive``: its media start alone may take up to 10 s). Not
    #: measured: 0, but a request meanwhile passes the check (the server's own comment: "a true
    #: concurrent race can still slip through").
    transcribe_start_s: float = 0.0
    #: End of a caller's speech -> its final transcript (and ``speech_ended``, which the server
    #: publishes with the final: ``streaminghandler/result.go``): the median of Pipecat's STT
    #: benchmark for AWS (1.14 s), used for every provider but ``gcp``...
    stt_final_delay_s: float = 1.14
    #: ... and for Google (0.88 s).
    stt_final_delay_gcp_s: float = 0.88
    #: An utterance of several sentences arrives as up to 3 finals, at least this far apart.
    stt_split_gap_s: float = 0.5
    #: Google's stream goes silent this long after the transcribe started (measured in
    #: production; ``gcp.go`` ends the stream on its first ``Recv`` error and never reopens it).
    gcp_deaf_after_s: float = 300.0
    #: The server as it was before 2026-09 (the code snapshot): transcripts carry
    #: ``tm_transcript`` (year 1 plus the offset) instead of ``offset_ms`` (VoIPBIN PR #1318),
    #: and ``GET /transcripts`` ignores ``page_size`` and ``page_token``, always the 100 newest
    #: (``bin-api-manager/pkg/servicehandler/transcript.go`` asks for ``""``, 100; paging came
    #: with PR #1272). A client must read both servers.
    legacy_transcripts: bool = False
    # -- platform (rest/ws/auth)
    #: Time from a WebSocket ``subscribe`` until its scope's AMQP binding delivers events; events
    #: published in between are lost (``bin-api-manager/pkg/websockhandler/scoperefcount.go``).
    subscribe_bind_s: float = 0.1
    #: A second ``/auth/login`` user: an agent with the CustomerAgent permission only (no
    #: customer-admin rights), refused by every customer-scoped endpoint and topic.
    agent_username: str = "agent"
    agent_password: str = "agent"

    def scaled(self, factor: float) -> SimSettings:
        """The same behaviour with the service's latencies (TTS, STT, the gateway's budgets)
        multiplied by `factor`: what benchmarks and tests shrink, never the behaviour itself."""
        return replace(self, **{name: getattr(self, name) * factor for name in _LATENCIES})


_LATENCIES = (
    "speaking_create_s",
    "say_latency_s",
    "stop_latency_s",
    "pod_rpc_timeout_s",
    "stt_final_delay_s",
    "stt_final_delay_gcp_s",
    "stt_split_gap_s",
    "subscribe_bind_s",
)
