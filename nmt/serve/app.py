"""The HTTP app of `nmt serve`: LibreTranslate-compatible routes on FastAPI.

`POST /translate`, `GET /languages` and `GET /health` speak LibreTranslate's JSON (and its
form-encoded bodies), so its clients and browser extensions work unchanged; `beam`,
`alpha` and `nbest` are nmt's own extras. Every refusal is `{"error": "..."}` with its
status and one line in the log, never a traceback; a 500 says only that it is one. What to
translate and when is decided in `nmt.serve.service`, how a body is read in
`nmt.serve.body`; this module routes and shapes. Needs the optional extra: `pip install 'nmt[serve]'`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from nmt.serve.body import TranslateBody, read_fields, validate
from nmt.serve.keys import ApiKeys
from nmt.serve.service import ServeError, Service, TranslateRequest
from nmt.translate import LineResult

log = logging.getLogger("nmt.serve")


def error(status: int, message: str, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def refused(request: Request, status: int, message: str, retry_after: int | None = None) -> JSONResponse:
    """A failed request: its one log line and its JSON answer."""
    client = f"{request.client.host} " if request.client else ""
    log.warning("nmt serve: %s%s %s: %d %s", client, request.method, request.url.path, status, message)
    return error(status, message, retry_after)


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


async def translate(request: Request, service: Service, keys: ApiKeys | None) -> dict[str, Any]:
    """One /translate request: read, authorised (before any field is judged), checked, queued, shaped."""
    fields, typed = await read_fields(request, service.limits.max_chars, service.limits.timeout)
    if keys is not None:
        key = fields.get("api_key", "")
        keys.check(key if isinstance(key, str) else "")
    body = validate(fields, typed)
    texts = [body.q] if isinstance(body.q, str) else body.q
    results = await service.translate(TranslateRequest(texts, body.source, body.target, body.alternatives,
                                                       body.beam, body.alpha, body.nbest))
    return response(body, results)


def create_app(service: Service, keys: ApiKeys | None = None, cors_origins: Sequence[str] = ()) -> FastAPI:
    """The routes over one `Service`; with `keys`, /translate needs one; `cors_origins` may call it from pages."""
    app = FastAPI(title="nmt", docs_url=None, redoc_url=None, openapi_url=None)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Content-Type"])

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:  # 404, 405: still {"error"}
        return refused(request, exc.status_code, str(exc.detail))

    @app.post("/translate", response_model=None)
    async def translate_route(request: Request) -> dict[str, Any] | JSONResponse:
        try:
            return await translate(request, service, keys)
        except ServeError as exc:
            return refused(request, exc.status, str(exc), exc.retry_after)
        except Exception as exc:  # a bug: its name in the log, nothing of it in the answer
            refused(request, 500, f"{type(exc).__name__}: {exc}")
            return error(500, "translation failed: an internal error (the server's log says which)")

    @app.get("/languages")
    async def languages() -> list[dict[str, Any]]:
        return service.languages()

    @app.get("/health")
    async def health() -> JSONResponse:
        if service.ready.is_set():
            queued = sum(len(queue) for model in service.models.values() for queue in model.queues)
            return JSONResponse({"status": "ready", "models": [str(pair) for pair in service.models], "queued": queued})
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "5"})

    return app
