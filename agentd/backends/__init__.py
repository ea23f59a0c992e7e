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


@dataclass(frozen=True, slots=True)
class Usage:
    """The tokens a reply cost, as the backend reports them (an OpenAI-style `usage`)."""

    input_tokens: int
    output_tokens: int


@dataclass(frozen=True, slots=True)
class NoReply:
    """The backend chose to say nothing this turn (a `python` callable's `None`): the call
    waits for the caller, with no fallback line and no failure."""


Chunk = str | ToolCall | Usage | NoReply

END_CALL_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "end_call",
        "description": "Say goodbye and hang up, when the caller is done.",
        "parameters": {"type": "object", "properties": {}},
    },
}


def tools_for(transfer_numbers: Sequence[str] = ()) -> list[dict[str, Any]]:
    """What the `openai` kind offers the model, in Chat Completions `tools` format.

    `transfer` only when numbers are allowed, and only those: the model cannot be talked into
    another one (and agentd refuses any other one anyway)."""
    if not transfer_numbers:
        return [END_CALL_TOOL]
    transfer = {
        "type": "function",
        "function": {
            "name": "transfer",
            "description": "Transfer the caller to a human at one of the allowed numbers.",
            "parameters": {
                "type": "object",
                "properties": {"number": {"type": "string", "enum": list(transfer_numbers)}},
                "required": ["number"],
            },
        },
    }
    return [END_CALL_TOOL, transfer]


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
