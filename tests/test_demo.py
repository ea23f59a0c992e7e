"""`agentd demo`: the real daemon against the built-in simulator, as a subprocess and in-process."""

from __future__ import annotations

import re

import pytest

from agentd import demo
from agentd.backends import last_user_text
from tests.support import run_cli

CALLER_LINES = [
    "caller: Hi, what is my account balance?",
    "caller: Sorry, actually I lost my card.",
    "caller: Great, thanks. Bye.",
]


def conversation(out: str) -> list[str]:
    """The printed conversation: the `caller:` and `agent:` lines, latency notes left out."""
    lines = []
    for raw in out.splitlines():
        line = raw.strip()
        if line.startswith(("caller:", "agent:")):
            lines.append(re.sub(r"\s+\(agent answered in \d+ ms\)$", "", line))
    return lines


def check_conversation(out: str) -> None:
    lines = conversation(out)
    # the agent greets first, then every caller turn is answered, in order
    assert lines[0] == "agent:  Hello, thank you for calling. How can I help you today?"
    assert [line for line in lines if line.startswith("caller:")] == CALLER_LINES
    first, second, third = (lines.index(c) for c in CALLER_LINES)
    answers = [
        " ".join(line.removeprefix("agent:  ") for line in lines[a:b])
        for a, b in ((first + 1, second), (second + 1, third), (third + 1, len(lines)))
    ]
    # sentences that were ready together went out in one /say: compare the words heard
    assert answers[0].startswith("Sure. Your balance is")
    card = "I have blocked your card. A new one is on its way and arrives in five days."
    assert answers[1] == card
    assert answers[2] == "Thank you for calling. Goodbye!"
    # the caller cut the long balance answer short, and only that one
    [cut] = [line for line in lines if line.endswith("[cut off by the caller]")]
    assert lines.index(cut) < second
    assert "Your next statement" not in out
    # every caller turn reports the agent's latency
    assert len(re.findall(r"\(agent answered in \d+ ms\)", out)) == 3
    assert re.search(r"^3 turns, \d+ REST requests, 0 leaked sessions$", out, re.MULTILINE)
    assert "LEAKED" not in out


@pytest.mark.slow  # a whole demo call in a subprocess: about 6 s
async def test_agentd_demo_runs_a_whole_call_and_exits_0() -> None:
    code, out, err = await run_cli("demo", limit_s=90)
    assert code == 0, err
    assert re.search(r"^simulator at http://127\.0\.0\.1:\d+/v1\.0; agentd subscribed", out)
    assert re.search(r"^call \S+$", out, re.MULTILINE)
    check_conversation(out)


@pytest.mark.slow  # the same call in-process: about 6 s
async def test_demo_run_in_process_quiet(capsys: pytest.CaptureFixture[str]) -> None:
    assert await demo.run(quiet=True) == 0
    out = capsys.readouterr().out
    assert "simulator at" not in out  # --quiet prints only the conversation
    check_conversation(out)


@pytest.mark.parametrize(
    ("said", "start"),
    [
        ("What's my BALANCE please", "Sure. Your balance is"),
        ("I lost my card", "I have blocked your card."),
        ("ok bye now", "Thank you for calling. Goodbye!"),
        ("Do you sell insurance?", "I can help with that. What else?"),
    ],
)
async def test_the_demo_backend_streams_its_canned_answer_word_by_word(
    said: str, start: str
) -> None:
    backend = demo.DemoBackend()
    history = [("system", "ignored"), ("assistant", "Hi, I mention a card."), ("user", said)]
    assert last_user_text(history) == said
    pieces = [p async for p in backend.reply("c1", history)]
    await backend.aclose()
    assert len(pieces) == len("".join(pieces).split())  # one chunk per word, like LLM tokens
    assert "".join(pieces).startswith(start)
