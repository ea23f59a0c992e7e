"""`@value`: the dataclass of the events, commands and names that cross the call core."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar, dataclass_transform

_T = TypeVar("_T")


@dataclass_transform(frozen_default=True, field_specifiers=(field,))
def value(cls: type[_T]) -> type[_T]:
    """A frozen dataclass with slots, to mypy; at run time the same equality, hash and match
    arguments, without the freezing. A frozen dataclass's `__init__` sets every field through
    `object.__setattr__` (~70 ns a field here) and a turn builds ~40 of them: 4-6 % of agentd's
    instructions per turn (bench/PROFILE.md). What frozen was for, that nothing changes an
    event or a command once made, mypy checks (`make lint`): assigning a field is an error."""
    return dataclass(slots=True, unsafe_hash=True)(cls)
