"""The `python` backend: a function of yours, imported into agentd (`callable = "pkg.mod:fn"`).

The function is called as `fn(call_id, history)` with `history` a list of `(role, text)` tuples
(role `system`, `assistant` or `user`; the last one is the caller's utterance). It is either

* an async function returning the whole reply as a `str` (or `None` for no reply), or
* an async generator yielding `str` chunks as they are ready, and optionally `ToolCall`s
  (`from agentd.backends import ToolCall`; `ToolCall("end_call")`,
  `ToolCall("transfer", {"number": "+1555..."})`).

It runs on agentd's event loop, so it must not block: await your I/O. When the caller barges in,
the generator is closed, so its `finally` blocks (and `async with` exits) run.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import sys
import time
import traceback
import types
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterator,
    Sequence,
)
from typing import Any

from agentd import logs
from agentd.backends import Chunk, NoReply, ToolCall
from agentd.backends.wire import BackendError
from agentd.commands import Message

log = logs.get_logger("agentd.backends.python")


class BackendConfigError(ValueError):
    """The configured callable cannot be used; the message says why (no traceback needed)."""


def load_callable(target: str) -> Callable[..., Any]:
    """Import `module:attribute` (the attribute may be dotted: `module:obj.method`)."""
    module_name, sep, attr_path = target.partition(":")
    if not sep or not module_name.strip() or not attr_path.strip():
        raise BackendConfigError(f"expected 'module:function', got {target!r}")
    module_name = module_name.strip()
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # a user's module can fail with anything while it is imported
        why = f"{type(exc).__name__}: {exc}{_not_found(module_name, exc)}"
        raise BackendConfigError(f"cannot import {module_name!r}: {why}") from None
    for attr in attr_path.strip().split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            raise BackendConfigError(f"{target!r}: no attribute {attr!r}") from None
    if not callable(obj):
        raise BackendConfigError(f"{target!r} is not callable (it is a {type(obj).__name__})")
    if _plainly_sync(obj):
        # called on the event loop, a plain def would hold every call while it runs, and only
        # the first caller would find out
        raise BackendConfigError(
            f"{target!r} is a plain function: make it an async def (or an async generator)"
        )
    return obj  # type: ignore[no-any-return]


def _not_found(module_name: str, exc: Exception) -> str:
    """Where agentd looked, for a module that is not there: the console script's Python does
    not search the current directory, so a module right beside the config is not found, and
    "No module named" alone does not say why."""
    missing = exc.name if isinstance(exc, ModuleNotFoundError) else None
    if not missing:
        return ""
    python = f"agentd's Python ({sys.executable})"
    if module_name == missing or module_name.startswith(f"{missing}."):
        return (
            f"; {python} looks in its own venv and in PYTHONPATH: install your package into "
            f"that venv, or set PYTHONPATH to the directory holding {missing.split('.')[0]!r} "
            "(PYTHONPATH=. for the current one)"
        )
    return (
        f"; it imports {missing!r}, which {python} does not have: install the package that "
        "provides it into that venv"
    )


def _plainly_sync(obj: Any) -> bool:
    """A function (or an object whose `__call__` is one) that is neither a coroutine function
    nor an async generator function. Anything else (a partial, a C callable) is let through:
    what it returns is checked at each call."""
    plain = inspect.isfunction(obj) or inspect.ismethod(obj)
    fn = obj if plain else getattr(type(obj), "__call__", None)  # noqa: B004 (the method)
    if not (inspect.isfunction(fn) or inspect.ismethod(fn)):
        return False  # a class, a builtin's slot wrapper, a partial
    return not (inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn))


def _home(target: str) -> str:
    """The directory (or the file) of the top-level package or module `target` comes from,
    where its author's own lines are."""
    top = sys.modules.get(target.partition(":")[0].strip().split(".")[0])
    path = str(getattr(top, "__file__", None) or "")
    if not path:
        return ""
    if os.path.basename(path) == "__init__.py":
        return os.path.join(os.path.dirname(path), "")
    return path


def _where(exc: BaseException, home: str) -> str:
    """` (at file:line, in function)`: the deepest frame of the traceback in the function's own
    package (else the deepest of all). The backend_failed line has no room for a traceback, and
    "KeyError: 'text'" alone does not say which of the function's lines raised it."""
    frames = traceback.extract_tb(exc.__traceback__)
    own = [f for f in frames if home and f.filename.startswith(home)]
    if not (own or frames):
        return ""
    frame = (own or frames)[-1]
    return f" (at {frame.filename}:{frame.lineno}, in {frame.name})"


#: a step of the function this long (its code between two awaits) held every call: warned
BLOCKING_S = 0.25


class _Held:
    """Times each step of the function's coroutines: the code it runs between two awaits, all
    the while no other call is served. An `async def` that calls `time.sleep` or `requests`
    passes every check at start; this is how the operator hears of it."""

    __slots__ = ("longest",)

    def __init__(self) -> None:
        self.longest = 0.0

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.longest = max(self.longest, time.perf_counter() - start)

    @types.coroutine
    def awaiting(self, awaitable: Awaitable[Any]) -> Generator[Any, Any, Any]:
        """`await awaitable`, one step at a time, each timed (what `await` does, by hand)."""
        it = awaitable.__await__()
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                with self.step():
                    sent = it.send(value) if error is None else it.throw(error)
            except StopIteration as stop:
                return stop.value
            try:
                value, error = (yield sent), None
            except GeneratorExit:
                close = getattr(it, "close", None)
                if close is not None:
                    close()
                raise
            except BaseException as exc:  # a cancellation, thrown on into the function
                value, error = None, exc


class PythonBackend:
    """Calls the imported function for each reply."""

    def __init__(self, *, target: str) -> None:
        self.target = target
        # imported now, so a wrong path stops agentd at start, not at the first caller
        self._fn = load_callable(target)
        self._home = _home(target)

    def __repr__(self) -> str:
        return f"PythonBackend(target={self.target!r})"

    async def reply(self, call_id: str, history: Sequence[Message]) -> AsyncIterator[Chunk]:
        """Stream what the function returns or yields; what it raises, as a `BackendError` that
        says where."""
        try:
            # closed with this one, so the function's own cleanup runs on a barge-in, not
            # whenever the garbage collector gets to it
            async with contextlib.aclosing(self._reply(call_id, history)) as chunks:
                async for chunk in chunks:
                    yield chunk
        except BackendError:
            raise
        except Exception as exc:
            what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise BackendError(
                f"python backend: {self.target} raised {what}{_where(exc, self._home)}"
            ) from exc

    async def _reply(self, call_id: str, history: Sequence[Message]) -> AsyncGenerator[Chunk, None]:
        timed = _Held()
        try:
            with timed.step():
                result = self._fn(call_id, list(history))
            if inspect.isasyncgen(result) or isinstance(result, AsyncIterator):
                try:
                    while True:
                        try:
                            chunk = await timed.awaiting(result.__anext__())
                        except StopAsyncIteration:
                            break
                        if not isinstance(chunk, str | ToolCall):
                            raise BackendError(
                                f"python backend: {self.target} yielded a "
                                f"{type(chunk).__name__}; expected str or ToolCall"
                            )
                        yield chunk
                finally:
                    # close it now (not whenever it is garbage-collected), so its cleanup runs
                    # while the barge-in is being handled
                    aclose = getattr(result, "aclose", None)
                    if aclose is not None:
                        await timed.awaiting(aclose())
            elif inspect.isawaitable(result):
                value = await timed.awaiting(result)
                if value is None:
                    yield NoReply()
                    return
                if not isinstance(value, str):
                    raise BackendError(
                        f"python backend: {self.target} returned a {type(value).__name__}; "
                        "expected str"
                    )
                yield value
            else:
                raise BackendError(
                    f"python backend: {self.target} returned a {type(result).__name__}; it must "
                    "be an async function or an async generator"
                )
        finally:
            if timed.longest >= BLOCKING_S:
                log.warning(
                    "backend.blocked_loop",
                    target=self.target,
                    held_s=round(timed.longest, 3),
                    hint="the function ran this long without an await, and every call on this "
                    "agentd waited: await your I/O (an async client, asyncio.sleep), or run "
                    "blocking work with asyncio.to_thread",
                )

    async def aclose(self) -> None:
        """Nothing to release: the function owns its own resources."""
