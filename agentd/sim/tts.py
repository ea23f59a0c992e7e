"""Text-to-speech on a call: speaking sessions, the real-time playback of ``/say`` text, and the
tts-manager pods that own the sessions.

Each behaviour names the server code it follows (``voipbin/monorepo``, snapshot 2026-08-22) or
the measurement behind it (``PROTOCOL.md`` "Timing": VoIPBIN's own client and public benchmarks):

* **Timing** (measured): ``POST /speakings`` answers after ``speaking_create_s`` (~0.6 s); a
  say's audio starts ``say_latency_s`` (0.9-1.3 s) after its ``/say`` at the earliest, so queued
  says play back to back and a say made while nothing plays is heard a second later; ``/stop``
  answers after ``stop_latency_s`` (~0.5 s) and the audio is silenced only then ("silenced within
  0.5 s": the sim takes the late end).
* **Playback rate** by script: ``playback_chars_per_s`` (Latin, ~15) or
  ``playback_cjk_chars_per_s`` (Korean, Japanese, Chinese, ~6), chosen per text (see
  :func:`is_cjk_text`). The heard text of a cut say is truncated at the same rate.
* **Direction**: the caller hears only ``out`` and ``both`` sessions
  (``bin-tts-manager/models/streaming/streaming.go``: ``out`` is injected toward the call; ``in``
  toward the other side; ``""`` passes no whisper direction to the snoop, whose default is none).
* **Voices**: tts-manager maps every say error to 404
  (``bin-tts-manager/pkg/listenhandler/v1_speakings.go``); see :func:`voice_refused` and
  :func:`voice_silent` for what each provider does with a voice it does not have.
* **Flush** per provider (``pkg/streaminghandler/{gcp,aws,elevenlabs}.go``): ``gcp`` cuts now and
  drops the queue; ``aws`` drains its buffered chunks, which cuts the playing say at the end of
  the chunk being written and drops the queue; ``elevenlabs`` only asks for generation.
* **Pods**: say, flush and stop are routed to the pod that owns the session; a dead pod makes
  them time out (see :meth:`Tts.reach_pod`).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from agentd.sim.errors import ApiError
from agentd.sim.model import Line, SayItem, SimCall, SimSpeaking, new_id
from agentd.sim.state import World

#: ``""`` is stored as ``elevenlabs``; any other unknown string is stored as given and streamed
#: through ElevenLabs (``speakinghandler/speaking.go`` Create, ``streaminghandler/run.go``
#: ``getStreamerByProvider``).
DEFAULT_PROVIDER = "elevenlabs"

#: Polly voices of the ``standard`` engine. ``aws.go`` calls ``SynthesizeSpeech`` without an
#: ``Engine``, so Polly uses ``standard`` and refuses both unknown ids and neural-only voices
#: ("This voice does not support the selected engine: standard"). Ids are case-sensitive enum
#: values (``Celine``, not ``Céline``). Source: Polly's "Standard voices" table.
POLLY_STANDARD_VOICES = frozenset(
    {
        "Aditi", "Amy", "Astrid", "Bianca", "Brian", "Camila", "Carla", "Carmen", "Celine",
        "Chantal", "Conchita", "Cristiano", "Dora", "Emma", "Enrique", "Ewa", "Filiz",
        "Geraint", "Giorgio", "Gwyneth", "Hans", "Ines", "Ivy", "Jacek", "Jan", "Joanna",
        "Joey", "Justin", "Karl", "Kendra", "Kevin", "Kimberly", "Lea", "Liv", "Lotte", "Lucia",
        "Lupe", "Mads", "Maja", "Marlene", "Mathieu", "Matthew", "Maxim", "Mia", "Miguel",
        "Mizuki", "Naja", "Nicole", "Penelope", "Raveena", "Ricardo", "Ruben", "Russell",
        "Salli", "Seoyeon", "Takumi", "Tatyana", "Vicki", "Vitoria", "Zeina", "Zhiyu",
    }
)  # fmt: skip
#: Polly's plain-text limit per ``SynthesizeSpeech`` (3,000 billed characters): a longer say
#: fails with ``TextLengthExceededException`` → 404, though the gateway allows 5,000 bytes.
POLLY_MAX_CHARS = 3000
#: ElevenLabs voice ids are 20 alphanumerics (``elevenlabs.go`` checks the length of the flow
#: variable the same way); the id is part of the stream URL, so another shape cannot connect.
_ELEVENLABS_VOICE = re.compile(r"[A-Za-z0-9]{20}")
#: Google's StreamingSynthesize serves only streaming voices (Chirp 3: HD, formerly Journey).
_GCP_STREAMING_VOICE = re.compile(r"[a-z]{2,3}-[A-Z]{2}-(?:Chirp3-HD|Journey)-[A-Za-z]+")

#: ``aws.go``: Polly audio is read in 4,096-byte chunks of 8 kHz 16-bit PCM, 0.256 s each; the
#: chunk being written when a flush drains the rest still plays out.
AWS_CHUNK_S = 4096 / 16000

#: ``bin-common-handler/pkg/circuitbreakerhandler/option.go``: consecutive failures per target
#: queue (one per pod) before the gateway fails that pod's requests fast for ``openDuration``.
BREAKER_THRESHOLD = 5

#: Hangul (jamo, compatibility jamo, syllables), kana, CJK ideographs (+ extension A and
#: compatibility), and the CJK/fullwidth punctuation and forms blocks.
_CJK_RANGES = (
    (0x1100, 0x11FF),
    (0x3000, 0x30FF),
    (0x3130, 0x318F),
    (0x3400, 0x4DBF),
    (0x4E00, 0x9FFF),
    (0xAC00, 0xD7AF),
    (0xF900, 0xFAFF),
    (0xFF00, 0xFFEF),
)


def is_cjk_text(text: str) -> bool:
    """Whether ``text`` is read at the CJK rate: at least half its letters are CJK.

    Chosen by the text rather than the speaking's ``language``: ``language`` is optional and
    unchecked (often empty), while the playback time follows what is actually read, and the
    measurement (15 Latin / 6 CJK characters a second) is per script. A mostly Korean sentence
    with a brand name in it is still read at the Korean pace.
    """
    letters = [ch for ch in text if ch.isalnum()]
    cjk = sum(1 for ch in letters if any(lo <= ord(ch) <= hi for lo, hi in _CJK_RANGES))
    return bool(letters) and 2 * cjk >= len(letters)


def vendor_of(provider: str) -> str:
    """The streamer a provider string runs on (``run.go`` ``getStreamerByProvider``)."""
    return provider if provider in ("gcp", "aws") else "elevenlabs"


def voice_refused(provider: str, voice_id: str) -> bool:
    """Whether every ``/say`` of such a session fails (404; the session itself is created).

    An empty ``voice_id`` is never refused: each streamer falls back to a default voice
    (``aws.go`` Joanna, ``elevenlabs.go`` ``EXAVITQu4vr4xnSDxMaL``, ``gcp.go``
    ``en-US-Chirp3-HD-Charon``; their language tables are keyed ``english_*``, so a BCP-47
    language such as ``ko-KR`` never matches them and the default is used whatever the language).

    * ``aws``: Polly's ``SynthesizeSpeech`` runs inside each say (``aws.go`` ``SayAdd``) and
      refuses an id outside :data:`POLLY_STANDARD_VOICES`.
    * ``elevenlabs`` (and any unknown provider): the voice id is in the stream URL the first say
      connects to (``say.go`` ``SayInit`` → ``elevenlabs.go`` ``connect``); the sim treats a
      malformed id as a refused connection, so every say fails.
    * ``gcp``: never refused (see :func:`voice_silent`).
    """
    if not voice_id:
        return False
    vendor = vendor_of(provider)
    if vendor == "aws":
        return voice_id not in POLLY_STANDARD_VOICES
    if vendor == "elevenlabs":
        return _ELEVENLABS_VOICE.fullmatch(voice_id) is None
    return False


def voice_silent(provider: str, voice_id: str) -> bool:
    """Whether says succeed (200) but nothing is ever heard.

    ``gcp.go`` ``connect`` only sends the voice in the stream's first message; Google's refusal
    of a non-streaming voice arrives on ``Recv``, which closes the stream, and the next ``SayAdd``
    reconnects and sends again: every say answers 200 and no audio comes.
    """
    return (
        vendor_of(provider) == "gcp"
        and bool(voice_id)
        and _GCP_STREAMING_VOICE.fullmatch(voice_id) is None
    )


@dataclass
class _Breaker:
    """The gateway's circuit breaker for one pod's queue (``circuitbreakerhandler/breaker.go``)."""

    fails: int = 0
    state: str = "closed"
    opened_at: float = 0.0

    def allow(self, now: float, open_s: float) -> bool:
        if self.state == "closed":
            return True
        if self.state == "open" and now - self.opened_at >= open_s:
            self.state = "half-open"  # this request is the one probe
            return True
        return False

    def failure(self, now: float) -> None:
        self.fails += 1
        tripped = self.state == "closed" and self.fails >= BREAKER_THRESHOLD
        if self.state == "half-open" or tripped:
            self.state = "open"
            self.opened_at = now

    def success(self) -> None:
        self.fails = 0
        self.state = "closed"


class Tts:
    """The tts manager's behaviour on top of the shared :class:`World`."""

    def __init__(self, world: World, echo: Callable[[str, str], None]) -> None:
        self.world = world
        # what the agent said, heard back by the call's transcribes: (call id, text)
        self._echo = echo
        #: Pods that died; their sessions' rows stay as they were.
        self.dead_pods: set[str] = set()
        self._pod_names = (f"tts-manager-{n}" for n in itertools.count(1))
        self._pods = [next(self._pod_names) for _ in range(max(1, world.settings.tts_pods))]
        self._next_pod = 0
        self._breakers: dict[str, _Breaker] = {}

    # -- sessions ---------------------------------------------------------------------------------

    def create_speaking(
        self,
        call: SimCall,
        language: str,
        provider: str,
        voice_id: str,
        direction: str,
    ) -> SimSpeaking:
        """The session's row, ``initiating`` on one pod; :meth:`setup` makes it live.

        The row exists (and blocks a second session on the call) from the start of the request
        (``speakinghandler/speaking.go`` Create inserts it before the media setup).
        """
        now = self.world.clock.now()
        spk = SimSpeaking(
            id=new_id(),
            customer_id=self.world.customer_id,
            reference_type="call",
            reference_id=call.id,
            language=language,
            provider=provider or DEFAULT_PROVIDER,
            voice_id=voice_id,
            direction=direction,
            status="initiating",
            tm_create=now,
            deaf=call.status != "progressing",
            pod_id=self._pick_pod(),
        )
        self.world.speakings[spk.id] = spk
        self.world.notify()
        return spk

    async def setup(self, spk: SimSpeaking, call: SimCall) -> None:
        """The media setup inside ``POST /speakings``: ``active`` after ``speaking_create_s``.

        A call that ended meanwhile makes the setup fail: the row is ``stopped`` and the request
        answers 500 (``speaking.go`` Create). A pod that died meanwhile leaves the row
        ``initiating`` and the gateway answers 503 once its budget is spent. With
        ``speaking_initiating`` the request answers at once and the row turns ``active``
        ``speaking_activate_s`` later.
        """
        settings = self.world.settings
        if settings.speaking_initiating:
            self.world.spawn(self._activate(spk), name=f"sim-speaking-activate-{spk.id}")
            return
        if settings.speaking_create_s > settings.pod_rpc_timeout_s and spk.pod_id not in (
            self.dead_pods
        ):
            # A setup slower than the gateway's budget (``TTSV1SpeakingCreate``, 3 s): the
            # gateway answers 503 while the pod, whose request has no deadline
            # (``listenhandler/main.go`` ``context.Background()``), goes on and sets the row
            # ``active`` whatever became of it meanwhile (``speaking.go`` Create updates the
            # status without reading it): a row stopped or deleted in between streams again.
            self.world.spawn(self._finish_late(spk), name=f"sim-speaking-late-{spk.id}")
            await asyncio.sleep(settings.pod_rpc_timeout_s)
            raise ApiError(503, "REQUEST_TIMEOUT", "The request timed out.")
        await asyncio.sleep(settings.speaking_create_s)
        if spk.pod_id in self.dead_pods:
            # The pod died inside Create: nobody updates the row, which stays `initiating` (and
            # blocks the call) while the gateway waits out its budget.
            await asyncio.sleep(max(0.0, settings.pod_rpc_timeout_s - settings.speaking_create_s))
            raise ApiError(503, "REQUEST_TIMEOUT", "The request timed out.")
        if call.ending:
            self._set_status(spk, "stopped")
            raise ApiError(500, "INTERNAL")
        if spk.status == "initiating":
            self._set_status(spk, "active")

    async def _finish_late(self, spk: SimSpeaking) -> None:
        await asyncio.sleep(self.world.settings.speaking_create_s)
        if spk.pod_id in self.dead_pods:
            return
        call = self.world.calls.get(spk.reference_id)
        ended = call is None or call.ending
        self._set_status(spk, "stopped" if ended else "active")

    async def _activate(self, spk: SimSpeaking) -> None:
        await asyncio.sleep(self.world.settings.speaking_activate_s)
        if spk.status == "initiating":
            self._set_status(spk, "active")

    def _set_status(self, spk: SimSpeaking, status: str) -> None:
        spk.status = status
        spk.tm_update = self.world.clock.now()
        self.world.notify()

    # -- pods -------------------------------------------------------------------------------------

    def _pick_pod(self) -> str:
        pod = self._pods[self._next_pod % len(self._pods)]
        self._next_pod += 1
        return pod

    def kill_pod(self, pod_id: str) -> None:
        """The pod dies: its sessions' audio stops, their rows stay (``active``, still billed).

        Nothing marks the rows (``speakinghandler/speaking.go``: "TODO: Add orphaned session
        cleanup on pod restart"). The Deployment replaces the pod under a new name, which takes
        new sessions from then on.
        """
        self.dead_pods.add(pod_id)
        if pod_id in self._pods:
            self._pods[self._pods.index(pod_id)] = next(self._pod_names)
        for spk in self.world.speakings.values():
            if spk.pod_id == pod_id:
                spk.queue.clear()
                self._cut(spk, transcribe=True)
                spk.cut_event.set()
        self.world.notify()

    async def reach_pod(self, spk: SimSpeaking) -> None:
        """The gateway's pod-routed RPC (say, flush, stop; also the stop inside ``DELETE``).

        ``bin-api-manager/pkg/servicehandler/speaking.go`` sends them to the queue of
        ``spk.pod_id`` (``requesthandler/tts_speakings.go``). A dead pod's queue has no consumer:
        the request waits out the 3 s budget and answers 503 ``REQUEST_TIMEOUT``
        (``server/error_translate.go``); after :data:`BREAKER_THRESHOLD` such failures the
        breaker answers 500 at once for ``pod_breaker_open_s``, then lets one probe through.
        """
        settings = self.world.settings
        breaker = self._breakers.setdefault(spk.pod_id, _Breaker())
        if not breaker.allow(time.monotonic(), settings.pod_breaker_open_s):
            raise ApiError(500, "INTERNAL")
        if spk.pod_id not in self.dead_pods:
            breaker.success()
            return
        await asyncio.sleep(settings.pod_rpc_timeout_s)
        breaker.failure(time.monotonic())
        raise ApiError(503, "REQUEST_TIMEOUT", "The request timed out.")

    def pod_timed_out(self, spk: SimSpeaking) -> None:
        """A live pod's answer came after the gateway's budget: it counts against the breaker."""
        self._breakers.setdefault(spk.pod_id, _Breaker()).failure(time.monotonic())

    # -- say / flush / stop -----------------------------------------------------------------------

    def say_refused(self, spk: SimSpeaking, text: str) -> bool:
        """Whether the pod fails this say (→ 404): not active, the call's audio gone, or the
        provider refuses it.

        When the call's Asterisk socket closes, each provider's ``Run`` ends its session and
        ``runStreamer`` clears the vendor (``streaminghandler/run.go``): a later ``SayAdd``
        finds no vendor or no socket (``say.go``, ``elevenlabs.go``) while the row still says
        ``active``. With ElevenLabs a say racing the teardown may still pass; never here."""
        if spk.status != "active" or voice_refused(spk.provider, spk.voice_id):
            return True
        if self.vendor_gone(spk):
            return True
        return vendor_of(spk.provider) == "aws" and len(text) > POLLY_MAX_CHARS

    def vendor_gone(self, spk: SimSpeaking) -> bool:
        """Whether the session's provider stream is gone with its call's audio: each vendor's
        ``Run`` ends when the call's socket closes and ``runStreamer`` then clears the vendor
        (``streaminghandler/run.go``), so a flush finds none (``say.go`` ``SayFlush`` hands a
        nil config to the vendor's ``SayFlush``, which refuses it: 404), as a say does."""
        call = self.world.calls.get(spk.reference_id)
        return call is None or call.ending

    def say_blocks_s(self, spk: SimSpeaking, text: str) -> float:
        """How long ``aws`` holds the ``/say`` answer until the say's audio fits its buffer."""
        if vendor_of(spk.provider) != "aws" or not self._audible(spk):
            return 0.0
        now = time.monotonic()
        ahead = sum(self.duration(item.text) for item in spk.queue)
        item = spk.current
        if item is not None and item.line is not None:
            ahead += max(0.0, item.line.t_start + self.duration(item.text) - now)
        return max(0.0, ahead + self.duration(text) - self.world.settings.aws_buffer_s)

    def _audible(self, spk: SimSpeaking) -> bool:
        call = self.world.calls.get(spk.reference_id)
        return (
            call is not None
            and call.status == "progressing"
            and not spk.deaf
            and spk.direction in ("out", "both")
            and not voice_silent(spk.provider, spk.voice_id)
            and spk.pod_id not in self.dead_pods
        )

    def say(self, spk: SimSpeaking, text: str) -> None:
        """Queue ``text``; it plays after whatever is already playing or queued.

        Accepted but unheard when nobody can hear it: a dead call, a session made before the
        answer, an ``in`` or ``""`` direction, or a gcp voice Google does not stream.
        """
        call = self.world.calls.get(spk.reference_id)
        if call is None or not self._audible(spk):
            return
        call.say_seq += 1
        spk.queue.append(SayItem(text, call.say_seq, t_said=time.monotonic()))
        if spk.player is None or spk.player.done():
            spk.player = self.world.spawn(self._player(spk, call), name=f"sim-tts-{spk.id}")
        self.world.notify()

    def flush(self, spk: SimSpeaking) -> None:
        """Provider-dependent flush (see the module docstring)."""
        vendor = spk.flush_kind
        if vendor == "gcp":
            spk.queue.clear()
            self._cut(spk, transcribe=True)
        elif vendor == "aws":
            spk.queue.clear()
            self._cut_after_chunk(spk)
        spk.cut_event.set()
        self.world.notify()

    def _cut_after_chunk(self, spk: SimSpeaking) -> None:
        item = spk.current
        if item is None or item.line is None:
            return
        elapsed = time.monotonic() - item.line.t_start
        item.cut_at = item.line.t_start + math.ceil(elapsed / AWS_CHUNK_S) * AWS_CHUNK_S

    def stop(self, spk: SimSpeaking) -> None:
        """Silence now and mark ``stopped`` (idempotent)."""
        spk.queue.clear()
        self._cut(spk, transcribe=True)
        spk.cut_event.set()
        if spk.status != "stopped":
            self._set_status(spk, "stopped")
        self.world.notify()

    async def stop_via_pod(self, spk: SimSpeaking) -> None:
        """``/stop`` as routed to the pod: answered, and the audio silenced, after the latency."""
        await self.reach_pod(spk)
        await asyncio.sleep(self.world.settings.stop_latency_s)
        if spk.pod_id in self.dead_pods:
            # The pod died while stopping: the gateway is still waiting for its answer.
            await asyncio.sleep(self.world.settings.pod_rpc_timeout_s)
            self.pod_timed_out(spk)
            raise ApiError(503, "REQUEST_TIMEOUT", "The request timed out.")
        self.stop(spk)

    # -- playback ---------------------------------------------------------------------------------

    def duration(self, text: str) -> float:
        """Seconds ``text`` plays for, at the rate of its script."""
        s = self.world.settings
        return len(text) / (
            s.playback_cjk_chars_per_s if is_cjk_text(text) else s.playback_chars_per_s
        )

    def _cut(self, spk: SimSpeaking, *, transcribe: bool) -> None:
        """Truncate the playing item at the elapsed fraction and wake its player."""
        item = spk.current
        if item is None or item.line is None:
            return
        self._finish_item(spk, item, cut=True, transcribe=transcribe)
        spk.cut_event.set()

    def _finish_item(self, spk: SimSpeaking, item: SayItem, *, cut: bool, transcribe: bool) -> None:
        line = item.line
        assert line is not None
        now = time.monotonic()
        if cut:
            duration = self.duration(item.text)
            frac = min(1.0, (now - line.t_start) / duration) if duration > 0 else 1.0
            line.text = item.text[: int(len(item.text) * frac)]
            line.cut = True
        else:
            line.text = item.text
        line.t_end = now
        spk.current = None
        if transcribe and line.text.strip():
            # The agent's own audio heard back on an `out`/`both` transcribe.
            self._echo(spk.reference_id, line.text)
        self.world.notify()

    def _playing(self, spk: SimSpeaking, call: SimCall) -> bool:
        return (
            spk.status == "active"
            and call.status == "progressing"
            and spk.pod_id not in self.dead_pods
        )

    async def _wait_cut(self, spk: SimSpeaking, seconds: float) -> bool:
        """Sleep ``seconds`` unless a cut, flush or stop wakes the player first (→ True)."""
        spk.cut_event.clear()
        try:
            await asyncio.wait_for(spk.cut_event.wait(), max(0.0, seconds))
        except TimeoutError:
            return False
        return True

    async def _player(self, spk: SimSpeaking, call: SimCall) -> None:
        """Play queued items back to back, in real time, none before its say latency."""
        latency = self.world.settings.say_latency_s
        while spk.queue and self._playing(spk, call):
            item = spk.queue[0]
            wait = item.t_said + latency - time.monotonic()
            if wait > 0:
                await self._wait_cut(spk, wait)
                continue  # the queue may have been flushed or the session stopped meanwhile
            spk.queue.popleft()
            await self._play(spk, call, item)
        if call.status != "progressing":
            spk.queue.clear()
        self.world.notify()

    async def _play(self, spk: SimSpeaking, call: SimCall, item: SayItem) -> None:
        t0 = time.monotonic()
        item.line = Line("agent", "", item.text, t0)
        spk.current = item
        call.conversation.append(item.line)
        call.play_log.append((item.seq, t0))
        self.world.notify()
        end = t0 + self.duration(item.text)
        while spk.current is item:
            until = end if item.cut_at is None else min(end, item.cut_at)
            if not await self._wait_cut(spk, until - time.monotonic()):
                # Played to its end, or to the end of the chunk an aws flush left it.
                cut = item.cut_at is not None and item.cut_at < end
                self._finish_item(spk, item, cut=cut, transcribe=True)

    def on_call_hangup(self, call: SimCall) -> None:
        """The call is gone: its audio stops; its speakings stay as they are (and bill)."""
        for spk in self.world.speakings_of(call.id):
            spk.queue.clear()
            self._cut(spk, transcribe=False)
            spk.cut_event.set()
