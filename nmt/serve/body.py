"""What `POST /translate` accepts and how its body is read: LibreTranslate's fields, as JSON or
as the form encodings its clients send (`application/x-www-form-urlencoded`, and
`multipart/form-data`, parsed by python-multipart, the parser FastAPI itself uses).

Any other content type is 415: `text/plain` is what a web page may POST to a local server
without a CORS preflight, and nothing legitimate sends it. Every mistake is a `ServeError`
whose message names the field where there is one: bytes that are not UTF-8 (in JSON, or
percent-encoded in a form), lone surrogates (`"\\ud800"`), integers of thousands of digits,
brackets nested past the parser's depth. JSON fields are strictly typed; form fields arrive
as strings, as LibreTranslate takes them (`q` repeated for a list).
"""

from __future__ import annotations

import asyncio
import io
import json
import math
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote_plus

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import ClientDisconnect, Request

from nmt.serve.service import ServeError

FORM, MULTIPART, JSON = "application/x-www-form-urlencoded", "multipart/form-data", "application/json"
MAX_DIGITS = 100  # an integer beyond this is no count the server takes (and Python refuses 4,300 digits)
# clearer than pydantic's own words for these fields
FIELD_ERRORS = {"q": "must be a string or a list of strings", "format": "only 'text' is supported"}


class TranslateBody(BaseModel):
    """LibreTranslate's request fields (unknown fields ignored) and nmt's extras."""

    model_config = ConfigDict(extra="ignore")
    q: str | list[str]
    source: str
    target: str
    format: Literal["text"] = "text"
    alternatives: int = Field(0, ge=0)
    beam: int | None = Field(None, ge=1)
    alpha: float | None = Field(None, ge=0, allow_inf_nan=False)
    nbest: int | None = Field(None, ge=1)
    api_key: str = ""  # checked only where the server was given --api-keys


def media_type(request: Request) -> str:
    """The request's content type if the server accepts it, else 415."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in (JSON, FORM, MULTIPART):
        raise ServeError(415, f"content type {kind or '(none)'} is not accepted: send {JSON} "
                              f"(or {FORM} or {MULTIPART}, as LibreTranslate's clients do)")
    return kind


async def read_raw(request: Request, max_chars: int, timeout: float) -> bytes:
    """The whole body, refused once far beyond `max_chars` (before it is all read) or slower than `timeout`."""
    raw = bytearray()
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                raw += chunk
                if len(raw) > 12 * max_chars + 65536:  # one character: up to 12 bytes of JSON escapes
                    raise ServeError(413, f"the request body is far larger than {max_chars} characters")
    except TimeoutError:
        raise ServeError(408, f"the request body did not arrive within {timeout:g} s") from None
    except ClientDisconnect:
        raise ServeError(400, "the client disconnected before sending its whole request") from None
    return bytes(raw)


async def read_fields(request: Request, max_chars: int, timeout: float) -> tuple[dict[str, Any], bool]:
    """The body's fields, and whether they are typed (JSON) or strings (forms); the content type is
    checked first, before anything is read."""
    kind = media_type(request)
    raw = await read_raw(request, max_chars, timeout)
    if kind == JSON:
        data = parse_json(raw)
    elif kind == FORM:
        data = parse_form(raw)
    else:
        data = parse_multipart(raw, request.headers["content-type"])
    if not isinstance(data, dict):
        raise ServeError(400, "the request body must be a JSON object")
    return data, kind == JSON


def validate(data: dict[str, Any], typed: bool) -> TranslateBody:
    """The fields checked and typed (strictly where they came `typed`, as JSON); the first mistake, named, is a 400."""
    try:
        body = TranslateBody.model_validate(data, strict=typed)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = str(first["loc"][0]) if first["loc"] else "body"
        text = first["msg"] if first["type"] == "missing" else FIELD_ERRORS.get(where, first["msg"])
        raise ServeError(400, f"{where}: {text}") from None
    for name in ("source", "target", "api_key"):
        check_unicode(name, getattr(body, name))
    for text in [body.q] if isinstance(body.q, str) else body.q:
        check_unicode("q", text)
    return body


def check_unicode(field: str, text: str) -> None:
    """JSON can spell lone surrogates (\\ud800), which no UTF-8 text holds: refused, naming the field."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ServeError(400, f"{field}: not valid Unicode (a lone surrogate at character {exc.start})") from None


def bounded_int(digits: str) -> float:
    """JSON integers as Python's, but one of more than MAX_DIGITS digits is infinite: no field accepts it."""
    return int(digits) if len(digits) <= MAX_DIGITS else math.inf


def parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw, parse_int=bounded_int)
    except RecursionError:
        raise ServeError(400, "the request body is not valid JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ServeError(400, f"the request body is not valid JSON: {exc}") from None


def parse_form(raw: bytes) -> dict[str, Any]:
    """Form-encoded fields; percent-encoded bytes that are not UTF-8 are a 400 naming the field, as in JSON."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ServeError(400, f"the request body is not valid form data: {exc}") from None
    fields: dict[str, list[str]] = {}
    for pair in filter(None, text.split("&")):
        try:
            for name, value in parse_qsl(pair, keep_blank_values=True, errors="strict"):
                fields.setdefault(name, []).append(value)
        except UnicodeDecodeError:
            name = unquote_plus(pair.split("=", 1)[0], errors="replace")
            raise ServeError(400, f"{name}: not valid UTF-8 once percent-decoded") from None
    return {name: values[0] if len(values) == 1 else values for name, values in fields.items()}


def parse_multipart(raw: bytes, content_type: str) -> dict[str, Any]:
    """multipart/form-data fields (files refused), decoded as strictly as the other encodings."""
    from python_multipart import parse_form as parse_parts
    from python_multipart.exceptions import FormParserError

    fields: dict[str, list[str]] = {}

    def field(part: Any) -> None:
        name = decode_part("a field name", part.field_name or b"")
        fields.setdefault(name, []).append(decode_part(name, part.value or b""))

    def file(part: Any) -> None:
        raise ServeError(400, f"{decode_part('a field name', part.field_name or b'')}: files are not accepted")

    try:
        parse_parts({"Content-Type": content_type.encode("latin-1")}, io.BytesIO(raw), field, file)
    except (FormParserError, ValueError, UnicodeEncodeError) as exc:
        raise ServeError(400, f"the request body is not valid multipart form data: {exc}") from None
    return {name: values[0] if len(values) == 1 else values for name, values in fields.items()}


def decode_part(field: str, value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise ServeError(400, f"{field}: not valid UTF-8") from None
