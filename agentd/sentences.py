"""Cut streamed reply text into sentences: the first is spoken while the rest is generated."""

from __future__ import annotations

import re

# words whose trailing period does not end a sentence
_ABBREVIATIONS = frozenset(
    [
        "mr",
        "mrs",
        "ms",
        "dr",
        "prof",
        "sr",
        "jr",
        "st",
        "vs",
        "etc",
        "e.g",
        "i.e",
        "a.m",
        "p.m",
        "no",
        "inc",
        "ltd",
        "co",
        "corp",
        "approx",
        "dept",
        "est",
        "fig",
    ]
)
# sentence ends: Latin punctuation (and the Devanagari danda, the Arabic question mark and full
# stop) before a space, the CJK full stop / marks, or a line break (a model's list items and
# paragraphs: read one by one, not held to the end of the list)
_STOPS = ".!?…\u0964\u0965\u061f\u06d4"
_END = re.compile(rf"[{_STOPS}]+[\"')\]]*(?=\s)|[\u3002\uff01\uff1f]+|\n")
# how far back from the end of the text a sentence end can still be undecided (a run of marks
# and closing quotes waiting for the space after it): each chunk is scanned from there, not
# from the start, so a long reply without a sentence end costs linear time, not quadratic
_LOOKBACK = 16
# the last characters `ends_a_sentence` looks at (a word and its marks)
_TAIL = 64
#: a sentence this long without an end is said in parts (about 20 s of speech): a model that
#: never writes a stop would otherwise be silent until its reply's end, then said in one piece
MAX_SENTENCE_CHARS = 300


def _is_boundary(text: str, end: int) -> bool:
    """Whether the punctuation ending at `end` really ends a sentence."""
    mark = text[end - 1]
    if mark != ".":
        return True
    start = end - 1
    while start > 0 and not text[start - 1].isspace():
        start -= 1
    word = text[start : end - 1].lower().rstrip(".")
    if word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha()):
        return False  # "Dr." "e.g." "J. Smith"
    return not (end < len(text) - 1 and text[end - 2].isdigit() and text[end].isdigit())


class SentenceBuffer:
    """Feed text chunks; get back each sentence as soon as it is complete."""

    def __init__(self, min_chars: int = 1) -> None:
        self._buf = ""
        self._min = min_chars
        self._scan = 0  # where the next scan for a sentence end starts

    def feed(self, chunk: str) -> list[str]:
        """Add a chunk; return the sentences it completed."""
        self._buf += chunk
        out: list[str] = []
        pos = 0
        for m in _END.finditer(self._buf, self._scan):
            end = m.end()
            if not _is_boundary(self._buf, end):
                continue
            sentence = self._buf[pos:end].strip()
            if len(sentence) >= self._min:
                out.append(sentence)
                pos = end
        self._buf = self._buf[pos:]
        if len(self._buf) > MAX_SENTENCE_CHARS:
            out.append(self._run_on())
        self._scan = max(0, len(self._buf) - _LOOKBACK)
        return out

    def _run_on(self) -> str:
        """A sentence that does not end (a run-on, a list without stops): its first part, up
        to a comma (or a word) near the limit, said while the model goes on. The rest of the
        sentence waits in the buffer."""
        head = self._buf[:MAX_SENTENCE_CHARS]
        cut = max(head.rfind(", "), head.rfind("; "), head.rfind(": "))
        cut = cut + 1 if cut > MAX_SENTENCE_CHARS // 2 else head.rfind(" ")
        if cut <= 0:
            cut = MAX_SENTENCE_CHARS  # one long word: cut it all the same
        piece, self._buf = self._buf[:cut].strip(), self._buf[cut:].lstrip()
        return piece

    def ends_a_sentence(self) -> bool:
        """Whether the text so far ends like a complete sentence (a period after a word, not
        after a number or an abbreviation; or ! or ?), so that only the next chunk could say
        otherwise."""
        tail = self._buf[-_TAIL:]
        text = tail.rstrip()
        if text != tail or not text:
            return False  # a trailing space: feed() has already released what it could
        stripped = text.rstrip("\"')]")
        if not stripped or stripped[-1] not in _STOPS:
            return False
        if stripped.endswith(".") and (len(stripped) < 2 or not stripped[-2].isalpha()):
            return False  # "3." may become "3.14", ".." may become "..."
        return _is_boundary(stripped, len(stripped))

    def end_tail(self) -> None:
        """The stream paused after a sentence end: treat it as followed by a space."""
        self._buf += " "
        self._scan = max(0, len(self._buf) - _LOOKBACK)

    def flush(self) -> list[str]:
        """The rest of the text, at the end of the stream."""
        rest, self._buf = self._buf.strip(), ""
        self._scan = 0
        return [rest] if rest else []


_LINK = re.compile(r"\[([^\]\n]+)\]\([^)\s]*\)")  # [text](url): the text is what is meant
_URL = re.compile(r"(?:https?://|www\.)\S+")
# a code fence's own line (```python, ~~~): markup, not words; the code between is read
_FENCE = re.compile(r"^[ \t]*(?:`{3,}|~{3,})[\w+#.-]*[ \t]*$", re.M)
_EMPHASIS = re.compile(r"(?<![\w*])(\*\*|__|\*|~~|`+)(?=\S)(.+?)(?<=\S)\1(?![\w*])")
_LINE_MARK = re.compile(
    r"^[ \t]*(?:#{1,6}[ \t]+|[-*+\u2022][ \t]+|\d{1,3}[.)][ \t]+(?=\S)|>[ \t]*)", re.M
)


# pictographs and their modifiers; not the symbols a sentence reads (°, ©, €)
_EMOJI = re.compile("[\U0001f000-\U0010ffff\u2600-\u27bf\u200d\ufe0f]")


def speakable(sentence: str) -> str:
    """What a TTS voice should read of a model's sentence: markdown marks, list bullets, links'
    addresses, bare URLs and emoji removed (a voice reads them out or stumbles on them)."""
    # each pattern runs only where its marks are: most sentences have none, and the seven
    # scans cost ~75k instructions (~6 µs) a sentence
    text = sentence
    if "[" in text:
        text = _LINK.sub(r"\1", text)
    if "://" in text or "www." in text:
        text = _URL.sub("", text)
    if "\n" in text or _marks_a_line(text.lstrip(" \t")[:1]):
        text = _LINE_MARK.sub("", text)
    if "*" in text or "_" in text or "~" in text or "`" in text:
        if "```" in text or "~~~" in text:
            text = _FENCE.sub("", text)
        for _ in range(2):  # **_nested_** marks
            text = _EMPHASIS.sub(r"\2", text)
    if not text.isascii():
        text = _EMOJI.sub("", text)
    return " ".join(text.split())  # str.split's whitespace is the regex's \s


def _marks_a_line(first: str) -> bool:
    """Whether a line starting with `first` may begin with a list, heading or quote mark."""
    return bool(first) and (first in "#-*+\u2022>" or first.isdigit())


def split_for_say(text: str, limit: int = 5000, max_chars: int | None = None) -> list[str]:
    """Split text into pieces of at most `limit` UTF-8 bytes (and `max_chars` characters), at
    word boundaries where possible."""
    pieces: list[str] = []
    chars = limit if max_chars is None else max_chars
    while len(text.encode()) > limit or len(text) > chars:
        # the longest prefix that fits, never cutting a character in two
        cut = min(len(text.encode()[:limit].decode(errors="ignore")), chars)
        space = text.rfind(" ", 0, cut)
        if space > cut // 2:
            cut = space
        pieces.append(text[:cut].strip())
        text = text[cut:].lstrip()
    if text.strip():
        pieces.append(text.strip())
    return pieces
