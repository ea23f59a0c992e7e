"""The `agentd` command line: run, call, status, calls, demo, console, sim, check-config."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import stat
import sys
import time
import traceback
from collections import Counter
from collections.abc import MutableMapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from agentd import __version__
from agentd.config import NO_CREDENTIALS, Config, ConfigError, load
from agentd.secret import redact

if TYPE_CHECKING:
    from agentd.backends import Backend
    from agentd.voipbin import ApiError

DEFAULT_CONFIG = "/etc/agentd/agentd.toml"
#: where the unit loads its credentials from, beside its config: `make install` writes
#: LoadCredential= with $(CONF_DIR)/credentials and ExecStart= with $(CONF_DIR)/agentd.toml
CREDENTIALS_DIR = "credentials"
# a mistake in the config or in what the credentials may do: starting again cannot fix it
EXIT_CONFIG = 2
# `agentd call`: the POST failed in a way that may have created the call (a 5xx, a timeout)
EXIT_CALL_UNKNOWN = 3


def _config_path(arg: str | None) -> str | None:
    if arg:
        return arg
    env = os.environ.get("AGENTD_CONFIG")
    if env:
        return env
    return DEFAULT_CONFIG if Path(DEFAULT_CONFIG).exists() else None


def credentials_beside(config_path: str) -> str:
    """The directory the service with this config loads its credentials from."""
    return os.path.join(os.path.dirname(os.path.abspath(config_path)), CREDENTIALS_DIR)


def service_credentials(config_path: str | None, env: MutableMapping[str, str]) -> str:
    """Run from a shell with the service's config, read its secrets where the unit loads them
    from, the `credentials` directory beside the config: systemd sets $CREDENTIALS_DIRECTORY
    for the service only, and `agentd check-config` (or `call`, `calls`, `console`) as root
    would otherwise find no access key (or backend key).

    Returns why such a directory was there but not read ("" when it was read, or there is
    none), for the error of a config that then has no credentials."""
    if "CREDENTIALS_DIRECTORY" in env or config_path is None:
        return ""
    creds = credentials_beside(config_path)
    try:
        st = os.stat(creds)
    except (FileNotFoundError, NotADirectoryError):
        return ""
    except OSError:
        return f"the service's credentials, {creds}, cannot be read by this user: use sudo"
    if not stat.S_ISDIR(st.st_mode):
        return ""
    # the secrets read here are sent to the config's api_url, as root under sudo: a directory
    # someone else can fill (beside a config in /tmp) must not choose them
    if st.st_uid not in (0, os.geteuid()):
        unsafe = f"owned by uid {st.st_uid}"
    elif st.st_mode & 0o022:
        unsafe = f"writable by others (mode {stat.S_IMODE(st.st_mode):04o})"
    else:
        unsafe = ""
    if unsafe:
        return (
            f"{creds} was not read: it is {unsafe}; make it root's and 0700 as make install "
            f"does (chown root: {creds} && chmod 0700 {creds})"
        )
    if not os.access(creds, os.R_OK | os.X_OK):
        return f"the service's credentials, {creds}, are readable by root only: use sudo"
    env["CREDENTIALS_DIRECTORY"] = creds
    return ""


def _load(arg: str | None) -> Config:
    path = _config_path(arg)
    try:
        return load(path)
    except ConfigError as exc:
        if path is not None:
            raise
        # configured by the environment alone, or not at all: say where a file was looked for
        raise ConfigError(
            f"{exc} (no config file: {DEFAULT_CONFIG} does not exist; "
            "pass --config FILE or set AGENTD_CONFIG)"
        ) from None


def _at_least_one(text: str) -> int:
    """A count of 1 or more: SQLite's LIMIT reads 0 as none at all and -1 as no limit."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="agentd", description="Run an AI voice agent on VoIPBIN.")
    p.add_argument("--version", action="version", version=f"agentd {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--config", help=f"TOML config (default: $AGENTD_CONFIG or {DEFAULT_CONFIG})")

    call = sub.add_parser("call", help="place an outbound call that the running daemon serves")
    call.add_argument("--to", required=True, help="number to call, e.g. +15559876543")
    call.add_argument("--from", dest="source", help="caller id (default: agent.caller_id)")
    call.add_argument("--config", help=f"TOML config (default: $AGENTD_CONFIG or {DEFAULT_CONFIG})")
    call.add_argument("--wait", action="store_true", help="follow the call until it ends")
    call.add_argument(
        "--force",
        action="store_true",
        help="place the call even when no running agentd would serve it",
    )

    hangup = sub.add_parser("hangup", help="hang up a call (the running daemon cleans up)")
    hangup.add_argument("id", help="the call id, as `agentd status` or `agentd call` shows it")
    hangup.add_argument(
        "--config", help=f"TOML config (default: $AGENTD_CONFIG or {DEFAULT_CONFIG})"
    )

    check = sub.add_parser(
        "check-config", help="validate the config, the credentials and the backend"
    )
    check.add_argument(
        "--config", help=f"TOML config (default: $AGENTD_CONFIG or {DEFAULT_CONFIG})"
    )

    status = sub.add_parser("status", help="what the running daemon is doing (read-only)")
    status.add_argument("--socket", help="the status socket (default: see README, Watch it)")
    status.add_argument("--json", action="store_true", help="print the raw JSON document")
    status.add_argument("--config", help="read [status] socket (or [store] path) from this config")

    calls = sub.add_parser("calls", help="the call history in the store (read-only)")
    calls.add_argument("--since", help="only calls started since: 30m, 2h, 7d, or a date")
    calls.add_argument(
        "--limit", type=_at_least_one, default=100, help="at most this many (default 100)"
    )
    calls.add_argument("--json", action="store_true", help="print JSON")
    calls.add_argument("--config", help="read [store] (path or url) from this config")
    calls.add_argument("--store", help="read this store file (e.g. agentd console's)")
    calls_sub = calls.add_subparsers(dest="calls_command", metavar="show")
    show = calls_sub.add_parser("show", help="one call: conversation, turn timings, sessions")
    show.add_argument("id", help="the call id (or an unambiguous start of it)")
    # SUPPRESS: given after `show` they count, left out they keep the values given before it
    show.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    show.add_argument(
        "--config", default=argparse.SUPPRESS, help="read [store] (path or url) from this config"
    )
    show.add_argument("--store", default=argparse.SUPPRESS, help="read this store file")

    demo = sub.add_parser("demo", help="agentd against its built-in simulator, no account needed")
    demo.add_argument("--quiet", action="store_true", help="print only the conversation")

    console = sub.add_parser(
        "console", help="talk to your own agent in the terminal, against the built-in simulator"
    )
    console.add_argument(
        "--config", help=f"TOML config (default: $AGENTD_CONFIG or {DEFAULT_CONFIG}, else echo)"
    )
    console.add_argument(
        "--fast", action="store_true", help="VoIPBIN's timing and agentd's ten times quicker"
    )
    console.add_argument("--log", help="write agentd's log to this file (default: warnings only)")
    console.add_argument(
        "--store",
        default="agentd-console.db",
        help='keep the call here, for `agentd calls --store` (default agentd-console.db; "": off)',
    )

    sim = sub.add_parser("sim", help="run the VoIPBIN simulator standalone", add_help=False)
    sim.add_argument("sim_args", nargs=argparse.REMAINDER)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sim"]:
        # the simulator has its own options (argparse's REMAINDER drops leading --options)
        from agentd.sim.standalone import main as sim_main

        return sim_main(argv[1:])
    args = _parser().parse_args(argv)
    unread = ""  # why the service's credentials beside the config were not read
    if args.command in ("check-config", "call", "hangup", "calls", "console"):
        unread = service_credentials(_config_path(getattr(args, "config", None)), os.environ)
    if args.command in ("check-config", "call", "hangup", "calls", "status"):
        # a tool's own output is stdout (`ID=$(agentd call ...)`); what its REST client or
        # store warns of (a retry, a slow server) goes to stderr, redacted as the daemon's is
        from agentd import logs

        logs.configure("warning", "console", stream=sys.stderr, background=False)
    try:
        return _command(args)
    except ConfigError as exc:
        hint = f" ({unread})" if unread and NO_CREDENTIALS in str(exc) else ""
        _error(f"agentd: config error: {exc}{hint}")
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader went away (`agentd console | head`): no traceback. Python would fail
        # again flushing stdout at exit, so it is pointed at /dev/null first
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # as a process killed by SIGPIPE
    except Exception as exc:
        # a bug: its traceback is for the report, redacted like every log line (a message may
        # carry a URL with its key); exit 1, which the unit restarts
        _error(f"agentd: internal error, please report it: {exc!r}")
        print(redact("".join(traceback.format_exception(exc))), file=sys.stderr, end="")
        return 1


def _stderr_is_journal() -> bool:
    """Whether stderr is the journal: systemd names its stream in $JOURNAL_STREAM as
    "device:inode" (inherited by children whose stderr is elsewhere, so it is compared)."""
    dev, _, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError):
        return False


def _error(text: str) -> None:
    """Why a command stopped, one line on stderr. The journal files a line at the unit's
    SyslogLevel= (info) unless it starts with a priority: `<3>` keeps the reason the service
    stopped in `journalctl -p warning`. Redacted as a log line is: it may quote an error of
    the user's code (a python backend that failed to import, with the key it was given)."""
    text = redact(text)
    print(f"<3>{text}" if _stderr_is_journal() else text, file=sys.stderr)


def _command(args: argparse.Namespace) -> int:
    """Run the parsed command; its exit status."""
    if args.command == "run":
        return _run(args.config)
    if args.command == "call":
        return _call(args)
    if args.command == "hangup":
        return _hangup(args)
    if args.command == "check-config":
        return _check(args.config)
    if args.command == "status":
        from agentd.status import main as status_main

        return status_main(args.socket, args.json, _config_path(args.config))
    if args.command == "calls":
        from agentd.calls import main as calls_main

        return calls_main(
            _config_path(args.config),
            call_id=args.id if args.calls_command == "show" else None,
            since=args.since,
            as_json=args.json,
            limit=args.limit,
            store=args.store,
        )
    if args.command == "demo":
        from agentd.demo import main as demo_main

        return demo_main(quiet=args.quiet)
    if args.command == "console":
        from agentd.console import main as console_main

        return console_main(
            _config_path(args.config), fast=args.fast, log_path=args.log, store=args.store
        )
    if args.command == "sim":
        from agentd.sim.standalone import main as sim_main

        return sim_main(list(args.sim_args))
    _parser().print_help()
    return EXIT_CONFIG


def tune_gc() -> None:
    """Collect garbage cycles less often, in smaller steps. CPython's first threshold (700 new
    objects) runs a young collection every few hundred events under load, and every hundredth
    is a full one that walks every live object: some hundred thousand at a thousand calls, tens
    of milliseconds on a small box while every turn in flight waits. Ten times the threshold
    makes young collections ten times rarer, and the middle generation collected every third
    time instead of every tenth keeps each of them short (a full one comes every 30, three times
    rarer than by default). What was imported at start never changes: it is frozen, so no
    collection walks it again."""
    import gc

    gc.collect()
    gc.freeze()
    young, _, old = gc.get_threshold()
    gc.set_threshold(young * 10, 3, old)


def _run(config_arg: str | None) -> int:
    import structlog

    from agentd import logs
    from agentd.daemon import Daemon
    from agentd.sdnotify import Notifier
    from agentd.store_schema import StoreError, StoreUnreachable
    from agentd.voipbin import PermissionDenied

    config = _load(config_arg)
    logs.configure(config.log_level, config.log_format)
    tune_gc()
    for warning in config.warnings:
        structlog.get_logger("agentd.config").warning("config.warning", warning=warning)

    async def serve() -> None:
        daemon = Daemon(config, notifier=Notifier.from_env())
        daemon.install_signal_handlers()
        await daemon.run()

    try:
        asyncio.run(serve())
    except PermissionDenied as exc:
        _error(f"agentd: VoIPBIN refused: {exc}")
        return EXIT_CONFIG
    except StoreUnreachable as exc:
        # PostgreSQL down or still starting (it may boot after agentd): exit 1, which systemd
        # restarts (Restart=on-failure); its RestartPreventExitStatus=2 would end it for good
        _error(f"agentd: store: {exc}")
        return 1
    except StoreError as exc:
        # before any call was taken: a wrong path, a file that is no store, another agentd
        _error(f"agentd: store: {exc}")
        return EXIT_CONFIG
    finally:
        logs.flush()  # the writer thread's last lines, before anything else is printed
    return 0


def _call(args: argparse.Namespace) -> int:
    from agentd.daemon import make_client
    from agentd.voipbin import ApiError

    config = _load(args.config)
    source = args.source or config.caller_id
    if not source:
        # agent.numbers is required: without a caller id it is ["*"], which names no number
        raise ConfigError(
            'agent.caller_id: set it, or pass --from: agent.numbers = ["*"] gives no number '
            "to call from"
        )
    wrong = _wrong_numbers(config, args.to, args.source)
    if wrong is not None:
        print(f"agentd: not calling: {wrong}", file=sys.stderr)
        return EXIT_CONFIG
    unserved = None if args.force else _unserved(config, source, args.config)
    if unserved is not None:
        # the callee would answer to silence: refuse rather than ring a phone for nothing
        print(
            f"agentd: not calling: no running agentd would serve the call: {unserved}. "
            "Pass --force to place it anyway.",
            file=sys.stderr,
        )
        return 1

    async def place() -> int:
        client = make_client(config, tool=True)
        try:
            calls = await client.place_call(source, args.to, config.flow_id)
            if not calls:
                print("agentd: VoIPBIN created no call for that destination", file=sys.stderr)
                return 1
            call_id = str(calls[0].get("id"))
            print(call_id, flush=True)
            if args.wait:
                from agentd.follow import follow

                return await follow(client, call_id)
            return 0
        except ApiError as exc:
            if _may_have_reached(exc):
                print(
                    f"agentd: the call may have been placed: VoIPBIN's answer was lost ({exc}). "
                    "Check before calling again: agentd calls --since 10m (or VoIPBIN's call "
                    "list); calling again may ring the callee twice.",
                    file=sys.stderr,
                )
                return EXIT_CALL_UNKNOWN
            print(f"agentd: call failed, not placed: {exc}", file=sys.stderr)
            return 1
        finally:
            await client.close()

    return asyncio.run(place())


def _hangup(args: argparse.Namespace) -> int:
    """Hang a call up through VoIPBIN. The daemon serving it sees the hangup, as any other,
    and stops its sessions; one that is not running stops them at its next start."""
    from agentd.daemon import make_client
    from agentd.voipbin import ApiError

    config = _load(args.config)
    call_id = args.id.strip()
    if not _CALL_ID.fullmatch(call_id):
        # it goes into the request's path: "../" or a "?" would ask VoIPBIN for something else
        print(f"agentd: not a call id: {call_id!r}", file=sys.stderr)
        return EXIT_CONFIG

    async def hangup() -> int:
        client = make_client(config, tool=True)
        try:
            await client.hangup(call_id)
        except ApiError as exc:
            if exc.status == 404:
                print(f"agentd: no call {call_id} on this account", file=sys.stderr)
            else:
                print(f"agentd: hangup failed: {exc}", file=sys.stderr)
            return 1
        finally:
            await client.close()
        print(f"hung up: {call_id}")
        return 0

    return asyncio.run(hangup())


_CALL_ID = re.compile(r"[0-9A-Za-z][0-9A-Za-z_-]*")


def _may_have_reached(exc: ApiError) -> bool:
    """Whether VoIPBIN may have created the call although the POST failed: a 5xx, or no answer
    after the request went out (a timeout, a dropped connection). Placing a call is not
    idempotent, so the client did not retry it, and the operator must not either blindly.
    A 4xx (and a 429, which the gateway answers before anything runs) is a refusal; a
    connection that never opened (aiohttp's ClientConnector* errors) sent nothing, and neither
    did a request whose login failed (a `LoginError`: the call was never sent)."""
    from agentd.voipbin import LoginError

    if isinstance(exc, LoginError):
        return False
    if exc.status == 0:
        return not exc.reason.startswith("ClientConnector")
    return exc.status >= 500


def _wrong_numbers(config: Config, to: str, source: str | None) -> str | None:
    """Why `--to` / `--from` cannot be called, or None. The same E.164 check as the config's
    numbers: VoIPBIN accepts anything and fails the call later (or dials a number nobody
    meant). A call to one of our own numbers would have the agent talk to itself, on two
    billed legs."""
    from agentd.config import phone_number
    from agentd.names import normalise_number

    for flag, value in (("--to", to), ("--from", source)):
        if value is None:
            continue
        try:
            phone_number(flag, value)
        except ConfigError as exc:
            return str(exc)
    if normalise_number(to) in {normalise_number(n) for n in (*config.numbers, config.caller_id)}:
        return (
            f"--to: {to} is one of agentd's own numbers (agent.numbers or caller_id): "
            "the agent would be calling itself"
        )
    if source is not None and normalise_number(to) == normalise_number(source):
        return f"--to: {to} is the number the call is from (--from)"
    return None


def _unserved(config: Config, source: str, config_arg: str | None) -> str | None:
    """Why no running agentd would serve a call from `source`, or None when one will: the
    source is not one of our numbers, no daemon answers on the status socket, or the one that
    does has lost VoIPBIN (a daemon still making its first connection is let be: it reads the
    account's calls once subscribed)."""
    from agentd.names import normalise_number
    from agentd.status import NotRunning, client_socket, fetch

    ours = {normalise_number(n) for n in config.numbers}  # empty: every call (numbers = ["*"])
    if ours and normalise_number(source) not in ours:
        return f"{source} is not one of agent.numbers ({', '.join(config.numbers)})"
    try:
        path = client_socket(None, _config_path(config_arg))
        if not path:
            return "the status socket is off (status.socket = ''), so no daemon can be seen"
        doc = fetch(path, timeout_s=2.0)
    except NotRunning as exc:
        return str(exc)
    if doc.get("accepting_calls") is False:
        return "the running agentd is shutting down"
    conn = doc.get("connection")
    conn = conn if isinstance(conn, dict) else {}
    state, error = conn.get("state"), conn.get("last_error")
    if state in ("reconnecting", "unauthorised", "forbidden"):
        # it hears of the call only once it is back: the callee would answer to silence
        why = f"{state}; last error: {error}" if error else state
        return f"the running agentd is not connected to VoIPBIN ({why})"
    return None


def _check(config_arg: str | None) -> int:
    """One line per check (config, store, voipbin, backend); 1 if a check failed, 2 for the
    config."""
    from agentd.daemon import make_backend, make_client
    from agentd.secret import display_url
    from agentd.stores import check_store
    from agentd.voipbin import ApiError, LoginError, customer_hint

    config = _load(config_arg)
    api_url = display_url(config.voipbin.api_url)  # config refuses secrets in it; belt and braces
    backend = make_backend(config)  # a python callable that cannot be imported: config error
    _said(f"config: ok ({config.source or 'environment only'})")
    for warning in config.warnings:
        _said(f"config: warning: {warning}")

    async def probe() -> int:
        ok, line = await check_store(config)  # reads the schema version, changes nothing
        _said(f"store: ok ({line})" if ok else f"store: FAILED: {line}")
        failed = not ok
        client = make_client(config, tool=True)
        # kept for the voipbin line: a warning per retry on stderr broke up one line per check
        retries: list[str] = []
        client.retries = retries
        started = time.monotonic()
        try:
            cid = await client.customer_id()
            after = f" (after {_retried(retries)})" if retries else ""
            _said(f"voipbin: ok, customer {cid} at {api_url}{after}")
        except ApiError as exc:
            hint = customer_hint(exc)
            # GET /customer logs in first when it has only a username and password
            failed_request = (
                f"POST {display_url(client.root_url)}/auth/login"
                if isinstance(exc, LoginError)
                else f"GET {api_url}/customer"
            )
            if retries:  # the last attempt's error is the one shown
                took_s = time.monotonic() - started
                failed_request += f", tried {len(retries) + 1} times in {took_s:.1f} s"
            _said(f"voipbin: FAILED: {exc} ({failed_request})")
            if hint:
                _said(f"voipbin: {hint}")
            failed = True
        finally:
            await client.close()
        ok, line = await _probe_backend(config, backend)
        _said(f"backend: ok ({line})" if ok else f"backend: FAILED: {line}")
        return 1 if failed or not ok else 0

    return asyncio.run(probe())


def _retried(reasons: list[str]) -> str:
    """`3 retries: HTTP 503 x2, HTTP 502`: each reason once, in the order first seen."""
    counts = Counter(reasons)
    said = ", ".join(r if n == 1 else f"{r} x{n}" for r, n in counts.items())
    return f"{len(reasons)} {'retry' if len(reasons) == 1 else 'retries'}: {said}"


def _said(line: str) -> None:
    """One line of check-config's report, redacted as a log line is: it quotes errors of the
    store, VoIPBIN and the backend, which may echo a credential."""
    print(redact(line), flush=True)


async def _probe_backend(config: Config, backend: Backend) -> tuple[bool, str]:
    """Ask the backend one tiny question and read only the first chunk of the answer."""
    from agentd.secret import display_url, redact

    b = config.backend
    kind = b.kind
    if kind == "echo":
        return True, "echo, nothing to check"
    if kind == "python":
        return True, f"python {b.callable}, imported"
    url = display_url(b.base_url if kind == "openai" else b.url)
    what = f"openai {b.model} at {url}" if kind == "openai" else f"http {url}"
    timeout_s = b.timeout_s
    started = time.monotonic()
    stream = backend.reply("agentd-check-config", [("user", "ping")])
    try:
        async with asyncio.timeout(timeout_s):
            first = await anext(aiter(stream), None)
    except TimeoutError:
        return False, f"{what}: no answer within {timeout_s:g} s"
    except Exception as exc:  # BackendError texts are safe; anything else is redacted
        return False, redact(str(exc) or type(exc).__name__)
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
        await backend.aclose()
    ms = (time.monotonic() - started) * 1000
    if first is None:
        return True, f"{what}, an empty answer in {ms:.0f} ms"
    return True, f"{what}, first {'token' if kind == 'openai' else 'chunk'} in {ms:.0f} ms"
