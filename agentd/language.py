"""Language tags the way VoIPBIN keeps them: BCP 47, in its canonical case."""

from __future__ import annotations

import re

_TAG = re.compile(r"[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{1,8})*")
_SEPARATOR = re.compile(r"[-_]")


def canonical(tag: str) -> str | None:
    """`tag` in BCP 47's canonical case (`en_us` → `en-US`), or None when it is not a tag.

    VoIPBIN keeps a transcribe's language as golang.org/x/text prints it after
    `language.BCP47.Make`, and one it cannot parse as `en-US` (bin-transcribe-manager
    `transcribehandler/main.go` `getBCP47LanguageCode`): a tag compared as written, `en_us`
    against `en-US`, does not find the transcribe VoIPBIN says is running."""
    if not _TAG.fullmatch(tag):
        return None
    first, *rest = _SEPARATOR.split(tag)
    out = [first.lower()]
    for part in rest:
        if len(part) == 4 and part.isalpha():
            out.append(part.title())  # a script: Hant
        elif (len(part) == 2 and part.isalpha()) or (len(part) == 3 and part.isdigit()):
            out.append(part.upper())  # a region: US, 419
        else:
            out.append(part.lower())
    return "-".join(out)


def same(a: str, b: str) -> bool:
    """Whether two tags name the same language as VoIPBIN compares them."""
    return (canonical(a) or a) == (canonical(b) or b)
