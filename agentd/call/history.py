"""The conversation as the backend sees it: only what the caller could have heard."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from agentd.commands import Message

#: messages kept beyond the `history_limit` the backend is sent: a reply still being extended, or
#: cut to what was heard, belongs to one of the last turns, and finds its message among them.
#: Beyond that the oldest leave in batches of this many (one write of them per ~4 turns).
SLACK = 8


@dataclass(slots=True)
class Msg:
    """One history message; `turn` ties an assistant message to the caller turn it answers."""

    role: str
    text: str
    turn: int = 0


class History:
    """The messages of a call, the system prompt first.

    Only the last `keep` to `keep + SLACK - 1` messages besides the system prompt are kept (0:
    all of them): a call's state, its save on every turn and its scans stay the same size
    however long it lasts. The messages that leave wait in `left` until the daemon takes them
    for the store."""

    __slots__ = ("keep", "left", "msgs")

    def __init__(self, system_prompt: str = "", keep: int = 0) -> None:
        self.keep = keep
        self.msgs: list[Msg] = [Msg("system", system_prompt)] if system_prompt else []
        self.left: list[Msg] = []

    @staticmethod
    def keep_for(history_limit: int) -> int:
        """How many messages a call keeps when its backend is sent `history_limit` (0: all)."""
        return history_limit + SLACK if history_limit > 0 else 0

    def _add(self, msg: Msg) -> None:
        self.msgs.append(msg)
        if self.keep:
            start = 1 if self.msgs[0].role == "system" else 0
            extra = len(self.msgs) - start - self.keep
            if extra >= SLACK:
                self.left += self.msgs[start : start + extra]
                del self.msgs[start : start + extra]

    def take_left(self) -> list[Msg]:
        """The messages that left since the last call, oldest first."""
        left, self.left = self.left, []
        return left

    def user(self, text: str, turn: int) -> None:
        """The caller said `text`. An utterance that got no reply (cut off, or one sentence
        split in two) and this one are one turn."""
        if self.msgs and self.msgs[-1].role == "user":
            self.msgs[-1].text += " " + text
            self.msgs[-1].turn = turn
        else:
            self._add(Msg("user", text, turn))

    def revise_user(self, old: str, new: str, turn: int) -> bool:
        """The caller's words `old`, the end of the last message, are now `new`; False when the
        last message is no longer theirs (then `new` is added with `user`)."""
        if not old or not self.msgs or self.msgs[-1].role != "user":
            return False
        m = self.msgs[-1]
        if not m.text.endswith(old):
            return False
        m.text = (m.text[: len(m.text) - len(old)] + new).strip()
        m.turn = turn
        return True

    def correct_user(self, old: str, new: str, turn: int) -> bool:
        """The caller's words `old`, the end of their message of `turn` (answered already), are
        now `new`: the final transcript wrote them otherwise. False when that message is gone."""
        for m in reversed(self.msgs):
            if m.role == "user" and m.turn == turn:
                if not old or not m.text.endswith(old):
                    return False
                m.text = (m.text[: len(m.text) - len(old)] + new).strip()
                return True
        return False

    def assistant(self, text: str, turn: int) -> None:
        """The agent said `text` (a greeting, a reprompt, a fallback, a goodbye)."""
        self._add(Msg("assistant", text, turn))

    def extend_reply(self, text: str, turn: int) -> None:
        """One more sentence of the reply to `turn`."""
        idx = self._index(turn)
        if idx is None:
            self._add(Msg("assistant", text, turn))
        else:
            self.msgs[idx].text += " " + text

    def has_reply(self, turn: int) -> bool:
        """Something was said in reply to `turn`."""
        return self._index(turn) is not None

    def set_reply(self, turn: int, text: str) -> None:
        """Rewrite the reply to `turn` (turn 0 is the greeting) to what was heard of it."""
        idx = self._index(turn)
        if idx is None:
            if text:
                self._add(Msg("assistant", text, turn))
        elif text:
            self.msgs[idx].text = text
        else:
            del self.msgs[idx]

    def _index(self, turn: int) -> int | None:
        for i, m in enumerate(self.msgs):
            if m.role == "assistant" and m.turn == turn:
                return i
        return None

    def window(self, limit: int) -> tuple[Message, ...]:
        """The system prompt and the last `limit` messages."""
        msgs = [(m.role, m.text) for m in self.msgs]
        system = [m for m in msgs[:1] if m[0] == "system"]
        rest = msgs[len(system) :]
        return tuple(system + rest[-limit:])

    def pairs(self) -> tuple[Message, ...]:
        """Every message as (role, text), for the store."""
        return tuple((m.role, m.text) for m in self.msgs)

    @classmethod
    def restore(cls, pairs: Iterable[tuple[str, str]], turn: int = 0, keep: int = 0) -> History:
        """Rebuild from the store; a user message opens the next turn, and the last one is
        `turn`, the call's: the first messages of a long call are no longer kept, and a turn
        asked for again (the caller went on) has one user message for two turn numbers."""
        msgs = list(pairs)
        offset = max(0, turn - sum(role == "user" for role, _ in msgs))
        history = cls(keep=keep)
        users = 0
        for role, text in msgs:
            users += role == "user"
            # as saved: a longer history (saved by an earlier agentd) is cut at the next turn,
            # whose save then writes the row and the messages that left together
            history.msgs.append(Msg(role, text, users + offset))
        return history

    def __len__(self) -> int:
        return len(self.msgs)

    @property
    def last_text(self) -> str:
        """The latest message's text."""
        return self.msgs[-1].text if self.msgs else ""
