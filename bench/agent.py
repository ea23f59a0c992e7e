"""agentd with a bench backend that streams from an OpenAI-compatible server (SSE).

Used while agentd has no `openai` backend kind of its own: the same Daemon as `agentd run`, the
same logging, only the backend object is injected. It reads the stream the way any OpenAI client
does (one `data:` line per chunk, `choices[0].delta.content`, `[DONE]`).

    python -m bench.agent --config agentd.toml --llm http://127.0.0.1:PORT/v1/chat/completions
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import AsyncIterator, Sequence

import aiohttp

from agentd import logs
from agentd.commands import Message
from agentd.config import load
from agentd.daemon import Daemon


class StreamingBackend:
    """Chat Completions with `"stream": true`, yielding each content delta as it arrives."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._session: aiohttp.ClientSession | None = None

    async def reply(self, call_id: str, history: Sequence[Message]) -> AsyncIterator[str]:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        body = {
            "model": "stub",
            "stream": True,
            "messages": [{"role": role, "content": text} for role, text in history],
        }
        async with self._session.post(self.url, json=body) as resp:
            resp.raise_for_status()
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    return
                delta = json.loads(data)["choices"][0].get("delta", {})
                text = delta.get("content")
                if text:
                    yield text

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.agent")
    parser.add_argument("--config", required=True)
    parser.add_argument("--llm", required=True, help="chat completions URL")
    args = parser.parse_args()
    config = load(args.config)
    logs.configure(config.log_level, config.log_format)

    async def serve() -> None:
        daemon = Daemon(config, backend=StreamingBackend(args.llm))
        daemon.install_signal_handlers()
        await daemon.run()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
