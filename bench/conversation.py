# ruff: noqa: RUF001, RUF002, RUF003 (typeset: dashes, arrows, times signs, Korean)
"""`make bench` section 6, conversation: turn-taking latency and a turn-taking eval (issue #13).

Scripted calls against the simulator at real time scale (`scale` 1; the smoke profile multiplies
every time constant by `scale`), agentd with its own timing defaults, and the streaming LLM stub
(`bench.stub.LlmStub`: first token after 0.3 s, 30 tokens/s). The stub's reply has two sentences
and its first one carries the request's number ("Ticket 017, I can help."), so every agent line
a call heard names the backend request it came from.

The simulator's timing model (every figure is also in results.json): the caller speaks 3
words/s and the STT sends one interim per word; the final transcript, with `speech_ended` just
before it, comes 1.0 s after the end of speech; an utterance of several sentences arrives as up
to 3 finals at least 0.5 s apart; a /say's audio starts 1.0 s after it; playback at 15
characters/s (6 for Korean); `POST /speakings` takes 0.6 s, `/stop` 0.5 s. The simulator's rate
limit is off (several agentd processes share its one customer); agentd keeps its own budget.

**1. Latency, caller end of speech → agent audio starts** (`latency`). N calls per design at
once, each asking M single-sentence questions (4-9 words) and waiting for the agent to finish
before the next. Designs: the tutorial's agent (`bench/baseline/agent.py`: webhook, whole
reply, /flush + /say), agentd `reply_on = "final"` and agentd `reply_on = "interim"`. End of
speech is the caller line's `t_end`, audio start the `t_start` of the first reply (below) whose
audio started after the question began and before the next one: both the simulator's monotonic
clock. A reply that starts before the end of speech is `early` and left out of the percentiles;
a question with no reply is `unanswered`; one with two or more is `double`.

**2. Turn-taking eval** (`eval`). Scripted calls in English and Korean (`[agent] language =
"ko-KR"`), each script run once per `reply_on` mode. A script is a list of steps: *question*;
*split* (several sentences: several finals ~0.5 s apart); *correction* ("Boston, no sorry,
Denver."); *pause* (two utterances, the second `pause_s` after the first whatever the agent
does: ONE turn); *interrupt* (said `barge_in_after_s` into the agent's reply, content words); and
*backchannel* (said `backchannel_after_s` into the reply: "mm-hmm", "네"; not a turn). The
steps' utterances are matched in order to the call's caller lines. Definitions, all from the
simulator's conversation lines and the stub's log:

- A *turn* lasts from the start of its first utterance to the end of its last; a *segment* is
  a turn or a backchannel.
- A *reply* is one backend request heard: the first agent line carrying its number; its audio
  start is that line's `t_start`. A later line without a number that is a sentence of the reply
  belongs to the latest reply; the greeting and any other line are no reply.
- Each reply is *attributed* to the latest segment that started before its audio start.
- **Turns answered exactly once**: turns with exactly one reply attributed / turns reached
  (`unanswered`: none, `multiple`: two or more). Target 100 %.
- **Backchannels answered**: backchannels with a reply attributed. Target 0.
- **Backchannels that cut the agent**: backchannels after whose start an agent line was cut
  (`cut`, cut time = its `t_end`) before the next segment started (the last one: within its
  end + 3 s). Target 0.
- **Real interruptions missed**: interrupt turns that started while an agent line played and
  after which agent audio of a reply (or greeting) that started before the interruption still
  played `CUT_WITHIN_S` (1.5 s) after the interruption's start. An interruption that found the
  agent silent is `void` and not counted. Target 0.
- **Replies started mid-turn**: replies whose audio started strictly inside a turn (after its
  first utterance started, before its last ended) / replies. Target ≤ 3 %.
- The request *used* for a turn is the last reply attributed to it (one per answered turn).
- **Wasted backend calls per turn**: (requests the stub served − requests used) / turns: the
  requests never heard (cancelled, or superseded before a word was played) and the replies heard
  but replaced (a turn's earlier replies, replies to backchannels or to nothing).
- **Wasted tokens per turn**: tokens the stub streamed on requests not used / turns. Both are
  compared with `reply_on = "final"` (the difference interim − final).
- **Turn end → reply**: audio start of a turn's first reply minus the end of the turn (a reply
  started before the end is mid-turn and left out).

Run alone (JSON on stdout, progress on stderr):

    python -m bench.conversation                      # both parts, ~1.5 minutes
    python -m bench.conversation --smoke              # seconds; numbers meaningless
    python -m bench.conversation --part eval --modes interim --dump /tmp/calls.json
    python -m bench.conversation --logs /tmp/agentd-logs  # agentd's debug log, one per agent

`--dump` writes every call's script and conversation lines and every LLM request (with the last
user message it was asked with), to follow a finding turn by turn.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import re
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from agentd.call.settings import MACHINE_PACED, CallSettings
from agentd.config import CALL_KEYS
from bench import procs
from bench.procs import ROOT, VENV_BIN, Agent, Sim, _env, agent_config, attach_sim
from bench.stats import percentile
from bench.stub import LlmStub

Mode = Literal["final", "interim"]
Kind = Literal["question", "split", "correction", "pause", "interrupt", "backchannel"]
MODES: tuple[Mode, ...] = ("final", "interim")
DESIGNS = ("baseline", "final", "interim")
LANGS = ("en-US", "ko-KR")
SOURCE = "+15550001111"  # the callers' number: no agentd serves it
GREETING_KO = "안녕하세요, 무엇을 도와드릴까요?"
REPLY = {
    "en-US": "Ticket {n}, I can help. Your request is all sorted out on my side now.",
    "ko-KR": "티켓 {n}, 도와드릴게요. 요청하신 내용은 모두 처리했습니다.",
}
MARKER = re.compile(r"(?:Ticket|티켓) (\d{3})")
CUT_WITHIN_S = 1.5  # an interruption must silence the agent this soon (× scale)
CALLER_PAUSE_S = 0.3  # a caller's pause after the agent went silent (× scale)
STAGGER_S = 0.15  # calls are answered this far apart (× scale), so they do not run in lockstep
TARGETS = {
    "latency_p50_s": 1.6,  # the speculative design, caller end of speech → agent audio
    "answered_once_pct": 100.0,
    "backchannel_cuts": 0,
    "backchannels_answered": 0,
    "interruptions_missed": 0,
    "mid_turn_pct": 3.0,
}


def log(msg: str) -> None:
    """Progress on stderr (stdout carries the JSON when run alone)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] conversation: {msg}", file=sys.stderr, flush=True)


# ---- the timing model and the profile -----------------------------------------------------------


@dataclass(frozen=True)
class Model:
    """The simulator's and the LLM stub's timing at real time scale."""

    words_per_s: float = 3.0
    stt_final_delay_s: float = 1.0
    stt_split_gap_s: float = 0.5
    say_latency_s: float = 1.0
    playback_chars_per_s: float = 15.0
    playback_cjk_chars_per_s: float = 6.0
    speaking_create_s: float = 0.6
    stop_latency_s: float = 0.5
    llm_ttft_s: float = 0.3
    llm_tokens_per_s: float = 30.0

    def scaled(self, scale: float) -> Model:
        """Every duration × `scale`, every rate ÷ `scale`."""
        return Model(
            words_per_s=self.words_per_s / scale,
            stt_final_delay_s=self.stt_final_delay_s * scale,
            stt_split_gap_s=self.stt_split_gap_s * scale,
            say_latency_s=self.say_latency_s * scale,
            playback_chars_per_s=self.playback_chars_per_s / scale,
            playback_cjk_chars_per_s=self.playback_cjk_chars_per_s / scale,
            speaking_create_s=self.speaking_create_s * scale,
            stop_latency_s=self.stop_latency_s * scale,
            llm_ttft_s=self.llm_ttft_s * scale,
            llm_tokens_per_s=self.llm_tokens_per_s / scale,
        )

    def sim_settings(self, scale: float) -> dict[str, Any]:
        """`SimSettings` keyword arguments (the other service latencies scaled as well)."""
        m = self.scaled(scale)
        return {
            "rate_limit": False,
            "speech_words_per_s": m.words_per_s,
            "playback_chars_per_s": m.playback_chars_per_s,
            "playback_cjk_chars_per_s": m.playback_cjk_chars_per_s,
            "stt_final_delay_s": m.stt_final_delay_s,
            "stt_final_delay_gcp_s": m.stt_final_delay_s,
            "stt_split_gap_s": m.stt_split_gap_s,
            "say_latency_s": m.say_latency_s,
            "speaking_create_s": m.speaking_create_s,
            "stop_latency_s": m.stop_latency_s,
            "pod_rpc_timeout_s": 3.0 * scale,
            "subscribe_bind_s": 0.1 * scale,
        }


@dataclass(frozen=True)
class ConvProfile:
    """How big the section is."""

    scale: float = 1.0  # every time constant × this (1: real time)
    latency_calls: int = 10  # calls per design, at once
    latency_turns: int = 4  # questions per call
    scripts: int = 5  # eval scripts per language (each run once per mode)
    short_scripts: bool = False  # the smoke profile's one short script per language
    deadline_s: float = 240.0  # a call not over by then is hung up and counted unfinished


FULL = ConvProfile()
SMOKE = ConvProfile(
    scale=0.2, latency_calls=1, latency_turns=2, scripts=1, short_scripts=True, deadline_s=30.0
)


# ---- scripts ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One step of a caller's script: a turn (one or two utterances) or a backchannel."""

    kind: Kind
    texts: tuple[str, ...]
    at_s: float = 0.0  # interrupt / backchannel: into the agent's reply; pause: the pause

    @property
    def turn(self) -> bool:
        """Whether the step is a caller turn (a backchannel is not)."""
        return self.kind != "backchannel"

    def utterances(self, scale: float) -> list[dict[str, Any]]:
        """The step as the simulator's `utterances` (control API)."""
        pause = CALLER_PAUSE_S * scale
        if self.kind == "pause":
            first, second = self.texts
            return [
                {"text": first, "pause_s": pause},
                {"text": second, "pause_s": self.at_s * scale, "wait_for_agent": False},
            ]
        (text,) = self.texts
        if self.kind == "interrupt":
            return [{"text": text, "barge_in_after_s": self.at_s * scale}]
        if self.kind == "backchannel":
            return [{"text": text, "backchannel_after_s": self.at_s * scale}]
        return [{"text": text, "pause_s": pause}]


def Q(text: str) -> Step:
    return Step("question", (text,))


def SPLIT(text: str) -> Step:
    return Step("split", (text,))


def FIX(text: str) -> Step:
    return Step("correction", (text,))


def PAUSE(first: str, second: str, pause_s: float) -> Step:
    return Step("pause", (first, second), pause_s)


def CUT(text: str, after_s: float) -> Step:
    return Step("interrupt", (text,), after_s)


def BC(text: str, after_s: float) -> Step:
    return Step("backchannel", (text,), after_s)


QUESTIONS = (
    "what is my balance?",
    "can I change my delivery address?",
    "when is my next payment due?",
    "how do I reset my password?",
    "is my order on the way?",
    "can you cancel my last order?",
    "what are your opening hours today?",
    "do you have this in a larger size?",
    "how much is the monthly fee?",
    "can I pay with a credit card?",
    "where is my nearest branch?",
    "why was I charged twice this month?",
)

SCRIPTS: dict[str, tuple[tuple[Step, ...], ...]] = {
    "en-US": (
        (
            Q("what is my balance?"),
            BC("mm-hmm", 1.5),
            SPLIT("I moved last month. Can you update my address?"),
            CUT("wait, I meant my billing address", 1.8),
            FIX("I want to go to Boston, no sorry, Denver."),
            PAUSE("I'd like to check", "the status of my refund", 1.0),
            Q("can I change my delivery address?"),
        ),
        (
            PAUSE("so my card", "was declined at the store yesterday", 0.8),
            BC("okay", 2.0),
            Q("why was I charged twice this month?"),
            CUT("no no, I need to talk to a person", 1.5),
            SPLIT("The app keeps crashing. It happens every time I log in."),
            BC("yeah", 1.5),
            FIX("book it for Monday. No, wait, Tuesday."),
            Q("how much is the monthly fee?"),
        ),
        (
            Q("when is my next payment due?"),
            BC("right", 2.5),
            FIX("send it to my home address, sorry, my office address."),
            PAUSE("I was wondering if", "you could lower my interest rate", 1.2),
            CUT("hold on, what about the late fee?", 2.0),
            SPLIT("I have two accounts. Please close the older one."),
            Q("can I pay with a credit card?"),
        ),
        (
            SPLIT("Hi. I am calling about my internet bill."),
            BC("mm-hmm", 2.0),
            PAUSE("the thing is", "it doubled since last month", 1.5),
            FIX("my number is five five five one two, no, one three."),
            CUT("sorry, can you repeat the amount?", 1.6),
            Q("is my order on the way?"),
            BC("okay", 1.8),
            Q("what are your opening hours today?"),
        ),
        (
            Q("how do I reset my password?"),
            CUT("wait, I already tried that", 2.2),
            PAUSE("and also", "my email address changed", 1.0),
            BC("yeah", 2.2),
            FIX("I need three tickets, um, actually four tickets."),
            SPLIT("Thanks. One more thing. Where is my nearest branch?"),
            BC("right", 1.5),
            Q("can you cancel my last order?"),
        ),
    ),
    "ko-KR": (
        (
            Q("제 잔액이 얼마예요?"),
            BC("네", 1.5),
            SPLIT("지난달에 이사했어요. 주소를 바꿔 주실 수 있나요?"),
            CUT("잠깐만요, 청구지 주소 말한 거예요", 1.8),
            FIX("부산으로 가고 싶어요, 아니 죄송해요, 대구로요."),
            PAUSE("제 환불이", "언제 들어오는지 알고 싶어요", 1.0),
            Q("배송 주소를 바꿀 수 있나요?"),
        ),
        (
            PAUSE("그러니까 제 카드가", "어제 가게에서 거절됐어요", 0.8),
            BC("응", 2.0),
            Q("이번 달에 왜 두 번 청구됐나요?"),
            CUT("아니요, 상담원과 통화하고 싶어요", 1.5),
            SPLIT("앱이 계속 꺼져요. 로그인할 때마다 그래요."),
            BC("네", 1.5),
            FIX("월요일로 예약해 주세요. 아니, 화요일로요."),
            Q("월 요금이 얼마예요?"),
        ),
        (
            Q("다음 납부일이 언제예요?"),
            BC("응", 2.5),
            FIX("집 주소로 보내 주세요, 아니 회사 주소로요."),
            PAUSE("혹시", "이자율을 낮춰 주실 수 있을까요", 1.2),
            CUT("잠깐만요, 연체료는 어떻게 돼요?", 2.0),
            SPLIT("계좌가 두 개 있어요. 오래된 걸 해지해 주세요."),
            Q("신용카드로 결제할 수 있나요?"),
        ),
        (
            SPLIT("안녕하세요. 인터넷 요금 때문에 전화했어요."),
            BC("네", 2.0),
            PAUSE("문제는", "지난달부터 두 배가 됐다는 거예요", 1.5),
            FIX("제 번호는 오 오 오 일 이, 아니 일 삼이에요."),
            CUT("죄송한데 금액 다시 말씀해 주세요", 1.6),
            Q("제 주문 배송 중인가요?"),
            BC("응", 1.8),
            Q("오늘 영업시간이 어떻게 되나요?"),
        ),
        (
            Q("비밀번호는 어떻게 재설정하나요?"),
            CUT("잠깐만요, 그건 이미 해 봤어요", 2.2),
            PAUSE("그리고", "이메일 주소도 바뀌었어요", 1.0),
            BC("네", 2.2),
            FIX("표 세 장이요, 음, 아니 네 장이요."),
            SPLIT("감사합니다. 하나 더요. 가까운 지점이 어디예요?"),
            BC("응", 1.5),
            Q("최근 주문을 취소해 주실 수 있나요?"),
        ),
    ),
}
SHORT_SCRIPTS: dict[str, tuple[Step, ...]] = {
    "en-US": (
        Q("what is my balance?"),
        BC("mm-hmm", 1.5),
        PAUSE("I'd like to check", "the status of my refund", 1.0),
        CUT("wait, I meant my billing address", 1.8),
    ),
    "ko-KR": (
        Q("제 잔액이 얼마예요?"),
        BC("네", 1.5),
        PAUSE("제 환불이", "언제 들어오는지 알고 싶어요", 1.0),
        CUT("잠깐만요, 청구지 주소 말한 거예요", 1.8),
    ),
}


def eval_scripts(profile: ConvProfile, lang: str) -> list[tuple[Step, ...]]:
    """The scripts one mode runs in `lang`."""
    if profile.short_scripts:
        return [SHORT_SCRIPTS[lang]] * profile.scripts
    pool = SCRIPTS[lang]
    return [pool[i % len(pool)] for i in range(profile.scripts)]


def latency_script(profile: ConvProfile, call: int) -> tuple[Step, ...]:
    """Call `call`'s questions (the pool rotated, so the calls ask different ones)."""
    turns = profile.latency_turns
    return tuple(Q(QUESTIONS[(call * turns + j) % len(QUESTIONS)]) for j in range(turns))


# ---- the processes ------------------------------------------------------------------------------


@dataclass
class Spec:
    """One agent process: a design (or a mode and a language) on its own number and stub."""

    name: str
    number: str
    mode: Mode | None  # None: the tutorial's agent
    language: str
    stub: LlmStub
    greeting: str = CallSettings().greeting


async def serve_sim(raw: str) -> None:
    """In a child process: the simulator with `SimSettings(**json)` until SIGTERM."""
    from agentd.sim.settings import SimSettings
    from agentd.sim.simulator import Simulator

    sim = Simulator(SimSettings(**json.loads(raw)))
    await sim.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"api url: {sim.api_url}")
    print(f"ws url: {sim.ws_url}")
    print(f"access key: {sim.accesskey}")
    print(f"control api: {sim.base_url}/_sim/", flush=True)
    try:
        await stop.wait()
    finally:
        await sim.stop()


async def start_sim(settings: dict[str, Any]) -> Sim:
    """A simulator process with these settings (`agentd sim` has flags for only a few)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.conversation",
        "--serve-sim",
        json.dumps(settings),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env=_env(),
        cwd=ROOT,
    )
    return await attach_sim(proc)


def agent_keys(spec: Spec, scale: float) -> dict[str, Any]:
    """agentd's `[agent]` table: its defaults, but for what the scenario requires."""
    assert spec.mode is not None
    keys: dict[str, Any] = {
        "numbers": [spec.number],
        "reply_on": spec.mode,
        "language": spec.language,
        "greeting": spec.greeting,
    }
    if scale != 1.0:
        # the smoke profile shrinks the simulator's time: agentd's hold times shrink with it
        d = CallSettings(language=spec.language).scaled(scale)
        # a wait that is not a config key (transcribe_end_wait_s) keeps its default
        paced = [n for n in (*MACHINE_PACED, "chars_per_s") if n in CALL_KEYS]
        keys |= {name: getattr(d, name) for name in paced}
    return keys


def _log_sink(logs: Path | None, name: str) -> IO[bytes] | int:
    if logs is None:
        return asyncio.subprocess.DEVNULL
    logs.mkdir(parents=True, exist_ok=True)
    return (logs / f"{name}.log").open("wb")


async def start_agentd(sim: Sim, tmp: Path, spec: Spec, scale: float, logs: Path | None) -> Agent:
    """`agentd run` for `spec`, its backend the spec's stub (`kind = "openai"`)."""
    config = agent_config(
        sim,
        tmp / f"{spec.name}.toml",
        agent=agent_keys(spec, scale),
        backend={
            "kind": "openai",
            "base_url": spec.stub.url.removesuffix("/chat/completions"),
            "model": "stub",
            "api_key": "sk-bench-not-a-secret",
        },
        log={"level": "debug" if logs else "info"},
    )
    sink = _log_sink(logs, spec.name)
    proc = await asyncio.create_subprocess_exec(
        str(VENV_BIN / "agentd"),
        "run",
        "--config",
        str(config),
        stdout=sink,
        stderr=asyncio.subprocess.STDOUT,
        env=_env(),
        cwd=ROOT,
    )
    if not isinstance(sink, int):
        sink.close()  # the child has its own copy
    return Agent(proc)


async def start_baseline(sim: Sim, spec: Spec) -> Agent:
    """The tutorial's agent, fed by the simulator's webhook delivery."""
    return await procs.start_baseline(sim, spec.stub.url)


async def wait_subscribed(sim: Sim, count: int, timeout_s: float = 60.0) -> None:
    """Until `count` WebSocket clients subscribed, and agentd counts them ready (0.3 s later)."""
    async with asyncio.timeout(timeout_s):
        while True:
            conns = await sim.bench("ws")
            if sum(1 for c in conns if c["subscribed_at"] is not None) >= count:
                break
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.4)


# ---- calls --------------------------------------------------------------------------------------


@dataclass
class Placed:
    """One scripted call and, once it is over, the simulator's view of it."""

    call_id: str
    sim: Sim
    spec: Spec
    group: str  # latency: the design; eval: the mode
    steps: tuple[Step, ...]
    view: dict[str, Any] = field(default_factory=dict)
    finished: bool = False  # over by itself before the deadline


async def place(
    sim: Sim, spec: Spec, steps: tuple[Step, ...], *, group: str, i: int, scale: float
) -> Placed:
    """Ring `spec`'s number with a caller playing `steps`; the i-th call of its simulator."""
    body = {
        "source": SOURCE,
        "destination": spec.number,
        "utterances": [u for step in steps for u in step.utterances(scale)],
        "answer_after_s": STAGGER_S * scale * i,
        "hangup_after_s": CALLER_PAUSE_S * scale,
    }
    created = await sim.control("POST", "calls", body)
    return Placed(str(created["id"]), sim, spec, group, steps)


async def _views(placed: Sequence[Placed]) -> None:
    sims = {id(p.sim): p.sim for p in placed}
    for sim in sims.values():
        views = {v["id"]: v for v in await sim.control("GET", "calls")}
        for p in placed:
            if p.sim is sim:
                p.view = views[p.call_id]


async def wait_over(placed: Sequence[Placed], deadline_s: float) -> None:
    """Until every call hung up (polling the simulators); past the deadline, hang them up."""
    deadline = time.monotonic() + deadline_s
    while True:
        await _views(placed)
        if all(p.view["status"] == "hangup" for p in placed):
            break
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    for p in placed:
        p.finished = p.view["status"] == "hangup"
        if not p.finished:
            with contextlib.suppress(RuntimeError):
                await p.sim.control("POST", f"calls/{p.call_id}/hangup", {"by": "remote"})
    if not all(p.finished for p in placed):
        await _views(placed)


async def _leaks(sims: Sequence[Sim], timeout_s: float = 15.0) -> int:
    """Sessions still open on ended calls, once agentd had a moment to stop them."""
    deadline = time.monotonic() + timeout_s
    while True:
        leaks = [x for sim in sims for x in await sim.control("GET", "leaks")]
        if not leaks or time.monotonic() > deadline:
            return len(leaks)
        await asyncio.sleep(0.25)


# ---- what the calls heard -----------------------------------------------------------------------


@dataclass(frozen=True)
class ALine:
    """An agent line of a call, classified."""

    t_start: float
    t_end: float | None
    cut: bool
    kind: Literal["reply", "continuation", "greeting", "other"]
    reply: int | None  # the stub request it came from
    reply_t: float  # audio start of the reply it belongs to (its own start if none)


def agent_lines(view: dict[str, Any], greeting: str, reply: str) -> list[ALine]:
    """The call's agent lines: replies (first line with a request number), their other
    sentences, the greeting, and anything else."""
    rest = reply.split(". ", 1)[1] if ". " in reply else ""
    starts: dict[int, float] = {}
    last: int | None = None
    out: list[ALine] = []
    for line in view["conversation"]:
        if line["who"] != "agent":
            continue
        planned = str(line["planned"]).strip()
        t, t_end, cut = float(line["t_start"]), line["t_end"], bool(line["cut"])
        m = MARKER.search(planned)
        if m is not None:
            n = int(m.group(1))
            kind: Literal["reply", "continuation"] = "continuation" if n in starts else "reply"
            starts.setdefault(n, t)
            last = n
            out.append(ALine(t, t_end, cut, kind, n, starts[n]))
        elif planned == greeting.strip():
            out.append(ALine(t, t_end, cut, "greeting", None, t))
        elif planned and last is not None and planned in rest:
            out.append(ALine(t, t_end, cut, "continuation", last, starts[last]))
        else:
            out.append(ALine(t, t_end, cut, "other", None, t))
    return out


@dataclass(frozen=True)
class Seg:
    """A caller turn or backchannel as the call heard it."""

    kind: Kind
    start: float
    end: float
    text: str
    step: int

    @property
    def turn(self) -> bool:
        return self.kind != "backchannel"


def segments(view: dict[str, Any], steps: Sequence[Step]) -> tuple[list[Seg], int]:
    """The script's steps matched to the caller lines, and how many turns were never said."""
    lines = [x for x in view["conversation"] if x["who"] == "caller"]
    segs: list[Seg] = []
    i = 0
    for k, step in enumerate(steps):
        part = lines[i : i + len(step.texts)]
        if len(part) < len(step.texts) or any(x["t_end"] is None for x in part):
            break
        if [x["planned"] for x in part] != list(step.texts):
            raise RuntimeError(f"caller lines {part} do not match step {step}")
        i += len(step.texts)
        text = " / ".join(step.texts)
        segs.append(Seg(step.kind, float(part[0]["t_start"]), float(part[-1]["t_end"]), text, k))
    missing = sum(1 for s in steps[len(segs) :] if s.turn)
    return segs, missing


def attribute(segs: Sequence[Seg], replies: Sequence[ALine]) -> tuple[list[list[ALine]], int]:
    """Each reply to the latest segment that started before its audio; and the replies that
    came before any segment (after the greeting: answers to nothing)."""
    owned: list[list[ALine]] = [[] for _ in segs]
    stray = 0
    for r in replies:
        k = max((i for i, s in enumerate(segs) if s.start < r.t_start), default=None)
        if k is None:
            stray += 1
        else:
            owned[k].append(r)
    return owned, stray


def silent_after(seg: Seg, lines: Sequence[ALine]) -> float | None:
    """Seconds from an interruption's start until the agent audio begun before it is over
    (None: the agent was silent when it started)."""
    if not any(a.t_start <= seg.start and (a.t_end is None or a.t_end > seg.start) for a in lines):
        return None
    old = [a for a in lines if a.reply_t < seg.start and (a.t_end is None or a.t_end > seg.start)]
    return max((a.t_end if a.t_end is not None else math.inf) - seg.start for a in old)


def backchannel_cut(seg: Seg, until: float, lines: Sequence[ALine]) -> bool:
    """Whether an agent line was cut between the backchannel's start and `until`."""
    return any(a.cut and a.t_end is not None and seg.start < a.t_end <= until for a in lines)


@dataclass
class Tally:
    """Eval counters over some calls."""

    calls: int = 0
    unfinished: int = 0
    turns: int = 0
    not_reached: int = 0
    once: int = 0
    unanswered: int = 0
    multiple: int = 0
    backchannels: int = 0
    bc_answered: int = 0
    bc_cut: int = 0
    interrupts: int = 0
    int_void: int = 0
    int_missed: int = 0
    replies: int = 0
    mid_turn: int = 0
    stray: int = 0
    other_lines: int = 0
    agent_lines: int = 0
    silences: list[float] = field(default_factory=list)
    turn_to_reply: list[float] = field(default_factory=list)
    kinds: Counter[str] = field(default_factory=Counter)
    kinds_once: Counter[str] = field(default_factory=Counter)
    kinds_mid: Counter[str] = field(default_factory=Counter)
    failures: list[dict[str, Any]] = field(default_factory=list)
    used: list[tuple[int, int]] = field(default_factory=list)  # (id of the stub, request)

    def add(self, other: Tally) -> None:
        """Sum `other` into this one."""
        for name, value in vars(other).items():
            mine = getattr(self, name)
            if isinstance(value, list):
                mine.extend(value)
            elif isinstance(value, Counter):
                mine.update(value)
            else:
                setattr(self, name, mine + value)


def evaluate(p: Placed, scale: float) -> Tally:
    """The eval metrics of one call (module docstring)."""
    t = Tally(calls=1, unfinished=int(not p.finished))
    lines = agent_lines(p.view, p.spec.greeting, p.spec.stub.reply)
    replies = [a for a in lines if a.kind == "reply"]
    segs, t.not_reached = segments(p.view, p.steps)
    owned, t.stray = attribute(segs, replies)
    t.replies = len(replies)
    t.other_lines = sum(1 for a in lines if a.kind == "other")
    t.agent_lines = len(lines)
    turns = [s for s in segs if s.turn]
    mid = [r for r in replies if any(s.start < r.t_start < s.end for s in turns)]
    t.mid_turn = len(mid)

    def fail(seg: Seg, problem: str) -> None:
        t.failures.append(
            {
                "lang": p.spec.language,
                "call": p.call_id[:8],
                "step": seg.step,
                "kind": seg.kind,
                "text": seg.text,
                "problem": problem,
            }
        )

    for i, seg in enumerate(segs):
        mine = owned[i]
        nxt = segs[i + 1].start if i + 1 < len(segs) else seg.end + 3.0 * scale
        if not seg.turn:
            t.backchannels += 1
            t.bc_answered += bool(mine)
            cut = backchannel_cut(seg, nxt, lines)
            t.bc_cut += cut
            if mine:
                fail(seg, f"backchannel answered ({len(mine)} replies)")
            if cut:
                fail(seg, "backchannel cut the agent")
            continue
        t.turns += 1
        t.kinds[seg.kind] += 1
        if mine:
            t.used.append((id(p.spec.stub), mine[-1].reply or 0))
        t.once += len(mine) == 1
        t.kinds_once[seg.kind] += len(mine) == 1
        t.unanswered += not mine
        t.multiple += len(mine) > 1
        if len(mine) != 1:
            fail(seg, f"{len(mine)} replies")
        inside = [r for r in mid if seg.start < r.t_start < seg.end]
        if inside:
            t.kinds_mid[seg.kind] += len(inside)
            fail(seg, f"reply started {inside[0].t_start - seg.start:.2f} s into the turn")
        after = [r.t_start - seg.end for r in mine if r.t_start >= seg.end]
        if after:
            t.turn_to_reply.append(min(after))
        if seg.kind == "interrupt":
            _interruption(t, seg, lines, scale, fail)
    return t


def _interruption(t: Tally, seg: Seg, lines: Sequence[ALine], scale: float, fail: Any) -> None:
    t.interrupts += 1
    silence = silent_after(seg, lines)
    if silence is None:
        t.int_void += 1
        return
    t.silences.append(silence)
    if silence > CUT_WITHIN_S * scale:
        t.int_missed += 1
        fail(seg, f"interruption missed: agent audio went on {silence:.2f} s after it started")


def _pct(part: int, whole: int) -> float:
    return round(100.0 * part / whole, 1) if whole else math.nan


def _dist(values: Sequence[float]) -> dict[str, float | int]:
    """n, p50, p90, min, max (seconds, 3 decimals)."""
    return {
        "n": len(values),
        "p50": round(percentile(values, 50), 3),
        "p90": round(percentile(values, 90), 3),
        "min": round(min(values), 3) if values else math.nan,
        "max": round(max(values), 3) if values else math.nan,
    }


def backend_waste(
    stubs: Sequence[LlmStub], placed: Sequence[Placed], used: Sequence[tuple[int, int]]
) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """Requests the stubs served, heard, used, cancelled, the tokens streamed, and what was
    wasted; with the requests not used (what they were asked with)."""
    heard = {
        (id(p.spec.stub), a.reply)
        for p in placed
        for a in agent_lines(p.view, p.spec.greeting, p.spec.stub.reply)
        if a.reply is not None
    }
    mine = set(used)
    out = Counter[str]()
    unused: list[dict[str, Any]] = []
    for s in stubs:
        for r in s.served:
            out["requests"] += 1
            out["tokens"] += r.tokens_sent
            out["cancelled"] += r.cancelled
            out["heard"] += (id(s), r.n) in heard
            if (id(s), r.n) in mine:
                continue
            out["wasted_requests"] += 1
            out["wasted_tokens"] += r.tokens_sent
            unused.append(
                {
                    "n": r.n,
                    "last_user": r.last_user,
                    "heard": (id(s), r.n) in heard,
                    "tokens_sent": r.tokens_sent,
                    "cancelled_after_s": (
                        round(r.t_cancel - r.t_request, 3) if r.cancelled else None
                    ),
                }
            )
    keys = ("requests", "tokens", "cancelled", "heard", "wasted_requests", "wasted_tokens")
    return {k: out[k] for k in keys}, unused


def summarise_eval(t: Tally, waste: dict[str, int]) -> dict[str, Any]:
    """One mode's (or language's) eval figures, with pass/fail against the targets."""
    turns = max(1, t.turns)
    out: dict[str, Any] = {
        "calls": t.calls,
        "unfinished_calls": t.unfinished,
        "turns": t.turns,
        "turns_not_reached": t.not_reached,
        "answered_once": t.once,
        "answered_once_pct": _pct(t.once, t.turns),
        "unanswered": t.unanswered,
        "answered_twice_or_more": t.multiple,
        "backchannels": t.backchannels,
        "backchannel_cuts": t.bc_cut,
        "backchannels_answered": t.bc_answered,
        "interruptions": t.interrupts,
        "interruptions_void": t.int_void,
        "interruptions_missed": t.int_missed,
        "interruption_silence_s": _dist(t.silences),
        "replies": t.replies,
        "mid_turn": t.mid_turn,
        "mid_turn_pct": _pct(t.mid_turn, t.replies),
        "stray_replies": t.stray,
        "other_agent_lines": t.other_lines,
        "turn_end_to_reply_s": _dist(t.turn_to_reply),
        **{f"backend_{k}": v for k, v in waste.items()},
        "backend_requests_per_turn": round(waste.get("requests", 0) / turns, 2),
        "wasted_requests_per_turn": round(waste.get("wasted_requests", 0) / turns, 2),
        "wasted_tokens_per_turn": round(waste.get("wasted_tokens", 0) / turns, 1),
        "by_kind": {
            k: {"turns": n, "once": t.kinds_once[k], "mid_turn": t.kinds_mid[k]}
            for k, n in sorted(t.kinds.items())
        },
    }
    out["pass"] = {
        "answered_once_pct": out["answered_once_pct"] >= TARGETS["answered_once_pct"],
        "backchannel_cuts": t.bc_cut <= TARGETS["backchannel_cuts"],
        "backchannels_answered": t.bc_answered <= TARGETS["backchannels_answered"],
        "interruptions_missed": t.int_missed <= TARGETS["interruptions_missed"],
        "mid_turn_pct": bool(out["mid_turn_pct"] <= TARGETS["mid_turn_pct"]),
    }
    return out


def latency_of(p: Placed) -> tuple[list[float], Counter[str]]:
    """End of speech → first reply audio, per question; and the early/unanswered/double count."""
    lines = agent_lines(p.view, p.spec.greeting, p.spec.stub.reply)
    replies = [a for a in lines if a.kind == "reply"]
    caller = [x for x in p.view["conversation"] if x["who"] == "caller" and x["t_end"] is not None]
    samples: list[float] = []
    counts = Counter[str]()
    for i, c in enumerate(caller):
        nxt = float(caller[i + 1]["t_start"]) if i + 1 < len(caller) else math.inf
        mine = [r for r in replies if float(c["t_start"]) < r.t_start < nxt]
        counts["questions"] += 1
        if not mine:
            counts["unanswered"] += 1
            continue
        counts["double"] += len(mine) > 1
        delay = mine[0].t_start - float(c["t_end"])
        if delay < 0:
            counts["early"] += 1
        else:
            samples.append(delay)
    return samples, counts


def decomposition(
    model: Model, scale: float, stub: LlmStub, latency: dict[str, Any]
) -> dict[str, list[list[Any]]]:
    """The sum each design's latency should come to, term by term (seconds; same units as the
    run, so a reader can put in their own STT and TTS figures)."""
    d = CallSettings()
    k, n = stub.first_sentence, len(stub.toks)
    step = 1.0 / model.llm_tokens_per_s
    first = model.llm_ttft_s + (k - 1) * step  # the token that completes the first sentence
    whole = model.llm_ttft_s + (n - 1) * step
    stt, say = model.stt_final_delay_s, model.say_latency_s
    hold = d.final_hold_s * scale
    interim_p50 = latency.get("interim", {}).get("p50", math.nan)
    llm_first = f"LLM first sentence = ttft + ({k} − 1 tokens) / tokens_per_s"
    return {
        "baseline": [
            ["STT: end of speech → final transcript (stt_final_delay_s)", stt],
            [f"LLM: whole reply = ttft + ({n} − 1 tokens) / tokens_per_s", whole],
            ["/flush, then /say → first audio (say_latency_s)", say],
            ["model total (+ REST round trips)", stt + whole + say],
        ],
        "final": [
            ["STT: end of speech → final transcript (stt_final_delay_s)", stt],
            [f"max(agentd's final_hold_s {hold:g}, {llm_first} {first:.3f})", max(hold, first)],
            ["/say → first audio (say_latency_s)", say],
            ["model total", stt + max(hold, first) + say],
        ],
        "interim": [
            [
                "end of speech → /say: the end of the turn read from the interims, plus the "
                "LLM time not overlapped with the caller's speech (measured p50 − say_latency_s)",
                interim_p50 - say,
            ],
            ["/say → first audio (say_latency_s)", say],
            [f"for reference, the {llm_first} (asked at the end of speech)", first],
            ["floor: say_latency_s alone (end of turn known at once, first sentence ready)", say],
        ],
    }


# ---- the section --------------------------------------------------------------------------------


def make_specs(
    profile: ConvProfile,
    model: Model,
    parts: Sequence[str],
    modes: Sequence[Mode],
    designs: Sequence[str],
) -> list[Spec]:
    """Every agent process of the run, each with its own number and stub."""
    m = model.scaled(profile.scale)
    specs: list[Spec] = []

    def stub(lang: str) -> LlmStub:
        return LlmStub(ttft_s=m.llm_ttft_s, tokens_per_s=m.llm_tokens_per_s, reply=REPLY[lang])

    if "latency" in parts:
        for i, design in enumerate(designs):
            mode: Mode | None = None
            if design != "baseline":
                mode = "final" if design == "final" else "interim"
            specs.append(Spec(f"latency-{design}", f"+1555020000{i}", mode, "en-US", stub("en-US")))
    if "eval" in parts:
        for i, mode in enumerate(modes):
            for j, lang in enumerate(LANGS):
                greeting = GREETING_KO if lang == "ko-KR" else CallSettings().greeting
                specs.append(
                    Spec(
                        f"eval-{mode}-{lang}", f"+155503000{i}{j}", mode, lang, stub(lang), greeting
                    )
                )
    return specs


async def _start(
    specs: Sequence[Spec],
    settings: dict[str, Any],
    tmp: Path,
    *,
    scale: float,
    logs: Path | None,
    sims: list[Sim],
    agents: list[Agent],
) -> dict[str, Sim]:
    """Stubs, simulators (one for agentd, one for the tutorial agent's webhooks) and agents."""
    for spec in specs:
        await spec.stub.start()
    by_spec: dict[str, Sim] = {}
    agentd = [s for s in specs if s.mode is not None]
    baseline = [s for s in specs if s.mode is None]
    if agentd:
        sim = await start_sim(settings)
        sims.append(sim)
        started = await asyncio.gather(*(start_agentd(sim, tmp, s, scale, logs) for s in agentd))
        agents.extend(started)
        by_spec |= {s.name: sim for s in agentd}
        await wait_subscribed(sim, len(agentd))
    for spec in baseline:
        # it answers every call its webhook reports: a simulator of its own
        sim = await start_sim(settings)
        sims.append(sim)
        agents.append(await start_baseline(sim, spec))
        by_spec[spec.name] = sim
    return by_spec


async def _place_all(
    profile: ConvProfile, specs: Sequence[Spec], by_spec: dict[str, Sim]
) -> list[Placed]:
    placed: list[Placed] = []
    count: Counter[int] = Counter()

    async def ring(spec: Spec, group: str, steps: tuple[Step, ...]) -> None:
        sim = by_spec[spec.name]
        placed.append(
            await place(sim, spec, steps, group=group, i=count[id(sim)], scale=profile.scale)
        )
        count[id(sim)] += 1

    for spec in specs:
        if spec.name.startswith("latency-"):
            design = spec.name.removeprefix("latency-")
            for i in range(profile.latency_calls):
                await ring(spec, design, latency_script(profile, i))
        else:
            assert spec.mode is not None
            for steps in eval_scripts(profile, spec.language):
                await ring(spec, spec.mode, steps)
    return placed


async def run_section(
    tmp: Path,
    profile: ConvProfile = FULL,
    *,
    parts: Sequence[str] = ("latency", "eval"),
    modes: Sequence[Mode] = MODES,
    designs: Sequence[str] = DESIGNS,
    logs: Path | None = None,
    dump: Path | None = None,
    model: Model = Model(),
) -> dict[str, Any]:
    """Run the section; returns `results["conversation"]`. `dump`: write every call's
    conversation and every stub request there (JSON), to see what happened turn by turn."""
    started = time.monotonic()
    specs = make_specs(profile, model, parts, modes, designs)
    sims: list[Sim] = []
    agents: list[Agent] = []
    settings = model.sim_settings(profile.scale)
    try:
        log(f"starting {len(specs)} agents (scale {profile.scale})")
        by_spec = await _start(
            specs, settings, tmp, scale=profile.scale, logs=logs, sims=sims, agents=agents
        )
        t0 = min([await sim.now() for sim in sims])
        placed = await _place_all(profile, specs, by_spec)
        log(f"{len(placed)} scripted calls placed; waiting for them to end")
        await wait_over(placed, profile.deadline_s)
        requests = [r for sim in sims for r in await sim.bench("requests", {"since": t0})]
        leaks = await _leaks(sims)
        if dump is not None:
            write_dump(dump, specs, placed)
    finally:
        await asyncio.gather(*(a.stop() for a in agents), return_exceptions=True)
        await asyncio.gather(*(s.stop() for s in sims), return_exceptions=True)
        for spec in specs:
            await spec.stub.stop()
    out = analyse(profile, model, specs, placed, requests)
    out["leaked_sessions"] = leaks
    out["duration_s"] = round(time.monotonic() - started, 1)
    log(f"done in {out['duration_s']} s")
    return out


def write_dump(path: Path, specs: Sequence[Spec], placed: Sequence[Placed]) -> None:
    """Per agent: the stub's requests and each call's script and conversation lines."""
    out = [
        {
            "agent": spec.name,
            "served": [asdict(r) for r in spec.stub.served],
            "calls": [
                {
                    "call_id": p.call_id,
                    "finished": p.finished,
                    "steps": [asdict(step) for step in p.steps],
                    "conversation": p.view["conversation"],
                }
                for p in placed
                if p.spec is spec
            ],
        }
        for spec in specs
    ]
    path.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")


def analyse(
    profile: ConvProfile,
    model: Model,
    specs: Sequence[Spec],
    placed: Sequence[Placed],
    requests: Sequence[dict[str, Any]],
) -> dict[str, Any]:
    """results["conversation"] from the calls' views, the stubs' logs and the requests."""
    m = model.scaled(profile.scale)
    d = CallSettings()
    en = LlmStub(reply=REPLY["en-US"])
    out: dict[str, Any] = {
        "profile": asdict(profile),
        "model": asdict(model),
        "scaled_model": asdict(m),
        "agentd": {
            "timing": "agentd's defaults"
            if profile.scale == 1.0
            else f"defaults × {profile.scale}",
            "final_hold_s": d.final_hold_s,
            "final_wait_s": d.final_wait_s,
            "end_of_turn_s": d.end_of_turn_s,
            "end_of_turn_stop_s": d.end_of_turn_stop_s,
            "speculate_s": d.speculate_s,
            "max_speculative": d.max_speculative,
            "filler_after_s": d.filler_after_s,
            "say_latency_s": d.say_latency_s,
            "echo_guard_s": d.echo_guard_s,
            "barge_in": d.barge_in,
            "barge_in_min_words": d.barge_in_min_words,
            "barge_in_min_chars": d.barge_in_min_chars,
            "tts_provider": d.tts_provider,
            "cut": d.cut,
        },
        "stub": {
            "ttft_s": model.llm_ttft_s,
            "tokens_per_s": model.llm_tokens_per_s,
            "reply": REPLY,
            "tokens": len(en.toks),
            "first_sentence_tokens": en.first_sentence,
        },
        "targets": TARGETS,
        "cut_within_s": CUT_WITHIN_S,
        "status_429": sum(1 for r in requests if r["status"] == 429),
        "unfinished_calls": sum(1 for p in placed if not p.finished),
    }
    lat = [p for p in placed if p.spec.name.startswith("latency-")]
    if lat:
        out["latency"] = latency_results(profile, m, lat, en)
    ev = [p for p in placed if p.spec.name.startswith("eval-")]
    if ev:
        out["eval"] = eval_results(profile, specs, ev, requests)
    return out


def latency_results(
    profile: ConvProfile, m: Model, placed: Sequence[Placed], stub: LlmStub
) -> dict[str, Any]:
    """Part 1: the latency distribution per design and its model."""
    designs: dict[str, Any] = {}
    for design in DESIGNS:
        mine = [p for p in placed if p.group == design]
        if not mine:
            continue
        samples: list[float] = []
        counts = Counter[str]()
        for p in mine:
            s, c = latency_of(p)
            samples += s
            counts += c
        designs[design] = {
            **_dist(samples),
            "questions": counts["questions"],
            "early": counts["early"],
            "unanswered": counts["unanswered"],
            "double": counts["double"],
            "calls": len(mine),
            "unfinished_calls": sum(1 for p in mine if not p.finished),
            "samples_s": [round(x, 3) for x in samples],
        }
    parts = decomposition(m, profile.scale, stub, designs)
    for design, terms in parts.items():
        if design in designs and design != "interim":
            designs[design]["model_s"] = round(terms[-1][1], 3)
    interim = designs.get("interim", {}).get("p50", math.nan)
    return {
        "calls": profile.latency_calls,
        "turns": profile.latency_turns,
        "questions": list(QUESTIONS),
        "designs": designs,
        "decomposition": {k: [[a, round(b, 3)] for a, b in v] for k, v in parts.items()},
        "target_p50_s": TARGETS["latency_p50_s"] * profile.scale,
        "target_met": bool(interim <= TARGETS["latency_p50_s"] * profile.scale),
    }


def eval_results(
    profile: ConvProfile,
    specs: Sequence[Spec],
    placed: Sequence[Placed],
    requests: Sequence[dict[str, Any]],
) -> dict[str, Any]:
    """Part 2: the eval per mode (and per language), and what went wrong, turn by turn."""
    modes: dict[str, Any] = {}
    for mode in MODES:
        mine = [p for p in placed if p.group == mode]
        if not mine:
            continue
        total = Tally()
        by_lang: dict[str, Any] = {}
        for lang in LANGS:
            calls = [p for p in mine if p.spec.language == lang]
            tally = Tally()
            for p in calls:
                tally.add(evaluate(p, profile.scale))
            stubs = [
                s.stub
                for s in specs
                if s.mode == mode and s.language == lang and s.name.startswith("eval-")
            ]
            by_lang[lang] = summarise_eval(tally, backend_waste(stubs, calls, tally.used)[0])
            total.add(tally)
        stubs = [s.stub for s in specs if s.mode == mode and s.name.startswith("eval-")]
        ids = {p.call_id for p in mine}
        rest = [r for r in requests if r["call_id"] in ids]
        waste, unused = backend_waste(stubs, mine, total.used)
        modes[mode] = {
            **summarise_eval(total, waste),
            "rest_requests_per_turn": round(len(rest) / max(1, total.turns), 2),
            "rest_requests": dict(Counter(r["kind"] for r in rest).most_common()),
            # a /say whose audio never started: said, then retracted within the say latency
            "says_never_heard": sum(
                1 for r in rest if r["kind"] == "POST /speakings/say" and r["status"] < 300
            )
            - total.agent_lines,
            "by_lang": by_lang,
            "failures": total.failures[:60],
            "failures_total": len(total.failures),
            "unused_requests": unused[:60],
        }
    if "final" in modes and "interim" in modes:
        f, i = modes["final"], modes["interim"]
        modes["interim"]["vs_final"] = {
            k: round(i[k] - f[k], 2)
            for k in (
                "backend_requests_per_turn",
                "wasted_requests_per_turn",
                "wasted_tokens_per_turn",
            )
        }
    kinds = Counter(s.kind for lang in LANGS for sc in eval_scripts(profile, lang) for s in sc)
    return {
        "languages": list(LANGS),
        "scripts_per_language": profile.scripts,
        "steps": dict(kinds),
        "modes": modes,
    }


# ---- running it alone ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.conversation")
    parser.add_argument("--smoke", action="store_true", help="a tiny version (seconds)")
    parser.add_argument("--part", choices=("all", "latency", "eval"), default="all")
    parser.add_argument("--modes", default="final,interim", help="eval modes, comma-separated")
    parser.add_argument("--designs", default=",".join(DESIGNS), help="latency designs")
    parser.add_argument("--scale", type=float, help="time scale (default 1, smoke 0.2)")
    parser.add_argument("--logs", type=Path, help="write each agentd's debug log here")
    parser.add_argument("--out", type=Path, help="also write the JSON to this file")
    parser.add_argument(
        "--dump", type=Path, help="write every call's lines and every LLM request to this file"
    )
    parser.add_argument("--serve-sim", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_sim is not None:
        asyncio.run(serve_sim(args.serve_sim))
        return 0
    profile = SMOKE if args.smoke else FULL
    if args.scale is not None:
        profile = ConvProfile(**{**asdict(profile), "scale": args.scale})
    parts = ("latency", "eval") if args.part == "all" else (args.part,)
    modes = [m for m in MODES if m in args.modes.split(",")]
    designs = [d for d in DESIGNS if d in args.designs.split(",")]

    async def go() -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="agentd-conv-") as d:
            return await run_section(
                Path(d),
                profile,
                parts=parts,
                modes=modes,
                designs=designs,
                logs=args.logs,
                dump=args.dump,
            )

    results = asyncio.run(go())
    text = json.dumps(results, indent=1)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
