"""The `echo` backend: repeats the caller. For the demo and tests, no AI needed."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from agentd.backends import last_user_text
from agentd.commands import Message


class EchoBackend:
    """Answers "You said: <text>." in word-sized chunks, as a streaming backend would."""

    def __init__(self, prefix: str = "You said:") -> None:
        self.prefix = prefix

    async def reply(self, call_id: str, history: Sequence[Message]) -> AsyncIterator[str]:
        """Stream the echo word by word."""
        text = last_user_text(history).rstrip(".!? \u3002\uff01\uff1f")  # and the CJK marks
        for word in f"{self.prefix} {text}.".split(" "):
            yield word + " "

    async def aclose(self) -> None:
        """Nothing to release."""
