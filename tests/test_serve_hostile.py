"""`nmt serve` against careless or hostile clients: every mistake a 4xx naming the field with one
log line, API keys and their rate, content types, idle sockets, the descriptor limit, and a
maximal request that cannot hold up a short one. A real server (a subprocess on a loopback
port, the copying model) and real sockets; the tests assert outcomes and order, not timings.
"""

from __future__ import annotations

import asyncio
import itertools
import resource
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from cli.main import app
from tests.test_serve import CPU, SOURCES, Server, running_server

KEYS = [f"key-{n}" for n in range(200)]
unused_keys = itertools.count()


def key() -> str:
    """A key no other request used: each test has the whole rate to itself."""
    return KEYS[next(unused_keys)]


@pytest.fixture(scope="module")
def guarded(copy_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Keys required (3 requests a minute each), 1 s idle timeout, requests of at most 16,384 work units
    (8 maximal lines at beam 32), long ones in slices of 2,048 (one such line)."""
    folder = tmp_path_factory.mktemp("guarded")
    (folder / "keys.txt").write_text("# one key a line\n\n" + "\n".join(KEYS) + "\n", encoding="utf-8")
    with running_server(copy_model, folder, "--api-keys", str(folder / "keys.txt"), "--key-rate", "3",
                        "--idle-timeout", "1", "--slice-work", "2048", "--max-work", "16384", "--timeout", "120"
                        ) as started:
        yield started


def send(server: Server, content: bytes | None = None, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{server.url}/translate", content=content, timeout=60, **kwargs)


def body(**fields: Any) -> dict[str, Any]:
    return {"q": SOURCES[0], "source": "en", "target": "de", "api_key": key(), **fields}


@pytest.mark.parametrize(("content", "message"), [
    (b'{"q": "\\ud800", "source": "en", "target": "de", "api_key": "%s"}', "q: not valid Unicode (a lone surrogate"),
    (b'{"q": "a", "source": "en", "target": "de", "api_key": "%s", "beam": 1' + b"0" * 5000 + b"}",
     "beam: Input should be a valid integer"),
    (b"[" * 100_000 + b"]" * 100_000, "the request body is not valid JSON: nested too deeply"),
    (b'{"q": "a", "source": "en", "target": "de", "alpha": 1000, "api_key": "%s"}', "alpha: at most 10 on this"),
    (b'{"q": "a", "source": "en", "target": "de", "alternatives": 1000000000, "api_key": "%s"}',
     "alternatives: at most 31 on this server, got 1000000000"),
    (b'{"q": "a\xff", "source": "en", "target": "de"}', "the request body is not valid JSON: 'utf-8' codec"),
])
def test_json_mistakes_are_400_naming_the_field(guarded: Server, content: bytes, message: str) -> None:
    content = content.replace(b"%s", key().encode()) if b"%s" in content else content
    answer = send(guarded, content, headers={"content-type": "application/json"})
    assert answer.status_code == 400 and message in answer.json()["error"], answer.text


def test_form_and_multipart_bodies_are_read_as_strictly_as_json(guarded: Server) -> None:
    fields = body(beam="2")
    multipart = send(guarded, files={name: (None, value) for name, value in fields.items()})
    assert multipart.status_code == 200 and multipart.json() == {"translatedText": SOURCES[0]}
    bad = send(guarded, f"q=%ff%fe&source=en&target=de&api_key={key()}".encode(),
               headers={"content-type": "application/x-www-form-urlencoded"})
    assert bad.status_code == 400 and bad.json() == {"error": "q: not valid UTF-8 once percent-decoded"}
    file = send(guarded, files={"q": ("q.txt", b"a file"), "source": (None, "en")})
    assert file.status_code == 400 and file.json() == {"error": "q: files are not accepted"}


@pytest.mark.parametrize("kind", ["text/plain", "application/xml", None])
def test_other_content_types_are_415(guarded: Server, kind: str | None) -> None:
    headers = {"content-type": kind} if kind else {}
    answer = send(guarded, b'{"q": "a", "source": "en", "target": "de"}', headers=headers)
    assert answer.status_code == 415 and answer.json()["error"].startswith(f"content type {kind or '(none)'} is not")


def test_api_keys_are_required_and_rate_limited(guarded: Server) -> None:
    missing = send(guarded, json={"q": "a", "source": "en", "target": "de"})
    assert missing.status_code == 403 and missing.json() == {"error": "api_key: this server requires an API key"}
    wrong = send(guarded, json=body(api_key="nope", beam="not even a number"))  # the key is judged first
    assert wrong.status_code == 403 and wrong.json() == {"error": "api_key: not a key this server accepts"}
    mine = key()
    statuses = [send(guarded, json=body(api_key=mine)).status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    over = send(guarded, json=body(api_key=mine))
    assert over.json() == {"error": "api_key: more than 3 requests a minute"} and int(over.headers["retry-after"]) > 0
    form = send(guarded, data=body())
    assert form.status_code == 200 and form.json() == {"translatedText": SOURCES[0]}


def test_a_short_request_is_answered_while_a_maximal_one_runs(guarded: Server) -> None:
    """The largest request --max-work allows (8 lines at beam 32 whose outputs reach the model's 64 positions,
    translated in 8 slices) runs beside the short one, step by step: it cannot end first."""
    line = " ".join(SOURCES * 2)  # beyond the model's 64 positions: the longest output there is
    too_much = send(guarded, json=body(q=[line] * 9, beam=32))
    assert too_much.status_code == 413 and "the limit is 16384" in too_much.json()["error"]

    async def first_done() -> list[str]:
        async with httpx.AsyncClient(base_url=guarded.url, timeout=120) as client:
            order: list[str] = []

            async def one(name: str, fields: dict[str, Any]) -> None:
                answer = await client.post("/translate", json=fields)
                assert answer.status_code == 200, answer.text
                order.append(name)

            heavy = asyncio.create_task(one("heavy", body(q=[line] * 8, beam=32)))
            await asyncio.sleep(0.5)
            await asyncio.gather(one("short", body()), heavy)
            return order

    assert asyncio.run(first_done()) == ["short", "heavy"]


def test_disconnects_and_bad_requests_leave_one_log_line_and_no_traceback(guarded: Server) -> None:
    port = int(guarded.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as half:
        half.sendall(b"POST /translate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"q\": ")
        time.sleep(0.2)
    deadline = time.monotonic() + 30
    while "disconnected" not in guarded.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    log = guarded.log.read_text()
    assert "POST /translate: 400 the client disconnected before sending its whole request" in log
    assert "Traceback" not in log and "Exception" not in log


def test_silent_and_slow_connections_are_closed_after_the_idle_timeout(guarded: Server) -> None:
    port = int(guarded.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as silent:
        assert silent.recv(10) == b""  # closed by the server (1 s), not by our 30 s timeout
    with socket.create_connection(("127.0.0.1", port), timeout=30) as slow:
        with pytest.raises(OSError):
            for _ in range(300):  # headers one byte every 0.1 s: never complete
                slow.sendall(b"X")
                time.sleep(0.1)
    assert httpx.get(f"{guarded.url}/health").status_code == 200


def test_the_descriptor_limit_caps_connections_without_a_log_flood(copy_model: Path, tmp_path: Path) -> None:
    """With ulimit -n 128, 200 sockets at once: the excess is closed at once, nothing fails, the log stays short."""
    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))

    with running_server(copy_model, tmp_path, "--idle-timeout", "2", preexec_fn=low_limit) as server:
        port = int(server.url.rsplit(":", 1)[1])
        sockets = []
        for _ in range(200):
            try:
                sockets.append(socket.create_connection(("127.0.0.1", port), timeout=2))
            except OSError:
                pass
        for held in sockets:
            held.close()
        deadline = time.monotonic() + 30
        while (answer := httpx.post(f"{server.url}/translate", json={"q": SOURCES[0], "source": "en", "target": "de"},
                                    timeout=30)).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.5)  # until the server has closed the ones it held
        assert answer.json() == {"translatedText": SOURCES[0]}
    log = server.log.read_text()
    assert "at most 21 connections, not --max-connections 1000" in log
    assert "Too many open files" not in log and len(log) < 2000, log


@pytest.mark.parametrize(("options", "message"), [
    (["--grace", "inf"], "--grace must be between 0 and 3600 seconds, got inf"),
    (["--grace", "nan"], "--grace must be between 0 and 3600 seconds, got nan"),
    (["--port", "70000"], "--port must be between 0 and 65535, got 70000"),
    (["--port", "-1"], "--port must be between 0 and 65535, got -1"),
    (["--max-wait-ms", "inf"], "--max-wait-ms must be between 0 and 60000 (a minute), got "),
    (["--max-wait-ms", "nan"], "--max-wait-ms must be between 0 and 60000 (a minute), got "),
    (["--max-wait-ms", "-1"], "--max-wait-ms must be between 0 and 60000 (a minute), got "),
    (["--timeout", "inf"], "limits must be positive finite numbers, got --timeout inf"),
    (["--idle-timeout", "0"], "--idle-timeout must be above 0"),
    (["--api-keys", "no-such-file"], "no-such-file: no such file of API keys"),
    (["--key-rate", "5"], "--key-rate limits each API key: give the keys with --api-keys FILE"),
])
def test_bad_server_options_are_one_line_errors(copy_model: Path, options: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["serve", "-m", str(copy_model), "--pair", "en-de", *CPU, *options])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert result.output.startswith("error: ") and message in result.output, result.output


def test_an_empty_keys_file_is_refused(copy_model: Path, tmp_path: Path) -> None:
    (tmp_path / "keys").write_text("# nobody\n\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["serve", "-m", str(copy_model), "--pair", "en-de", "--api-keys",
                                      str(tmp_path / "keys")])
    assert result.exit_code == 1
    assert result.output.strip() == f"error: {tmp_path / 'keys'}: no API keys in it (one a line; # starts a comment)"


def test_an_open_address_without_keys_is_warned_about() -> None:
    from nmt.serve.listen import Listen
    from nmt.serve.server import warnings

    assert warnings(Listen("127.0.0.1"), None, 1000) == [] and warnings(Listen("::1"), None, 1000) == []
    assert warnings(Listen("0.0.0.0"), None, 1000) == [
        "listening on 0.0.0.0 without --api-keys: anyone who can reach this port can translate with it"]
    assert warnings(Listen("0.0.0.0"), object(), 1000) == []  # type: ignore[arg-type]


def test_cors_origins_answer_preflights_for_the_listed_origin_only(copy_model: Path) -> None:
    from nmt.serve import Limits, Pair, Service
    from nmt.serve.app import create_app

    service = Service([copy_model], [Pair("en", "de")], Limits())  # never loaded: no translation needed

    async def preflight(origin: str) -> httpx.Response:
        transport = httpx.ASGITransport(create_app(service, cors_origins=["https://ok.example"]))
        async with httpx.AsyncClient(transport=transport, base_url="http://nmt") as client:
            return await client.options("/translate", headers={
                "origin": origin, "access-control-request-method": "POST",
                "access-control-request-headers": "content-type"})

    allowed, refused = asyncio.run(preflight("https://ok.example")), asyncio.run(preflight("https://evil.example"))
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "https://ok.example"
    assert "access-control-allow-origin" not in refused.headers


def test_a_500_carries_no_exception_text(copy_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nmt.serve import Limits, Pair, Service
    from nmt.serve.app import create_app

    service = Service([copy_model], [Pair("en", "de")], Limits())

    async def broken(request: Any) -> Any:
        raise RuntimeError("secret internals /home/someone")

    monkeypatch.setattr(service, "translate", broken)

    async def ask() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(create_app(service)), base_url="http://n") as c:
            return await c.post("/translate", json={"q": "a", "source": "en", "target": "de"})

    answer = asyncio.run(ask())
    assert answer.status_code == 500
    assert answer.json() == {"error": "translation failed: an internal error (the server's log says which)"}

