"""Where the caller's turn ends, read from VoIPBIN's interims and finals: pure text and times.

VoIPBIN publishes `speech_ended` together with the final transcript, about a second after the
caller stopped (docs/protocol.md §10): the earliest sign of the end of a turn is that the
interims stop bringing new words. How long to wait for more depends on what the words say — a
question is over, "and" or "um" is not — and on this caller's own pauses: one who went on after
a pause the agent took for the end gets a longer wait next time (cf. LiveKit's dynamic
endpointing). `Hearing` keeps the words of the open turn; `cue` reads them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from difflib import SequenceMatcher

_PUNCT = str.maketrans("", "", ".,!?;:…。、\uff01\uff1f\uff0c\"'()-\u2013\u2014")
_PAUSE_MIN_S = 0.3  # a gap shorter than this is between two words, not a pause
_PAUSE_MAX_S = 3.0  # longer: the caller started over, not a pause mid-thought
MAX_END_S = 1.5  # however long this caller's pauses, the wait never exceeds this
_MARGIN_S = 0.2
#: how long after a final an interim repeating its words is that utterance's, delivered late
#: (the two come on separate topics; measured apart by up to ~0.2 s)
LATE_INTERIM_S = 1.0
#: a final comes this long at most after the last words of its utterance (~1.1 s typically,
#: docs/protocol.md §10): an interim whose utterance began earlier than that before a final
#: cannot be of the next utterance, which begins after the final's has ended
FINAL_LAG_MAX_S = 2.5


class Cue(enum.Enum):
    """What the words say about the end of the turn."""

    QUESTION = "question"  # a question is complete: answer soon
    DONE = "done"  # a full stop, or a sentence-final ending
    OPEN = "open"  # nothing either way
    GOING_ON = "going_on"  # a trailing conjunction, filler or comma: more is coming


# words that leave a sentence open when they end it (lower case, no punctuation)
_TRAILING_EN = frozenset(
    {
        *("and", "but", "or", "so", "because", "cause", "um", "uh", "er", "erm", "hmm"),
        *("like", "the", "a", "an", "to", "of", "with", "for", "my", "your", "our", "if"),
        *("that", "then", "than", "when", "which", "who", "i", "i'm", "is", "are", "was"),
        *("at", "in", "on", "from", "about", "also", "well", "actually", "maybe", "not"),
        *("could", "would", "can", "will", "want", "need", "just", "please", "let", "me"),
    }
)
_TRAILING_KO = frozenset(
    {
        "그리고",
        "근데",
        "그런데",
        "그래서",
        "그러니까",
        "음",
        "어",
        "저",
        "그",
        "아니",
        "뭐",
        "좀",
        "혹시",
        "제",
        "내",
    }
)
# connective verb endings: "-고" (and), "-는데" (but, so), "-면" (if), "-서" (because) ...; and
# the particles a noun ends with mid-sentence ("문제는" the problem is, "카드를" the card ...)
_CONNECTIVE_KO = (
    *("는데", "은데", "인데", "지만", "니까", "려고", "고", "서", "면"),
    *("는", "은", "이", "가", "을", "를", "에", "에서", "으로", "로", "와", "과", "랑", "도", "의"),
)
_QUESTION_KO = ("까", "까요", "나요", "가요", "죠", "니", "냐")
_DONE_KO = ("다", "요", "니다")
_TRAILING_JA = (
    "えーと",
    "えっと",
    "あの",
    "その",
    "えー",
    "それで",
    "でも",
    "けど",
    "けれど",
    "から",
    "て",
    "で",
    "が",
    "し",
    "と",
)
_QUESTION_JA = ("か", "かな", "の")
_DONE_JA = ("です", "ます", "でした", "ました", "た", "だ")
_QMARKS = "?\uff1f"  # ? and the full-width one
_STOPS = ".!\u3002\uff01"  # . ! and the CJK ones
_GOING = ",\u3001\uff0c-\u2013\u2014\u2026"  # commas, dashes, an ellipsis


def words(text: str) -> tuple[str, ...]:
    """`text` as lower-case words without punctuation: what is compared."""
    return tuple(text.lower().translate(_PUNCT).split())


def cue(text: str, language: str) -> Cue:
    """What `text`, the caller's turn so far, says about its end (en, ko and ja cues; the
    punctuation VoIPBIN's STT adds counts in every language)."""
    stripped = text.rstrip()
    if not stripped:
        return Cue.GOING_ON
    last = stripped[-1]
    if last in _GOING:
        return Cue.GOING_ON
    ws = words(stripped)
    tail = ws[-1] if ws else ""
    lang = language.lower()[:2]
    if lang == "ko" and (tail in _TRAILING_KO or tail.endswith(_CONNECTIVE_KO)):
        return Cue.GOING_ON
    if lang == "ja" and tail.endswith(_TRAILING_JA) and last not in _QMARKS + _STOPS:
        return Cue.GOING_ON
    if lang not in ("ko", "ja") and tail in _TRAILING_EN:
        return Cue.GOING_ON
    if last in _QMARKS:
        return Cue.QUESTION
    if last in _STOPS:
        return Cue.DONE
    if lang == "ko":
        if tail.endswith(_QUESTION_KO):
            return Cue.QUESTION
        if tail.endswith(_DONE_KO):
            return Cue.DONE
    if lang == "ja":
        if tail.endswith(_QUESTION_JA):
            return Cue.QUESTION
        if tail.endswith(_DONE_JA):
            return Cue.DONE
    return Cue.OPEN


def goes_on(new: str, old: str) -> bool:
    """Whether `new` has words `old` has not: the caller said more. A re-punctuated or
    re-cased repeat is no more, nor one word of three or more the STT heard again differently."""
    a, b = words(old), words(new)
    matched = sum(m.size for m in SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks())
    unmatched = len(b) - matched
    if unmatched == 1 and len(b) == len(a) >= 3:
        return False
    return unmatched > 0


def covers(final: str, heard: str) -> bool:
    """Whether the final `final` is the utterance its interims heard as `heard`, as the STT
    settled it: every word heard is in it, in order (but one of three or more), whatever it
    adds (words the interims had not shown yet); or the same letters but for a few (a word
    revised, re-spaced Korean, Japanese, one word heard again: "yeah" as "Yes.")."""
    a, b = words(heard), words(final)
    if not a or not b:
        return False
    matched = sum(m.size for m in SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks())
    if matched >= len(a) - (len(a) >= 3):
        return True
    letters = SequenceMatcher(None, "".join(a), "".join(b), autojunk=False).ratio()
    return letters > (0.5 if len(a) == len(b) == 1 else 0.8)


# what an STT drops or writes otherwise when it settles an utterance, without a change of sense
_FILLERS = frozenset({"um", "uh", "uhm", "er", "erm", "hmm", "mm", "ah", "eh", "please"})
_SAME_WORD = {
    **{"yeah": "yes", "yep": "yes", "yup": "yes", "ok": "okay"},
    # a number said word by word, written in digits by the final ("555-1234")
    **{"zero": "0", "oh": "0", "one": "1", "two": "2", "three": "3", "four": "4"},
    **{"five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9"},
}


def _gist(text: str) -> str:
    """`text`'s words as compared for a change of sense: no fillers (nor a "please"), case,
    punctuation or spacing (Korean is re-spaced by the STT), "yeah" and "yes" alike, digits
    and their names alike."""
    return "".join(_SAME_WORD.get(w, w) for w in words(text) if w not in _FILLERS)


def settles(final: str, heard: str) -> bool:
    """Whether the final `final` says what its interims `heard` said, only written otherwise:
    a filler or a "please" dropped or added, punctuation, case, spacing. A word revised, added
    or taken away is a change (a "don't", a last digit, "fifteen" for "fifty"): the reply
    must be for the final's words."""
    return _gist(final) == _gist(heard)


def extends(final: str, heard: str) -> bool:
    """Whether the final `final` goes on past the last of the words `heard` (not a filler nor
    a "please"): words the interims had not shown, said at the end ("what time do you" +
    "close"), rather than a word of theirs revised or inserted ("card" as "credit card")."""
    a, b = words(heard), words(final)
    blocks = SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks()[:-1]
    end = max((m.b + m.size for m in blocks), default=0)
    return any(w not in _FILLERS for w in b[end:])


def _same(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """Equal runs of words, but for one of three or more the STT heard again differently."""
    differ = sum(x != y for x, y in zip(a, b, strict=True))
    return differ == 0 or (differ == 1 and len(a) >= 3)


def _split(text: str, n: int) -> tuple[str, str]:
    """`text` cut before its `n`-th word (counted as `words` counts them)."""
    tokens = text.split()
    seen = 0
    for i, token in enumerate(tokens):
        if token.lower().translate(_PUNCT):
            if seen == n:
                return " ".join(tokens[:i]), " ".join(tokens[i:])
            seen += 1
    return " ".join(tokens), ""


def _begins_alike(heard: tuple[str, ...], final: tuple[str, ...]) -> bool:
    """Whether an interim and a final begin with the same two words (one, when either has one
    only): "I" alone begins too many sentences to tell two utterances apart."""
    n = min(2, len(heard), len(final))
    return n > 0 and heard[:n] == final[:n]


def rejoin(held: str, start: int, final: str) -> tuple[str, int] | None:
    """The final `final` set into `held`, a turn whose words from the `start`-th on may stand
    on interims whose finals have not come: None when it repeats none of them (its words are
    new), else (the turn with the final's words in place of the ones they repeat, the number
    of the first word still awaiting its final: -1 when none is).

    A final that comes after interims repeats them: all of it (a split utterance's first
    final: within them), or its first words (the interims' end, and words they did not have
    yet). Matched from the earliest word, the final's words win (the STT's last word on them);
    one word of three or more heard again differently still matches (as in `goes_on`)."""
    have, new = words(held), words(final)
    if not new:
        return held, start
    for at in range(start, len(have)):
        n = min(len(have) - at, len(new))
        if not _same(have[at : at + n], new[:n]):
            continue
        head, rest = _split(held, at)
        if at + n == len(have):  # its first words end the turn: the rest are new
            return " ".join(filter(None, (head, final.strip()))), -1
        tail = _split(rest, n)[1]
        return " ".join(filter(None, (head, final.strip(), tail))), at + n
    return None


@dataclass(slots=True)
class Hearing:
    """The caller's open turn: its final fragments and the interim in progress.

    The STT reports one utterance at a time: an interim much shorter than the one before is the
    next utterance, and the one before stands (provisionally) until its final comes."""

    finals: list[str] = field(default_factory=list)
    waiting: list[int] = field(default_factory=list)  # `finals` standing on interims: indexes
    interim: str = ""
    interim_since: float = 0.0  # when the utterance of `interim` began
    started_at: float = 0.0  # when its first words came
    changed_at: float = 0.0  # when the words last grew
    final_at: float = -1.0  # when the last final came
    asked: str = ""  # the words the reply under way was asked with ("": none)
    in_history: str = ""  # the words the history holds for this turn
    asks: int = 0  # backend calls made for this turn
    wasted: int = 0  # of them, dropped because the caller went on
    ended: bool = False  # the turn was taken for over (and the caller may yet go on)

    def text(self) -> str:
        """The turn so far."""
        return " ".join([*self.finals, self.interim]).strip()

    def on_interim(self, text: str, now: float) -> bool:
        """An interim; True when it brought words the turn did not have."""
        before = self.text()
        old, new = words(self.interim), words(text)
        if not old and not self.waiting and self.finals and self._late(new, now):
            return False
        # partials grow word by word and revise a word or so: one that lost more, or starts
        # with another word and is shorter, is the next utterance
        if old and (len(new) < len(old) - 1 or (new[:1] != old[:1] and len(new) < len(old))):
            self.finals.append(self.interim)
            self.waiting.append(len(self.finals) - 1)
            old = ()
        if not old:
            self.interim_since = now
        self.interim = text.strip()
        return self._grew(before, now)

    def on_final(self, text: str, now: float) -> bool:
        """A final fragment; True when it brought words the turn did not have."""
        before = self.text()
        self.final_at = now
        said = words(text)
        # the utterance it ends: the oldest standing on an interim that begins as it does; else
        # the one in progress, when it begins so (finals come in no order: a split sentence's
        # second final may come first); else, with no clue, the oldest standing
        slot = next((i for i in self.waiting if _begins_alike(words(self.finals[i]), said)), None)
        if slot is None and self.waiting and not _begins_alike(words(self.interim), said):
            slot = self.waiting[0]
        if slot is not None:
            heard = self.finals[slot]
            self.finals[slot] = text.strip()
            self.waiting.remove(slot)
        else:
            heard = self.interim
            self.finals.append(text.strip())
            if self._own_interim(said, text, now):
                self.interim = ""
            else:
                heard = ""  # an interim of the next utterance came first
        if heard:
            if settles(text, heard):
                return False  # the STT wrote the words its interims showed otherwise
            self.changed_at = now  # it changed them (a word revised, added, taken away)
            return True
        return self._grew(before, now)

    def _own_interim(self, said: tuple[str, ...], text: str, now: float) -> bool:
        """Whether the interim in progress is of the final `text`'s utterance: it begins
        alike, or the final covers it, or it began too long ago to be of the next one."""
        heard = words(self.interim)
        return (
            heard[:1] == said[:1]
            or covers(text, self.interim)
            or (bool(heard) and now - self.interim_since > FINAL_LAG_MAX_S)
        )

    def _late(self, new: tuple[str, ...], now: float) -> bool:
        """Whether `new`, the first interim since the last final, is that final's utterance
        delivered after it (speech events and transcripts come on two topics, in no order):
        it came right after and has the final's words, give or take the last one. A next
        utterance, even of the same words, begins with fewer (its interims grow word by word)."""
        if now - self.final_at > LATE_INTERIM_S or not new:
            return False
        final = words(self.finals[-1])
        if not len(final) - 1 <= len(new) <= len(final):
            return False
        # one word (and a whole utterance of a language written without spaces is one) must
        # match: the tolerance is for an interim's last word, which its final revises
        return new[0] == final[0] if len(new) == 1 else final[: len(new) - 1] == new[:-1]

    def _grew(self, before: str, now: float) -> bool:
        if goes_on(self.text(), before):
            self.changed_at = now
            return True
        return False

    def unconfirmed(self) -> str:
        """The words whose final has not come yet."""
        return " ".join([*(self.finals[i] for i in self.waiting), self.interim]).strip()

    @property
    def final(self) -> bool:
        """The STT ended the utterance: a final came and no new words since."""
        return self.final_at >= self.changed_at

    def stale(self) -> bool:
        """The reply under way was asked with fewer words than the turn now has, or with
        words its final changed (an interim's revised word is not yet a change)."""
        if not self.asked:
            return False
        text = self.text()
        return goes_on(text, self.asked) or (self.final and not settles(text, self.asked))


class Pauses:
    """This caller's pauses mid-turn: gaps after which they went on although the agent had
    taken the turn for over (cf. LiveKit's dynamic endpointing)."""

    __slots__ = ("typical",)

    def __init__(self) -> None:
        self.typical = 0.0

    def went_on_after(self, gap: float) -> None:
        """The caller went on after `gap` seconds of no new words."""
        if _PAUSE_MIN_S <= gap <= _PAUSE_MAX_S:
            self.typical = gap if not self.typical else 0.5 * self.typical + 0.5 * gap

    def wait(self, c: Cue, base: float, going_on: float, lead: float = 0.0) -> float:
        """Seconds of no new words after which a turn whose words end `c` is over.

        A reply said at the end is heard `lead` (the TTS latency) later, and one the caller
        talks into before that is cut unheard: so the wait only grows for a caller whose
        pauses outlast it and the lead together."""
        if c is Cue.GOING_ON:
            return going_on
        if c is Cue.QUESTION:
            return base * 0.6  # a question mark is trusted: no adaptation
        own = base * 1.5 if c is Cue.OPEN else base
        return min(max(own, self.typical + _MARGIN_S - lead), MAX_END_S)
