"""AI backends: a conversation in, an async stream of reply text (and tool calls) out.

A backend kind is one module with one class that has `reply()` and `aclose()`. `reply()` is an
async generator: the executor cuts the text into sentences and speaks each as soon as it is
complete, and cancels the generator (closing its HTTP stream) when the caller barges in.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from agentd.commands import Message


@dataclass(frozen=True, slots=True)
class ToolCall:
    """The backend asks for an action: `end_call` or `transfer` (arguments: `{"number": ...}`)."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


Chunk = str | ToolCall

# what the `openai` kind offers the model, in Chat Completions `tools` format
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "end_call",
            "description": "Say goodbye and hang up, when the caller is done.",
            "parameters": {"type": "object", "properties": {}},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "transfer",
            "description": "Transfer the caller to a human at the given phone number.",
            "parameters": {
                "type": "object",
                "properties": {"number": {"type": "string", "description": "E.164 number"}},
                "required": ["number"],
            },
        },
    },
]


class Backend(Protocol):
    """What every backend kind provides."""

    def reply(self, call_id: str, history: Sequence[Message]) -> AsyncIterator[Chunk]:
        """Stream the reply to the last user message: text chunks, and tool calls."""
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
