"""AI backends: a conversation in, an async stream of reply text out."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from agentd.commands import Message


class Backend(Protocol):
    """What every backend kind provides. Adding a kind is one module with one class."""

    def reply(self, call_id: str, history: Sequence[Message]) -> AsyncIterator[str]:
        """Stream the reply to the last user message as text chunks."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


def last_user_text(history: Sequence[Message]) -> str:
    """The caller's latest utterance."""
    for role, text in reversed(history):
        if role == "user":
            return text
    return ""
