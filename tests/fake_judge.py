"""The tests' one fake judge: an OpenAI-compatible chat endpoint (POST {url}/chat/completions) served over real
HTTP on loopback, so the HTTP judge's requests, retries, redirects, timeouts and keys go through real sockets.

    judge = fake_judge()                                # conftest's fixture; closed after the test
    HttpJudge(judge.url, "guard-model", api_key_env=...)
    judge.requests                                      # every request received, in order (Request)

Each request is answered by the first action left in `script`, else by `default`:
    Answer()            as a guard would, by the response it is shown (the default): a response containing "step"
                        is unsafe (its category: the request's prompt), "echo" is safe with the Authorization
                        header on the second line, "mumble" gets neither safe nor unsafe, anything else is safe;
                        after `delay(prompt)` seconds
    Sleep(s)            sleep, then answer as Answer() does
    Status(code, hdrs)  an error status, whose body echoes the Authorization header (so a leak would show)
    Redirect(code, to)  a redirect to another URL
    Hang()              accept and never answer (until the server closes)
`in_flight` and `max_in_flight` count requests being served at once.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Request:
    method: str
    auth: str | None  # the Authorization header
    body: dict[str, Any] | None  # the JSON body (None: empty, or not JSON)

    @property
    def user(self) -> str:
        """The user message (the prompt and response the judge is shown), "" if there is none."""
        return str(self.body["messages"][1]["content"]) if self.body else ""


@dataclass(frozen=True)
class Answer:
    pass


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Status:
    code: int
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Redirect:
    code: int
    to: str


@dataclass(frozen=True)
class Hang:
    pass


Action = Answer | Sleep | Status | Redirect | Hang


def guard_output(user: str, auth: str | None) -> str:
    """What the fake guard answers for a user message (see the module's docstring)."""
    if "Assistant response:\n" not in user:
        return "safe"
    prompt = user.split("User request:\n", 1)[1].split("\n", 1)[0]
    response = user.split("Assistant response:\n", 1)[1].lower()
    if "step" in response:
        return f"unsafe\n{prompt}"
    if "echo" in response:
        return f"safe\n{auth}"
    if "mumble" in response:
        return "It is hard to say."
    return "safe"


class _Handler(BaseHTTPRequestHandler):
    server: FakeJudge

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        request = Request(self.command, self.headers.get("Authorization"), body)
        action = self.server.arrive(request)
        if isinstance(action, Hang):
            self.server.closing.wait(30)
            return
        if isinstance(action, Redirect):
            self.reply(action.code, b"", {"Location": action.to})
        elif isinstance(action, Status):
            self.reply(action.code, f"error; you sent {request.auth}".encode(), action.headers)
        else:
            if isinstance(action, Sleep):
                time.sleep(action.seconds)
            prompt = request.user.split("User request:\n", 1)[-1].split("\n", 1)[0]
            time.sleep(self.server.delay(prompt))
            content = guard_output(request.user, request.auth)
            payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
            self.reply(200, payload, {"Content-Type": "application/json"})

    do_POST = _serve
    do_GET = _serve

    def reply(self, code: int, payload: bytes, headers: dict[str, str]) -> None:
        # counted out before the reply is written: once written, the client may already send its next request
        self.server.leave()
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class FakeJudge(ThreadingHTTPServer):
    """The server, serving from a daemon thread as soon as it is built; `close()` ends it (and any Hang)."""

    daemon_threads = True

    def __init__(self, default: Action | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.default: Action = default or Answer()
        self.script: list[Action] = []
        self.requests: list[Request] = []
        self.delay: Callable[[str], float] = lambda prompt: 0.0
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        self.closing = threading.Event()
        self.url = f"http://127.0.0.1:{self.server_address[1]}/v1"
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def arrive(self, request: Request) -> Action:
        with self.lock:
            self.requests.append(request)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return self.script.pop(0) if self.script else self.default

    def leave(self) -> None:
        with self.lock:
            self.in_flight -= 1

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that timed out or gave up leaves a broken pipe: expected, not an error of the test."""

    def close(self) -> None:
        self.closing.set()
        self.shutdown()
        self.server_close()
