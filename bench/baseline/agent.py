"""A VoIPBIN voice agent the way the tutorial builds it: a webhook handler with blocking HTTP.

VoIPBIN POSTs every event to the webhook. When a call is answered the handler starts a transcribe
and a speaking session and says the greeting; for each caller transcript it asks the LLM for the
whole reply (no streaming), flushes the speaking session and says the reply; at hangup it stops
both sessions. Every HTTP call blocks the handler thread (standard library only, like the
tutorial's `requests` code).

With `--echo` the reply is "You said: <text>." without any LLM request (agentd's `echo` backend
says the same), so the bench can time the design's own cost per turn beside agentd's; everything
else (the handler, blocking HTTP, `/flush` then `/say`) is unchanged.

    python -m bench.baseline.agent --api URL --accesskey KEY --llm URL --port 0
    python -m bench.baseline.agent --api URL --accesskey KEY --echo --port 0
"""

from __future__ import annotations

import argparse
import json
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

GREETING = "Hello, thank you for calling. How can I help you today?"


class Agent:
    """State of the tutorial agent: sessions per call, and the conversation so far."""

    def __init__(self, api: str, accesskey: str, llm: str | None) -> None:
        self.api = api
        self.accesskey = accesskey
        #: The LLM's chat completions URL; ``None`` echoes the caller instead (zero latency).
        self.llm = llm
        self.lock = threading.Lock()
        self.calls: dict[str, dict[str, Any]] = {}
        self.by_transcribe: dict[str, str] = {}

    def rest(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            f"{self.api}{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json", "Cookie": f"accesskey={self.accesskey}"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else {}

    def ask_llm(self, messages: list[dict[str, str]]) -> str:
        """The whole reply to the conversation so far (blocks until the model is done)."""
        if self.llm is None:  # --echo: agentd's echo backend's reply, no model at all
            return f"You said: {messages[-1]['content'].rstrip('.!? ')}."
        body = json.dumps({"model": "stub", "messages": messages}).encode()
        req = urllib.request.Request(
            self.llm, data=body, method="POST", headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            answer = json.loads(resp.read())
        return str(answer["choices"][0]["message"]["content"])

    def on_event(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "call_progressing":
            self.answered(str(data["id"]))
        elif kind == "transcript_created" and data.get("direction") == "in":
            with self.lock:
                call_id = self.by_transcribe.get(str(data.get("transcribe_id")))
            if call_id is not None:
                self.transcript(call_id, str(data.get("message", "")))
        elif kind == "call_hangup":
            self.hungup(str(data["id"]))

    def answered(self, call_id: str) -> None:
        trn = self.rest(
            "POST",
            "/transcribes",
            {
                "reference_type": "call",
                "reference_id": call_id,
                "language": "en-US",
                "direction": "in",
            },
        )
        spk = self.rest(
            "POST",
            "/speakings",
            {
                "reference_type": "call",
                "reference_id": call_id,
                "language": "en-US",
                "provider": "elevenlabs",
                "voice_id": "21m00Tcm4TlvDq8ikWAM",
                "direction": "out",
            },
        )
        with self.lock:
            self.calls[call_id] = {
                "speaking": spk["id"],
                "transcribe": trn["id"],
                "messages": [{"role": "assistant", "content": GREETING}],
            }
            self.by_transcribe[trn["id"]] = call_id
        self.rest("POST", f"/speakings/{spk['id']}/say", {"text": GREETING})

    def transcript(self, call_id: str, text: str) -> None:
        with self.lock:
            call = self.calls[call_id]
            call["messages"].append({"role": "user", "content": text})
            messages = list(call["messages"])
        reply = self.ask_llm(messages)  # waits for the whole reply
        with self.lock:
            call["messages"].append({"role": "assistant", "content": reply})
        self.rest("POST", f"/speakings/{call['speaking']}/flush")
        self.rest("POST", f"/speakings/{call['speaking']}/say", {"text": reply})

    def hungup(self, call_id: str) -> None:
        with self.lock:
            call = self.calls.pop(call_id, None)
        if call is None:
            return
        self.rest("POST", f"/speakings/{call['speaking']}/stop")
        self.rest("POST", f"/transcribes/{call['transcribe']}/stop")


def serve(agent: Agent, port: int) -> ThreadingHTTPServer:
    """The webhook endpoint: handle the event, then answer 200 (as the tutorial's handler does)."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            event = json.loads(self.rfile.read(length))
            try:
                agent.on_event(str(event.get("type")), event.get("data") or {})
            finally:
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    class Server(ThreadingHTTPServer):
        # socketserver listens with a backlog of 5; the tutorial's app runs under a web server
        # (gunicorn, uvicorn: 2048). With 5, a burst of webhooks overflows the accept queue and
        # the kernel's SYN retries (1 s) would be measured, not the agent's design.
        request_queue_size = 2048

    return Server(("127.0.0.1", port), Handler)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline.agent")
    parser.add_argument("--api", required=True)
    parser.add_argument("--accesskey", required=True)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--llm", help="the LLM's chat completions URL (OpenAI-compatible)")
    mode.add_argument(
        "--echo", action="store_true", help='reply "You said: <text>." with no LLM request'
    )
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    server = serve(Agent(args.api, args.accesskey, None if args.echo else args.llm), args.port)
    print(f"webhook url: http://127.0.0.1:{server.server_address[1]}/webhook", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
