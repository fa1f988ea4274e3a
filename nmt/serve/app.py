"""The HTTP app of `nmt serve`: LibreTranslate-compatible routes on FastAPI, served by uvicorn.

`POST /translate`, `GET /languages` and `GET /health` speak LibreTranslate's JSON (and its
form-encoded bodies), so its clients and browser extensions work unchanged; `beam`,
`alpha` and `nbest` are nmt's own extras. Every refusal is `{"error": "..."}` with its
status. What to translate and when is decided in `nmt.serve.service`; this module only parses
and shapes. Needs the optional extra: `pip install 'nmt[serve]'`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qs

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from nmt.errors import NmtError
from nmt.serve.service import ServeError, Service, TranslateRequest
from nmt.translate import LineResult

log = logging.getLogger("nmt.serve")
# clearer than pydantic's own words for these fields
FIELD_ERRORS = {"q": "must be a string or a list of strings", "format": "only 'text' is supported"}


class TranslateBody(BaseModel):
    """LibreTranslate's request fields (`api_key` and unknown fields ignored) and nmt's extras."""

    model_config = ConfigDict(extra="ignore")
    q: str | list[str]
    source: str
    target: str
    format: Literal["text"] = "text"
    alternatives: int = Field(0, ge=0)
    beam: int | None = Field(None, ge=1)
    alpha: float | None = Field(None, ge=0, allow_inf_nan=False)
    nbest: int | None = Field(None, ge=1)


def error(status: int, message: str, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def read_body(request: Request, max_chars: int) -> TranslateBody:
    """JSON strictly typed; form-encoded as LibreTranslate takes it (strings, `q` repeated for a list)."""
    raw = bytearray()
    async for chunk in request.stream():  # a body far beyond --max-chars is refused before it is all read
        raw += chunk
        if len(raw) > 12 * max_chars + 65536:  # one character: up to 12 bytes of JSON escapes
            raise ServeError(413, f"the request body is far larger than {max_chars} characters")
    form = request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded")
    try:
        if form:
            fields = parse_qs(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
            data: Any = {key: values[0] if len(values) == 1 else values for key, values in fields.items()}
        else:
            data = json.loads(raw)
        if not isinstance(data, dict):
            raise ServeError(400, "the request body must be a JSON object")
        return TranslateBody.model_validate(data, strict=not form)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ServeError(400, f"the request body is not valid {'form data' if form else 'JSON'}: {exc}") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = str(first["loc"][0]) if first["loc"] else "body"
        text = first["msg"] if first["type"] == "missing" else FIELD_ERRORS.get(where, first["msg"])
        raise ServeError(400, f"{where}: {text}") from None


def response(body: TranslateBody, results: list[list[LineResult]]) -> dict[str, Any]:
    """LibreTranslate's shape: a string for a string q, a list for a list q; extras only when asked."""
    single = isinstance(body.q, str)

    def shaped(values: list[Any]) -> Any:
        return values[0] if single else values

    out: dict[str, Any] = {"translatedText": shaped(["\n".join(r.best.text for r in lines) for lines in results])}
    if body.alternatives:
        out["alternatives"] = shaped([alternatives(lines, body.alternatives) for lines in results])
    if body.nbest:
        out["nbest"] = shaped([[[{"text": h.text, "score": h.score} for h in r.hypotheses[:body.nbest]] for r in lines]
                               for lines in results])
    notes = [f"line {number}: {note}" for number, note in enumerate(line_warnings(results), 1) if note]
    if notes:
        out["warnings"] = notes
    return out


def alternatives(lines: list[LineResult], count: int) -> list[str]:
    """The k-th alternative of a text: each line's (k+1)-th hypothesis (its last where it has fewer)."""
    return ["\n".join(r.hypotheses[min(k, len(r.hypotheses) - 1)].text for r in lines) for k in range(1, count + 1)]


def line_warnings(results: list[list[LineResult]]) -> list[str | None]:
    """Each line's warning without the batch's line number (the batch mixed requests); numbered per request."""
    return [r.warning.split(": ", 1)[-1] if r.warning else None for lines in results for r in lines]


def create_app(service: Service) -> FastAPI:
    """The routes over one `Service`; its models load in the background when the app starts."""
    app = FastAPI(title="nmt", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:  # 404, 405: still {"error"}
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(ServeError)
    async def refused(request: Request, exc: ServeError) -> JSONResponse:
        return error(exc.status, str(exc), exc.retry_after)

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception) -> JSONResponse:
        log.error("translation failed: %s", exc, exc_info=exc)
        return error(500, f"translation failed: {exc}")

    @app.post("/translate")
    async def translate(request: Request) -> dict[str, Any]:
        body = await read_body(request, service.limits.max_chars)
        texts = [body.q] if isinstance(body.q, str) else body.q
        results = await service.translate(TranslateRequest(texts, body.source, body.target, body.alternatives,
                                                           body.beam, body.alpha, body.nbest))
        return response(body, results)

    @app.get("/languages")
    async def languages() -> list[dict[str, Any]]:
        return service.languages()

    @app.get("/health")
    async def health() -> JSONResponse:
        if service.ready.is_set():
            queued = sum(len(model.queue) for model in service.models.values())
            return JSONResponse({"status": "ready", "models": [str(pair) for pair in service.models], "queued": queued})
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "5"})

    return app


@dataclass(frozen=True)
class Listen:
    """Where the server listens, and how long a shutdown waits for the requests already queued."""

    host: str = "127.0.0.1"
    port: int = 5000
    grace: float = 30.0  # seconds queued requests get to finish after SIGTERM/SIGINT, then 503


class GracefulServer(uvicorn.Server):
    """uvicorn, announcing its address (port 0 picks a free one) and draining the service on shutdown."""

    def __init__(self, config: uvicorn.Config, service: Service, grace: float) -> None:
        super().__init__(config)
        self.service, self.grace = service, grace

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.started and self.servers:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            print(f"nmt serve: listening on http://{host}:{port}", file=sys.stderr, flush=True)

    async def shutdown(self, sockets: Any = None) -> None:
        """New requests get 503, queued ones finish; past `grace` seconds the rest get 503, never a half response."""
        self.service.drain()
        deadline = asyncio.get_running_loop().call_later(self.grace, self.service.abandon)
        try:
            await super().shutdown(sockets)
        finally:
            deadline.cancel()


def serve(service: Service, listen: Listen, device: str, precision: str) -> None:
    """Listen until SIGTERM/SIGINT, loading the models meanwhile; a failed load stops the server."""
    app = create_app(service)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        def loaded(failure: BaseException | None) -> None:
            if failure is not None:  # the command reports it once the server has stopped
                server.should_exit = True
                return
            engines = "; ".join(f"{pair} in {model.engine.precision.describe()}"
                                for pair, model in service.models.items() if model.engine is not None)
            print(f"nmt serve: ready: {engines}", file=sys.stderr, flush=True)

        service.load(device, precision, loaded)
        yield  # shutting down: the batch running now ends before the process does (torch aborts otherwise)
        await asyncio.to_thread(service.join, listen.grace + service.limits.timeout)

    app.router.lifespan_context = lifespan
    config = uvicorn.Config(app, host=listen.host, port=listen.port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=int(listen.grace) + 5, lifespan="on")
    server = GracefulServer(config, service, listen.grace)
    server.run(sockets=[bind(listen.host, listen.port)])


def bind(host: str, port: int) -> socket.socket:
    """Listen before anything loads, so that a taken port or an unknown host is a one-line error.

    The socket is made with `IPPROTO_TCP` named: asyncio sets TCP_NODELAY only on connections
    whose protocol says TCP, and `socket.create_server` leaves it 0. Without TCP_NODELAY every
    response on a kept-alive connection waited ~40 ms for the client's delayed ACK (measured:
    /health 44 ms, a 34 ms translation 88 ms).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        listener.bind((host, port))
        listener.listen(2048)
    except OSError as exc:
        listener.close()
        raise NmtError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return listener
