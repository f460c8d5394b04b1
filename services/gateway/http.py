"""Recommend and ReportEvents over HTTP/JSON (aiohttp), beside the gRPC port: the same
validation and the same engine; JSON field names are the proto's.

    POST /v1/recommend   {"user_id": "196", "count": 10, "scene": "home", "dry_run": true}
    GET  /v1/recommend?user_id=196&count=10          (the same, for curl; no count → the scene's default)
    POST /v1/events      {"events": [{"user_id": "196", "item_id": "50", "type": "EVENT_TYPE_CLICK"}]}
    GET  /healthz        200 when serving, 503 otherwise

With `http_ui` (off by default; `recsys up` turns it on), also the demo page and what it reads:

    GET  /ui             the page (services/gateway/ui/: plain HTML, CSS and JS, no build step)
    GET  /v1/users/{user_id}/history?limit=20   the user's recent history, newest first

Errors: the gRPC status's HTTP equivalent (INVALID_ARGUMENT → 400, UNAUTHENTICATED → 401,
PERMISSION_DENIED → 403, FAILED_PRECONDITION → 412,
RESOURCE_EXHAUSTED → 429, UNAVAILABLE → 503, anything else → 500) with
`{"error": {"code": "INVALID_ARGUMENT", "message": "count: must be in [1, 100], got 500"}}`.

Untrusted clients: the field limits are gRPC's (recsys.limits, checked on the decoded
message); a body is at most `max_body_bytes` (413) and must arrive within `read_timeout`
(408); JSON nested deeper than MAX_JSON_DEPTH is a 400; an `X-Request-Id` header that is not
1 to 128 printable ASCII characters is replaced by a server-made id, so no client byte is ever
echoed into a response header; error messages are cut to a safe length; idle connections and
ones that never finish their headers close after `idle_timeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import Message

from recsys.errors import RecsysError
from recsys.limits import valid_request_id
from recsys.v1 import gateway_pb2
from services.common.auth import CallerAuth, authorize_user, caller_var, ssl_certificate_names
from services.common.errors import safe_message, status_for
from services.common.interceptor import CallGuard
from services.common.logs import new_request_id, request_id_var
from services.common.tracing import Tracing
from services.gateway.engine import GatewayEngine
from services.gateway.events import EventIngestor
from services.gateway.history import UserHistoryHydrator, UserHistoryView
from services.gateway.metrics import gateway_metrics
from services.gateway.servicer import recommend_query, recommend_response, report_events

log = logging.getLogger("recsys.gateway")


class _OncePerWindow(logging.Filter):
    """aiohttp logs every malformed request (bad header bytes, an 8 KB URL) at ERROR with a
    traceback: a client could write the log at will. One line per window is enough to know."""

    def __init__(self, window_seconds: float = 60.0) -> None:
        super().__init__()
        self._window = window_seconds
        self._next = 0.0

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self._window
        record.exc_info = None  # the message says what was wrong; the traceback is aiohttp's
        record.exc_text = None
        return True


_server_log = logging.getLogger("recsys.gateway.http_protocol")
_server_log.addFilter(_OncePerWindow())

_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.FAILED_PRECONDITION: 412,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
}
_QUERY_FIELDS = {"user_id": str, "scene": str, "count": int, "debug": bool, "dry_run": bool}
# The messages are at most three levels deep (events → event → time); anything much deeper is
# an attack on the parser (Python's json recurses, and used to answer a deep body with a 500).
MAX_JSON_DEPTH = 16
HISTORY_DEFAULT_LIMIT = 20
UI_DIR = Path(__file__).resolve().parent / "ui"
# The page's files: route → (file, content type). Read once when the HTTP edge is built.
UI_FILES = {
    "/ui": ("index.html", "text/html"),
    "/ui/app.js": ("app.js", "text/javascript"),
    "/ui/style.css": ("style.css", "text/css"),
}
# The page loads nothing but its own files and calls only this origin; it renders every value
# with textContent, and this forbids inline scripts and framing besides.
UI_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": safe_message(message)}}, status=status)


def _depth_exceeds(value: Any, most: int) -> bool:
    """True when `value` nests lists or objects deeper than `most` (iterative: no recursion)."""
    pending = [(value, 1)]
    while pending:
        current, depth = pending.pop()
        if isinstance(current, dict | list):
            if depth > most:
                return True
            children = current.values() if isinstance(current, dict) else current
            pending.extend((child, depth + 1) for child in children)
    return False


def _json(message: Message, request_id: str) -> web.Response:
    body = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return web.json_response(body, headers={"X-Request-Id": request_id})


class GatewayHttp:
    def __init__(
        self,
        engine: GatewayEngine,
        ingestor: EventIngestor,
        max_events: int,
        serving: Callable[[], bool],
        *,
        max_body_bytes: int = 1024**2,
        read_timeout: float = 5.0,
        idle_timeout: float = 30.0,
        auth: CallerAuth | None = None,
        history: UserHistoryHydrator | None = None,
    ) -> None:
        self._auth = auth
        self._history = history
        self._engine = engine
        self._ingestor = ingestor
        self._max_events = max_events
        self._serving = serving
        self._read_timeout = read_timeout
        self._idle_timeout = idle_timeout
        self.app = web.Application(
            middlewares=[self._measured, self._errors, self._authenticated], client_max_size=max_body_bytes
        )
        self.app.router.add_post("/v1/recommend", self._recommend)
        self.app.router.add_get("/v1/recommend", self._recommend)
        self.app.router.add_post("/v1/events", self._events)
        self.app.router.add_get("/healthz", self._health)
        self._ui_files: dict[str, tuple[bytes, str]] = {}
        if history is not None:  # the page and its data go together: off unless both are on
            self.app.router.add_get("/v1/users/{user_id}/history", self._user_history)
            for route, (name, content_type) in UI_FILES.items():
                self._ui_files[route] = ((UI_DIR / name).read_bytes(), content_type)
                self.app.router.add_get(route, self._ui_file)
        self._runner: web.AppRunner | None = None
        self.port: int | None = None
        self.guard: CallGuard | None = None  # the gRPC port's admission, shared (see attach_guard)

    def attach_tracing(self, tracing: Tracing) -> None:
        """A server span per request, outermost (before start: aiohttp freezes the list then)."""
        self.app.middlewares.insert(0, tracing.http_middleware())

    def _slot(self) -> contextlib.AbstractAsyncContextManager[None]:
        # HTTP carries no deadline: the admission policy's default applies.
        return self.guard.slot(None) if self.guard is not None else contextlib.nullcontext()

    async def start(
        self, host: str, port: int, reuse_port: bool = False, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        # aiohttp's keep-alive timer also runs from the moment a connection opens, so it closes
        # connections that never complete a request (its default is an hour).
        self._runner = web.AppRunner(
            self.app, access_log=None, keepalive_timeout=self._idle_timeout, logger=_server_log
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_port=reuse_port or None, ssl_context=ssl_context)
        await site.start()
        server = site._server  # aiohttp exposes the bound port only through the server's sockets
        sockets = getattr(server, "sockets", None) or []
        self.port = int(sockets[0].getsockname()[1]) if sockets else port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _measured(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Requests and latency by route and status, like grpc_server_handled_total and
        grpc_server_handling_seconds on the gRPC port (routes, not raw paths: bounded labels)."""
        route = request.match_info.route.resource
        name = route.canonical if route is not None else "unmatched"
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as error:
            status = error.status
            raise
        finally:
            metrics = gateway_metrics()
            metrics.http_requests.labels(name, request.method, str(status)).inc()
            metrics.http_seconds.labels(name, request.method).observe(time.perf_counter() - started)

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        given = request.headers.get("X-Request-Id", "")
        request_id = given if valid_request_id(given) else new_request_id()
        request_id_var.set(request_id)
        try:
            return await handler(request)
        except RecsysError as error:
            code = status_for(error)
            response = _error(_HTTP_STATUS.get(code, 500), code.name, str(error))
            if code is grpc.StatusCode.UNAUTHENTICATED:
                response.headers["WWW-Authenticate"] = 'Bearer realm="recsys"'
            return response
        except web.HTTPException:
            raise
        except Exception:
            log.exception("HTTP %s %s failed", request.method, request.path)
            return _error(500, "INTERNAL", f"internal error (request id {request_id})")

    @web.middleware
    async def _authenticated(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """The gRPC port's authentication and rate limit (one `CallerAuth` for both);
        /healthz stays open for probes, and the page's own files (no data in them: the page
        asks for a token and sends it on its calls). Errors become 401/429 in `_errors`."""
        if self._auth is None or request.path == "/healthz" or request.path in self._ui_files:
            return await handler(request)
        peercert = request.transport.get_extra_info("peercert") if request.transport else None
        caller = self._auth.admit(request.headers.get("Authorization"), ssl_certificate_names(peercert))
        caller_var.set(caller)
        return await handler(request)

    async def _body(self, request: web.Request, message: Message) -> None:
        """Fill `message` from the JSON body (POST) or the query string (GET)."""
        if request.method == "GET":
            values: dict[str, Any] = {}
            for name, value in request.query.items():
                kind = _QUERY_FIELDS.get(name)
                if kind is None:
                    raise _BadRequest(name, f"unknown parameter (known: {', '.join(_QUERY_FIELDS)})")
                try:
                    values[name] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
                except ValueError:
                    raise _BadRequest(name, f"expected {kind.__name__}, got {value!r}") from None
        else:
            try:
                async with asyncio.timeout(self._read_timeout):
                    raw = await request.read()
            except TimeoutError:
                raise web.HTTPRequestTimeout(
                    text=json.dumps(
                        {"error": {"code": "DEADLINE_EXCEEDED", "message": "body: sent too slowly"}}
                    ),
                    content_type="application/json",
                ) from None
            try:
                values = json.loads(raw)
            except RecursionError:
                raise _BadRequest("body", f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
            except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, a 5,000-digit integer
                raise _BadRequest("body", f"not JSON: {error}") from None
            if not isinstance(values, dict):
                raise _BadRequest("body", "expected a JSON object")
            if _depth_exceeds(values, MAX_JSON_DEPTH):
                raise _BadRequest("body", f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        try:
            json_format.ParseDict(values, message)
        except (json_format.ParseError, ValueError, TypeError, RecursionError) as error:
            raise _BadRequest("body", str(error)) from None

    async def _recommend(self, request: web.Request) -> web.Response:
        message = gateway_pb2.RecommendRequest()
        try:
            await self._body(request, message)
        except _BadRequest as error:
            return error.response()
        async with self._slot():
            result = await self._engine.recommend(recommend_query(message, None))
        request_id = message.request_id or request_id_var.get()
        return _json(recommend_response(result, request_id), request_id)

    async def _events(self, request: web.Request) -> web.Response:
        message = gateway_pb2.ReportEventsRequest()
        try:
            await self._body(request, message)
        except _BadRequest as error:
            return error.response()
        async with self._slot():
            response = await report_events(self._ingestor, message, self._max_events)
        return _json(response, request_id_var.get())

    async def _user_history(self, request: web.Request) -> web.Response:
        assert self._history is not None  # the route exists only with a hydrator
        user_id = request.match_info["user_id"]
        limit = min(HISTORY_DEFAULT_LIMIT, self._history.max_entries)
        for name, value in request.query.items():
            if name != "limit":
                return _BadRequest(name, "unknown parameter (known: limit)").response()
            try:
                limit = int(value)  # out of [1, max] → the hydrator's 400 naming `limit`
            except ValueError:
                return _BadRequest("limit", f"expected int, got {value!r}").response()
        self._history.validate(user_id, limit)
        # The same rule as Recommend: a caller acting for one user may read only that user's.
        authorize_user(user_id, "user_id")
        async with self._slot():
            view = await self._history.read(user_id, limit)
        return web.json_response(_history_json(view), headers={"X-Request-Id": request_id_var.get()})

    async def _ui_file(self, request: web.Request) -> web.Response:
        body, content_type = self._ui_files[request.path]
        return web.Response(body=body, content_type=content_type, charset="utf-8", headers=UI_HEADERS)

    async def _health(self, request: web.Request) -> web.Response:
        serving = self._serving()
        return web.json_response(
            {"status": "SERVING" if serving else "NOT_SERVING"}, status=200 if serving else 503
        )


def _history_json(view: UserHistoryView) -> dict[str, Any]:
    return {
        "user_id": view.user_id,
        "model_version": view.model_version,
        "known_user": view.known_user,
        "more": view.more,
        "degraded_reasons": view.degraded,
        "entries": [
            {
                "item_id": entry.item_id,
                "title": entry.title,
                "kind": entry.kind,
                "time": None if entry.time is None else _rfc3339(entry.time),
                "rating": entry.rating,
                "live": entry.live,
            }
            for entry in view.entries
        ],
    }


def _rfc3339(unix_seconds: float) -> str | None:
    """As protobuf's JSON writes a Timestamp (UTC, `Z`), whole seconds; None past what a
    datetime holds (a data set's time column may say anything)."""
    try:
        return datetime.fromtimestamp(unix_seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return None


class _BadRequest(Exception):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")

    def response(self) -> web.Response:
        return _error(400, "INVALID_ARGUMENT", str(self))
