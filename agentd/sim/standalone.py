"""``agentd sim``: run the simulator on its own until SIGINT/SIGTERM.

Prints the API URL, the WebSocket URL, the customer id, an access key, a ready JWT and a hint on the
``/_sim/`` control API, one per line.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import signal
import sys

from agentd import logs
from agentd.sim.settings import SimSettings
from agentd.sim.simulator import Simulator


def _port(text: str) -> int:
    """A TCP port, 0 to 65535: the socket's own check comes after start, as a traceback."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port (0 to 65535; 0 = any free one)")
    return port


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def _speed(text: str) -> float:
    """A rate above 0: a rate of 0 would divide by zero in the middle of a call."""
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not above 0")
    return value


def _scale(text: str) -> float:
    """A factor of 0 or more (0: no latency at all); a negative delay makes no sense."""
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agentd sim", description="Run a local VoIPBIN simulator (REST + WebSocket)."
    )
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=_port, default=8099, help="port (default 8099); 0 = any free port"
    )
    parser.add_argument(
        "--no-rate-limit", action="store_true", help="disable the per-customer rate limit"
    )
    parser.add_argument(
        "--playback-chars-per-s",
        type=_speed,
        default=SimSettings.playback_chars_per_s,
        help="TTS playback speed in characters per second",
    )
    parser.add_argument(
        "--speech-words-per-s",
        type=_speed,
        default=SimSettings.speech_words_per_s,
        help="how fast simulated callers speak, in words per second",
    )
    parser.add_argument(
        "--latency-scale",
        type=_scale,
        default=1.0,
        help="multiply the service's TTS/STT latencies (1: as measured; 0.05 for benchmarks)",
    )
    return parser


async def _run(args: argparse.Namespace) -> None:
    settings = SimSettings(
        rate_limit=not args.no_rate_limit,
        playback_chars_per_s=args.playback_chars_per_s,
        speech_words_per_s=args.speech_words_per_s,
    ).scaled(args.latency_scale)
    sim = Simulator(settings)
    try:
        await sim.start(host=args.host, port=args.port)
    except OSError as exc:
        await sim.stop()
        raise ListenError(
            f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc} "
            "(another one runs there? pick a port with --port, 0 for any free one)"
        ) from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        print(f"api url:      {sim.api_url}")
        print(f"ws url:       {sim.ws_url}")
        print(f"customer id:  {sim.customer_id}")
        print(f"access key:   {sim.accesskey}")
        print(f"jwt:          {sim.make_token()}")
        print(
            f"control api:  {sim.base_url}/_sim/ (POST /_sim/calls to ring the agent, "
            "POST /_sim/outbound for how the next call it places is answered, "
            "GET /_sim/calls/<id> for the conversation)",
        )
        print(
            f'agentd:       [voipbin] api_url = "{sim.api_url}", '
            f'accesskey = "{sim.accesskey}"; [agent] numbers = ["+15551234567"]',
            flush=True,
        )
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await sim.stop()


class ListenError(Exception):
    """The simulator cannot listen where it was told (the message is the line to print)."""


def main(argv: list[str]) -> int:
    """Parse ``argv`` (without the program name), serve until a signal; exit status 0, or 1
    when it cannot listen."""
    args = _parser().parse_args(argv)
    # stdout is the banner a program reads (the URLs, the key): log lines go to stderr
    logs.configure(stream=sys.stderr)
    try:
        asyncio.run(_run(args))
    except ListenError as exc:
        print(f"agentd sim: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
