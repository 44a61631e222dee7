"""The console's web app: one page, its event stream and a JSON snapshot, on 127.0.0.1 only.

Every route needs the random token printed at start (in the URL as `?token=`, or as
`Authorization: Bearer`): without it the answer is 401, with a wrong one 403. Requests must name
127.0.0.1 or localhost as their host, so a web page elsewhere cannot reach the console by DNS
rebinding. The page gets the state by server-sent events: a full snapshot whenever it changed,
a comment every 15 s to keep proxies and browsers from closing an idle stream, and an `end`
event when the console stops (a simulation's job has ended).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

STATIC = Path(__file__).parent / "static"
HOST = "127.0.0.1"  # never configurable: the console shows privacy spend and is for this machine only
ASSETS = {
    "chart.umd.min.js": "text/javascript",
    "console.js": "text/javascript",
    "console.css": "text/css",
}
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",  # the token is in the URL: never hand it to another site
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
}


def new_token() -> str:
    return secrets.token_urlsafe(24)


class Console:
    """The state behind the page: `snapshot()` of a job source, recomputed at most every `interval` s."""

    def __init__(self, snapshot: Callable[[], dict], token: str | None = None, interval: float = 0.5,
                 keepalive: float = 15.0):
        self.snapshot = snapshot
        self.token = token or new_token()
        self.interval = interval
        self.keepalive = keepalive
        self.closing = threading.Event()
        self._lock = threading.Lock()
        self._cached: tuple[float, str, str] = (0.0, "", "")  # (when, json, digest)
        self.delivered: dict[int, str] = {}  # open streams -> digest of the last state each was sent

    def current(self) -> tuple[str, str]:
        """(state as JSON, its digest); cheap to call often, only one caller recomputes."""
        with self._lock:
            when, text, digest = self._cached
            if not text or time.monotonic() - when >= self.interval:
                text = json.dumps(self.snapshot(), default=str, allow_nan=False)
                digest = hashlib.sha256(text.encode()).hexdigest()[:16]
                self._cached = (time.monotonic(), text, digest)
            return text, digest

    def close(self, wait: float = 3.0) -> None:
        """Stop the streams, after each has been sent the final state (for at most `wait` s)."""
        with self._lock:
            self._cached = (0.0, "", "")
        _, final = self.current()
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(d != final for d in list(self.delivered.values())):
            time.sleep(0.05)
        self.closing.set()

    # -- auth -----------------------------------------------------------------------------------

    def refused(self, request: Request) -> Response | None:
        given = request.query_params.get("token")
        header = request.headers.get("authorization", "")
        if given is None and header.lower().startswith("bearer "):
            given = header[7:].strip()
        if not given:
            return PlainTextResponse("401: this console needs the token printed when it started (?token=...)\n",
                                     status_code=401, headers={"WWW-Authenticate": "Bearer", **SECURITY_HEADERS})
        if not secrets.compare_digest(given.encode(), self.token.encode()):
            return PlainTextResponse("403: wrong token\n", status_code=403, headers=SECURITY_HEADERS)
        return None

    # -- routes ---------------------------------------------------------------------------------

    async def page(self, request: Request) -> Response:
        if (refusal := self.refused(request)) is not None:
            return refusal
        html = (STATIC / "index.html").read_text(encoding="utf-8").replace("__TOKEN__", self.token)
        return HTMLResponse(html, headers=SECURITY_HEADERS)

    async def asset(self, request: Request) -> Response:
        if (refusal := self.refused(request)) is not None:
            return refusal
        name = request.path_params["name"]
        if name not in ASSETS:
            return PlainTextResponse("404\n", status_code=404, headers=SECURITY_HEADERS)
        return FileResponse(STATIC / name, media_type=ASSETS[name], headers=SECURITY_HEADERS)

    async def state(self, request: Request) -> Response:
        if (refusal := self.refused(request)) is not None:
            return refusal
        text, _ = await asyncio.to_thread(self.current)
        return Response(text, media_type="application/json", headers=SECURITY_HEADERS)

    async def events(self, request: Request) -> Response:
        if (refusal := self.refused(request)) is not None:
            return refusal
        return StreamingResponse(self._stream(request), media_type="text/event-stream",
                                 headers={**SECURITY_HEADERS, "X-Accel-Buffering": "no"})

    async def _stream(self, request: Request):
        stream = id(request)
        sent, last_write = "", time.monotonic()
        self.delivered[stream] = ""
        try:
            yield "retry: 2000\n\n"
            while True:
                closing = self.closing.is_set()
                text, digest = await asyncio.to_thread(self.current)
                if digest != sent:
                    yield f"event: state\nid: {digest}\ndata: {text}\n\n"
                    sent, last_write = digest, time.monotonic()
                    self.delivered[stream] = digest
                if closing:
                    yield "event: end\ndata: {}\n\n"
                    return
                if time.monotonic() - last_write >= self.keepalive:
                    yield ": keep-alive\n\n"
                    last_write = time.monotonic()
                if await request.is_disconnected():
                    return
                await asyncio.sleep(min(self.interval, 0.25))
        finally:
            self.delivered.pop(stream, None)

    def app(self) -> Starlette:
        routes = [
            Route("/", self.page),
            Route("/events", self.events),
            Route("/api/state", self.state),
            Route("/static/{name}", self.asset),
        ]
        return Starlette(routes=routes, middleware=[
            Middleware(TrustedHostMiddleware, allowed_hosts=[HOST, "localhost"]),
        ])


def bind(port: int = 0) -> socket.socket:
    """A listening socket on 127.0.0.1 (port 0: a free one)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, port))
    sock.listen(64)
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server; on Ctrl-C or SIGTERM the event streams end first, so it stops at once."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]):
        super().__init__(config)
        self.on_exit = on_exit

    def handle_exit(self, sig, frame) -> None:
        self.on_exit()
        super().handle_exit(sig, frame)


class ConsoleServer:
    """uvicorn serving a `Console` on 127.0.0.1; in the foreground (`run`) or a thread (`start`)."""

    def __init__(self, console: Console, port: int = 0):
        self.console = console
        self.sock = bind(port)
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(console.app(), log_level="warning", access_log=False, lifespan="off", ws="none",
                                timeout_graceful_shutdown=3, timeout_keep_alive=5)
        self.server = _Server(config, console.closing.set)
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/?token={self.console.token}"

    def run(self) -> None:
        """Serve until Ctrl-C or SIGTERM (uvicorn's own handlers, in the main thread)."""
        try:
            self.server.run(sockets=[self.sock])
        finally:
            self.console.closing.set()
            self.sock.close()

    def start(self) -> ConsoleServer:
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="fedtune-console", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        return self

    def stop(self, wait: float = 3.0) -> None:
        """Send every open page the final state, end its stream, and stop serving."""
        self.console.close(wait)
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=10)
        self.sock.close()
