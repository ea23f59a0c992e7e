"""Sentence cutting for streamed replies, and the 5,000-byte /say limit."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentd import sentences
from agentd.sentences import SentenceBuffer, speakable, split_for_say


@pytest.mark.parametrize(
    ("text", "sentences"),
    [
        ("Hello there. How are you?", ["Hello there.", "How are you?"]),
        ("Dr. Smith will see you. Thanks!", ["Dr. Smith will see you.", "Thanks!"]),
        ("Pi is 3.14 roughly. Yes.", ["Pi is 3.14 roughly.", "Yes."]),
        ("Bring e.g. a pen. Done.", ["Bring e.g. a pen.", "Done."]),
        ("J. Smith called. Ok.", ["J. Smith called.", "Ok."]),
        ("Wait... what? Really!", ["Wait...", "what?", "Really!"]),
        ('He said "stop." Then left.', ['He said "stop."', "Then left."]),
        ("你好。请问有什么可以帮您？", ["你好。", "请问有什么可以帮您？"]),
        ("No end punctuation", ["No end punctuation"]),
    ],
)
def test_sentences(text: str, sentences: list[str]) -> None:
    buf = SentenceBuffer()
    out: list[str] = []
    for ch in text:  # the worst case: one character per chunk
        out += buf.feed(ch)
    out += buf.flush()
    assert out == sentences


def test_a_sentence_is_released_as_soon_as_the_next_one_starts() -> None:
    buf = SentenceBuffer()
    assert buf.feed("Sure. Your bal") == ["Sure."]
    assert buf.feed("ance is fine") == []
    assert buf.flush() == ["Your balance is fine"]


@pytest.mark.parametrize("word", ["word", "ünïcödé", "日本語", "🙂"])
def test_say_split_respects_the_byte_limit_and_characters(word: str) -> None:
    text = " ".join([word] * 3000)
    pieces = split_for_say(text, 5000)
    assert all(len(p.encode()) <= 5000 for p in pieces)
    assert " ".join(pieces) == text  # cut at spaces: nothing lost, no character broken


def test_say_split_without_spaces_never_breaks_a_character() -> None:
    text = "日" * 4000  # 12,000 bytes, no space anywhere
    pieces = split_for_say(text, 5000)
    assert "".join(pieces) == text
    assert all(len(p.encode()) <= 5000 for p in pieces)


def test_short_text_is_one_piece() -> None:
    assert split_for_say("  hi  ") == ["hi"]
    assert split_for_say("") == []


@pytest.mark.parametrize(
    ("text", "ends"),
    [
        ("It is noon.", True),
        ("Really?", True),
        ('He said "stop."', True),
        ("Pi is 3.", False),  # may become 3.14
        ("See Dr.", False),
        ("Wait..", False),  # may become an ellipsis
        ("It is noon. ", False),  # feed() already released it
        ("No end", False),
        ("", False),
    ],
)
def test_a_tail_that_ends_a_sentence(text: str, ends: bool) -> None:
    buf = SentenceBuffer()
    assert buf.feed(text) == ([] if not text.endswith(". ") else ["It is noon."])
    assert buf.ends_a_sentence() is ends


@pytest.mark.parametrize(
    ("model", "voice"),
    [
        ("**Sure!** Your balance is *1,200* dollars.", "Sure! Your balance is 1,200 dollars."),
        ("- First, open the `app`.", "First, open the app."),
        ("2. Then tap **Settings**.", "Then tap Settings."),
        ("## Opening hours", "Opening hours"),
        ("See [our site](https://example.com/hours) for details.", "See our site for details."),
        ("Go to https://example.com/a?b=c now.", "Go to now."),
        ("Great news 🎉👍🏽!", "Great news !"),
        ("It is 25°C and costs €3 © ACME.", "It is 25°C and costs €3 © ACME."),
        ("file_name_here stays, 2 * 3 = 6 too.", "file_name_here stays, 2 * 3 = 6 too."),
        ("네, **확인했습니다**. 😊", "네, 확인했습니다."),
        ("🙂", ""),
        ("42.", "42."),  # an answer, not a list number
        ("2*3*4 is 24.", "2*3*4 is 24."),
        # a code fence's lines (each is a sentence: a line break ends one)
        *(("```python", ""), ("```", ""), ("~~~", ""), ("  ```bash ", "")),
        ("```python\nprint('hi')\n```", "print('hi')"),
    ],
)
def test_speakable_strips_what_a_voice_reads_badly(model: str, voice: str) -> None:
    assert speakable(model) == voice


def _speakable_every_pattern(sentence: str) -> str:
    """speakable as it was before its patterns were skipped where their marks are absent."""
    text = sentences._LINK.sub(r"\1", sentence)
    text = sentences._URL.sub("", text)
    text = sentences._LINE_MARK.sub("", text)
    text = sentences._FENCE.sub("", text)
    for _ in range(2):
        text = sentences._EMPHASIS.sub(r"\2", text)
    text = sentences._EMOJI.sub("", text)
    return re.sub(r"\s+", " ", text).strip()


_MARKDOWNISH = st.lists(
    st.sampled_from(
        [
            *"ab1 \t\n\r\x1c\u00a0\u3000.#-*+_~`>[]()/:w\u2022é😊\u200d\u2603",
            *("https://", "www.", "**", "1. ", "- ", "> ", "`code`", "[x](y)", "```", "~~~"),
            *("\n- ", "\n1. ", "\n## ", "\n> ", " \t* "),
        ]
    ),
    max_size=30,
).map("".join)


@given(_MARKDOWNISH)
@settings(max_examples=400, deadline=None)
def test_speakable_skips_a_pattern_only_where_it_could_not_match(text: str) -> None:
    assert speakable(text) == _speakable_every_pattern(text)


def test_a_line_break_ends_a_sentence() -> None:
    # a model's list: each item is read as it comes, not held to the end of the list
    buf = SentenceBuffer()
    out = buf.feed("Here are the options\n- Pizza margherita\n")
    assert [speakable(s) for s in out] == ["Here are the options", "Pizza margherita"]
    assert buf.feed("- Pasta") == []
    assert [speakable(s) for s in buf.flush()] == ["Pasta"]


class _Counting:
    """The sentence-end pattern, counting the characters each scan covers."""

    def __init__(self, pattern: re.Pattern[str]) -> None:
        self.pattern = pattern
        self.scanned = 0

    def finditer(self, text: str, pos: int = 0) -> Iterator[re.Match[str]]:
        self.scanned += len(text) - pos
        return self.pattern.finditer(text, pos)


def test_a_long_reply_without_a_sentence_end_is_scanned_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 20,000 chunks of a model that never ends a sentence: scanning the whole text again for
    # each chunk blocked the event loop (every call of the daemon) for seconds
    counting = _Counting(sentences._END)
    monkeypatch.setattr(sentences, "_END", counting)
    buf = SentenceBuffer()
    parts: list[str] = []
    for _ in range(20_000):
        parts += buf.feed(" word")  # said in parts as it grows (MAX_SENTENCE_CHARS)
        buf.ends_a_sentence()
    text = " word" * 20_000
    assert counting.scanned < 20 * len(text)  # linear: about one scan of each chunk
    parts += buf.feed(". Done. ")
    assert parts[-1] == "Done." and " ".join(parts[:-1]) == text.strip() + "."


def test_split_for_say_keeps_to_a_character_limit_too() -> None:
    text = "é" * 1000 + " " + "a" * 4000  # 1,000 two-byte characters, then 4,000 one-byte ones
    pieces = split_for_say(text, 5000, 3000)
    assert all(len(p) <= 3000 and len(p.encode()) <= 5000 for p in pieces)
    assert "".join(pieces).replace(" ", "") == text.replace(" ", "")


@pytest.mark.parametrize(
    ("stream", "first"),
    [
        ("आपका बैलेंस दस डॉलर है। क्या और कुछ", "आपका बैलेंस दस डॉलर है।"),  # the danda
        ("هل تريد المساعدة؟ يمكنني", "هل تريد المساعدة؟"),  # the Arabic question mark
        ("انتهى الأمر۔ شكرا", "انتهى الأمر۔"),  # the Arabic full stop (Urdu)
    ],
)
def test_hindi_and_arabic_sentence_ends_release_the_first_sentence(stream: str, first: str) -> None:
    # it was held to the end of the reply, then said in one piece
    assert SentenceBuffer().feed(stream) == [first]
    buf = SentenceBuffer()
    assert buf.feed(first) == [] and buf.ends_a_sentence()  # the pause after it releases it


def test_a_sentence_that_never_ends_is_released_in_parts_at_a_comma_or_a_word() -> None:
    # a run-on reply was silent until it ended (or reached the reply's 4,000 characters)
    limit = sentences.MAX_SENTENCE_CHARS
    buf = SentenceBuffer()
    clause = "and then we add one more item to the list, "
    out: list[str] = []
    for _ in range(20):
        out += buf.feed(clause)
    assert out and all(len(s) <= limit and s.endswith(",") for s in out)
    words = SentenceBuffer().feed("word " * 100)  # no comma: at a word
    assert words == [("word " * (limit // 5)).strip()]
    assert SentenceBuffer().feed("x" * (limit + 10)) == ["x" * limit]
    assert " ".join([*out, *buf.flush()]) == (clause * 20).strip()
