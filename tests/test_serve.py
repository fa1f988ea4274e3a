"""`nmt serve` as a real server (a subprocess on a free loopback port) with a real HTTP client (httpx).

The copying model translates every line into itself, so each answer is known in advance and
a request answered with another request's text shows at once. Load loops are bounded in count
and time; traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from cli.main import app
from tests.conftest import EN_WORDS, make_parallel

SOURCES = make_parallel(6, seed=11)[0]
NMT = Path(sys.executable).with_name("nmt")
CPU = ["--device", "cpu", "--precision", "fp32", "--threads", "1"]


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            raise


@contextmanager
def running_server(model: Path, tmp_path: Path, *options: str, pair: str | None = "en-de",
                   **popen: Any) -> Iterator[Server]:
    """Start `nmt serve` on a port the OS picks, wait until /health says ready, stop it afterwards."""
    log = tmp_path / f"serve-{time.monotonic_ns()}.log"
    pairs = ["--pair", pair] if pair else []
    with open(log, "wb") as sink:
        process = subprocess.Popen([str(NMT), "serve", "-m", str(model), *pairs, "--host", "127.0.0.1",
                                    "--port", "0", *CPU, *options], stdout=sink, stderr=subprocess.STDOUT,
                                   env={k: v for k, v in os.environ.items() if k != "NMT_DEBUG"}, **popen)
    server = Server(process, "", log)
    try:
        deadline = time.monotonic() + 60
        while not (found := re.search(r"listening on (http://127\.0\.0\.1:\d+)", log.read_text())):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        server.url = found.group(1)
        while httpx.get(f"{server.url}/health").status_code != 200:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        yield server
    finally:
        if process.poll() is None:
            server.stop()


@pytest.fixture(scope="module")
def server(copy_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    second = ["-m", str(copy_model), "--pair", "de-en"]  # two models, two workers
    # a kept-alive connection idle for --idle-timeout is closed by the server; a client reusing it at that
    # very moment gets "Server disconnected" (HTTP's keep-alive race): on a loaded machine the 64 clients'
    # pool holds connections idle that long, so the timeout here is longer than the test
    with running_server(copy_model, tmp_path_factory.mktemp("serve"), *second, "--idle-timeout", "300") as started:
        yield started


@pytest.fixture(scope="module")
def tiny_server(copy_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Tiny limits: 3 lines, 100 characters, 1 waiting request, which waits 5 s for company but times out at 1 s.

    Only its first request waits (before any batch has run, company is assumed), so one test only translates here.
    """
    with running_server(copy_model, tmp_path_factory.mktemp("tiny"), "--max-sentences", "3", "--max-chars", "100",
                        "--max-queue", "1", "--max-wait-ms", "5000", "--timeout", "1") as started:
        yield started


def post(server: Server, body: Any, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{server.url}/translate", json=body, timeout=60, **kwargs)


def cli_translate(model: Path, lines: list[str], *options: str) -> str:
    result = subprocess.run([str(NMT), "translate", "-m", str(model), *CPU, *options], input="\n".join(lines).encode(),
                            capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


def test_single_and_batch_requests_equal_nmt_translate_and_the_copies(server: Server, copy_model: Path) -> None:
    for options in ({}, {"beam": 3, "alpha": 1.0}):
        flags = [f"--{k}={v}" for k, v in options.items()]
        expected = cli_translate(copy_model, SOURCES, *flags).splitlines()
        assert expected == SOURCES  # the copying model
        singles = [post(server, {"q": text, "source": "en", "target": "de", **options}) for text in SOURCES]
        assert [r.json() for r in singles] == [{"translatedText": text} for text in expected]
        batch = post(server, {"q": SOURCES, "source": "en", "target": "de", **options})
        assert batch.status_code == 200 and batch.json() == {"translatedText": expected}


def test_lines_empty_strings_and_normalisation_as_the_cli(server: Server, copy_model: Path) -> None:
    q = [f"{SOURCES[0]}\n\n  {SOURCES[1]}  ", "", "   ", f"{SOURCES[2]}\r\n{SOURCES[3]}"]
    answer = post(server, {"q": q, "source": "en", "target": "de"}).json()
    lines = [line for text in q for line in text.split("\n")]
    cli = cli_translate(copy_model, [line.rstrip("\r") for line in lines]).splitlines()
    assert answer == {"translatedText": [f"{cli[0]}\n\n{cli[2]}", "", "", f"{cli[5]}\n{cli[6]}"]}
    assert answer["translatedText"][0] == f"{SOURCES[0]}\n\n{SOURCES[1]}"


def test_nbest_scores_and_alternatives(server: Server, copy_model: Path) -> None:
    nbest = cli_translate(copy_model, SOURCES[:2], "--beam", "3", "--nbest", "3")
    cli = [line.split("\t") for line in nbest.splitlines()]
    answer = post(server, {"q": SOURCES[:2], "source": "en", "target": "de", "beam": 3, "nbest": 3}).json()
    assert answer["translatedText"] == SOURCES[:2]
    served = [(str(i), f"{h['score']:.4f}", h["text"]) for i, text in enumerate(answer["nbest"])
              for line in text for h in line]
    assert served == [tuple(fields) for fields in cli]
    one = post(server, {"q": f"{SOURCES[0]}\n{SOURCES[1]}", "source": "en", "target": "de", "alternatives": 2}).json()
    assert one["translatedText"] == f"{SOURCES[0]}\n{SOURCES[1]}"
    assert one["alternatives"] == [f"{cli[k][2]}\n{cli[3 + k][2]}" for k in (1, 2)]  # the beam grew to 3 to hold them
    assert "nbest" not in one and "warnings" not in one


def test_form_bodies_languages_and_health(server: Server) -> None:
    form = httpx.post(f"{server.url}/translate", data={"q": SOURCES[0], "source": "en", "target": "de", "api_key": ""})
    assert form.status_code == 200 and form.json() == {"translatedText": SOURCES[0]}
    fields = {"q": SOURCES[:2], "source": "en", "target": "de", "beam": "2"}
    repeated = httpx.post(f"{server.url}/translate", data=fields)
    assert repeated.json() == {"translatedText": SOURCES[:2]}  # q repeated: a list; numbers arrive as strings
    assert httpx.get(f"{server.url}/languages").json() == [
        {"code": "de", "name": "German", "targets": ["en"]}, {"code": "en", "name": "English", "targets": ["de"]}]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ready", "models": ["en-de", "de-en"], "queued": 0}


def test_a_line_beyond_the_models_positions_is_truncated_with_a_warning(server: Server, copy_model: Path) -> None:
    long_line = " ".join(EN_WORDS * 6)  # far beyond the copying model's 64 positions
    answer = post(server, {"q": [SOURCES[0], f"{SOURCES[1]}\n{long_line}"], "source": "en", "target": "de"}).json()
    cli = cli_translate(copy_model, [SOURCES[0], SOURCES[1], long_line]).splitlines()
    assert answer["translatedText"] == [cli[0], f"{cli[1]}\n{cli[2]}"]
    assert long_line.startswith(cli[2]) and len(cli[2]) < len(long_line)
    assert len(answer["warnings"]) == 1
    assert re.fullmatch(r"line 3: \d+ tokens, truncated to the model's limit of 64", answer["warnings"][0])


@pytest.mark.parametrize(("body", "message"), [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    ({"q": 5, "source": "en", "target": "de"}, "q: must be a string or a list of strings"),
    ({"q": ["a", 5], "source": "en", "target": "de"}, "q: must be a string or a list of strings"),
    ({"source": "en", "target": "de"}, "q: Field required"),
    ({"q": "a", "source": "en", "target": "de", "beam": "5"}, "beam:"),
    ({"q": "a", "source": "en", "target": "de", "alternatives": -1}, "alternatives:"),
    ({"q": "a", "source": "en", "target": "de", "format": "html"}, "format: only 'text' is supported"),
    ({"q": "a", "source": "en", "target": "de", "beam": 2, "nbest": 3}, "nbest 3 is larger than the beam size 2"),
    ({"q": "a", "source": "en", "target": "de", "beam": 100}, "beam: at most 32 on this server, got 100"),
    ({"q": "a", "source": "en", "target": "fr"}, "no model for en-fr; this server translates en-de, de-en"),
])
def test_bad_requests_are_400_with_one_error_and_disturb_nothing(server: Server, body: Any, message: str) -> None:
    raw = body if isinstance(body, bytes) else None
    answer = httpx.post(f"{server.url}/translate", content=raw, json=None if raw else body,
                        headers={"content-type": "application/json"})
    assert answer.status_code == 400 and list(answer.json()) == ["error"] and message in answer.json()["error"]
    assert post(server, {"q": SOURCES[0], "source": "en", "target": "de"}).json() == {"translatedText": SOURCES[0]}


def test_unknown_routes_and_methods_answer_json_errors(server: Server) -> None:
    assert httpx.get(f"{server.url}/nowhere").json() == {"error": "Not Found"}
    wrong = httpx.get(f"{server.url}/translate")
    assert wrong.status_code == 405 and wrong.json() == {"error": "Method Not Allowed"}


def test_too_many_sentences_or_characters_are_413(tiny_server: Server) -> None:
    lines = post(tiny_server, {"q": ["a", "b\nc", "d"], "source": "en", "target": "de"})
    assert lines.status_code == 413 and lines.json() == {"error": "4 sentences in one request; the limit is 3"}
    chars = post(tiny_server, {"q": "a" * 101, "source": "en", "target": "de"})
    assert chars.status_code == 413 and chars.json() == {"error": "101 characters in one request; the limit is 100"}


def test_a_body_far_beyond_max_chars_is_413_before_it_is_read(tiny_server: Server) -> None:
    answer = httpx.post(f"{tiny_server.url}/translate", content=b"x" * (12 * 100 + 65537),
                        headers={"content-type": "application/json"})
    assert answer.status_code == 413
    assert answer.json() == {"error": "the request body is far larger than 100 characters"}


def test_timeout_is_504_and_a_full_queue_503_with_retry_after(tiny_server: Server) -> None:
    async def both() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=tiny_server.url, timeout=30) as client:
            first = asyncio.create_task(client.post("/translate", json={"q": "a dog", "source": "en", "target": "de"}))
            while not first.done() and (await client.get("/health")).json()["queued"] == 0:  # the first waits 5 s...
                await asyncio.sleep(0.01)
            second = await client.post("/translate", json={"q": "a cat", "source": "en", "target": "de"})
            return await first, second

    timed_out, overloaded = asyncio.run(both())
    assert timed_out.status_code == 504
    assert timed_out.json() == {"error": "the translation took longer than the 1 s timeout"}
    assert overloaded.status_code == 503 and overloaded.headers["retry-after"] == "1"
    assert overloaded.json()["error"].startswith("server overloaded: 1 requests are waiting (--max-queue 1)")


def distinct_text(client: int, request: int) -> str:
    """A different sentence for every (client, request): a mix-up cannot go unseen."""
    return " ".join((EN_WORDS[client // 20], EN_WORDS[client % 20], EN_WORDS[request], "park"))


async def client_loop(client: httpx.AsyncClient, number: int, requests: int) -> list[tuple[str, Any]]:
    answers = []
    for request in range(requests):
        text = distinct_text(number, request)
        source, target = ("en", "de") if number % 4 < 2 else ("de", "en")  # both models' workers busy at once
        body = {"q": text, "source": source, "target": target, "beam": 1 + number % 2}  # two option sets per queue
        answer = await client.post("/translate", json=body)
        answers.append((text, answer.json()))
    return answers


async def health_latencies(url: str, loops: asyncio.Future[Any]) -> list[float]:
    """Seconds each /health took while `loops` ran (its own connection, outside the clients' pool)."""
    seconds = []
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        while not loops.done() and len(seconds) < 200:
            start = time.monotonic()
            assert (await client.get("/health")).status_code == 200
            seconds.append(time.monotonic() - start)
            await asyncio.sleep(0.05)
    return seconds


def test_64_concurrent_clients_get_their_own_translations(server: Server) -> None:
    """Every answer is its own request's text; /health answers promptly all along (decoding is off the event loop)."""
    async def load() -> tuple[list[list[tuple[str, Any]]], list[float]]:
        pool = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=pool) as client:
            loops = asyncio.gather(*(client_loop(client, n, 20) for n in range(64)))
            health = await health_latencies(server.url, loops)
            return await asyncio.wait_for(loops, 120), health

    start = time.monotonic()
    loops, health = asyncio.run(load())
    answers = [pair for loop in loops for pair in loop]
    assert len(answers) == 64 * 20 and len({text for text, _ in answers}) == 64 * 20
    assert all(answer == {"translatedText": text} for text, answer in answers)
    assert time.monotonic() - start < 120
    assert health and max(health) < 2.0, health


def refuses_connections(url: str) -> bool:
    """True once a new connection is refused or dropped unanswered (within 10 s): one accepted into the backlog
    just before the listening socket closed is reset, never answered."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{url}/languages", timeout=5)
        except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
            return True
        time.sleep(0.01)
    return False


async def terminate_under_load(server: Server, count: int) -> list[tuple[str, httpx.Response]]:
    """Send `count` requests, SIGTERM the server once each is answered or queued, check that new connections
    are refused meanwhile, and collect every response."""
    async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=httpx.Limits(max_connections=count)) as client:
        async def one(n: int) -> tuple[str, httpx.Response]:
            text = distinct_text(n, n % 20)
            body = {"q": text, "source": "en", "target": "de", "beam": 4}  # beam 4: a batch that takes a while
            return text, await client.post("/translate", json=body)

        tasks = [asyncio.create_task(one(n)) for n in range(count)]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # wait until no request is still on its way to the queue
            queued = httpx.get(f"{server.url}/health").json()["queued"]  # not through the pool the requests fill
            if queued + sum(task.done() for task in tasks) == count:
                break
            await asyncio.sleep(0.01)
        server.process.send_signal(signal.SIGTERM)
        assert refuses_connections(server.url)
        return await asyncio.wait_for(asyncio.gather(*tasks), 60)


@pytest.mark.parametrize("grace", ["30", "0"])
def test_sigterm_under_load_answers_every_request_completely(copy_model: Path, tmp_path: Path, grace: str) -> None:
    """Requests queued at SIGTERM are translated within --grace, else get 503; never half a response; exit 0."""
    held = ["--max-wait-ms", "10000", "--max-batch-tokens", "100000", "--grace", grace]  # all wait in the queue
    with running_server(copy_model, tmp_path, *held) as server:
        answers = asyncio.run(terminate_under_load(server, 64))
        assert server.process.wait(60) == 0, server.log.read_text()  # SIGTERM was sent: no second signal
    statuses = [response.status_code for _, response in answers]
    if grace == "30":
        assert set(statuses) == {200}, statuses  # the queued requests finish within the grace period
    else:
        assert 503 in statuses and set(statuses) <= {200, 503}, statuses  # no grace: they are abandoned
    for text, response in answers:
        expected = {"translatedText": text} if response.status_code == 200 else {
            "error": "the server shut down before this request was translated"}
        assert response.json() == expected
    assert "nmt serve: stopped" in server.log.read_text()


def test_health_and_translate_answer_503_while_the_model_loads(copy_model: Path) -> None:
    from nmt.serve import Limits, Pair, Service
    from nmt.serve.app import create_app

    service = Service([copy_model], [Pair("en", "de")], Limits())  # never loaded

    async def ask() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(create_app(service)), base_url="http://nmt") as c:
            return await c.get("/health"), await c.post("/translate", json={"q": "a", "source": "en", "target": "de"})

    health, translate = asyncio.run(ask())
    assert health.status_code == 503 and health.json() == {"status": "loading"}
    assert translate.status_code == 503 and translate.json() == {"error": "the model is still loading"}


def test_command_line_errors_are_one_line(copy_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    for pair in ([], ["--pair", "en-de"]):  # read for its languages, or when loading
        result = runner.invoke(app, ["serve", "-m", str(tmp_path), *pair, "--port", "0", *CPU])
        assert result.exit_code == 1
        assert result.output.strip() == f"error: {tmp_path}: no nmt.json, so not a folder written by nmt export"
    result = runner.invoke(app, ["serve", "-m", str(copy_model), *CPU])
    assert result.exit_code == 1
    refusal = f"error: {copy_model} stores no language codes; say which pair it serves with --pair src-tgt"
    assert result.output.strip() == refusal
    result = runner.invoke(app, ["serve", "-m", str(copy_model), "--pair", "en-de", "--pair", "de-en"])
    assert result.exit_code == 1 and "give one --pair per --model: 1 model(s), 2 pair(s)" in result.output
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = runner.invoke(app, ["serve", "-m", str(copy_model), "--pair", "en-de", "--port", str(port), *CPU])
    assert result.exit_code == 1 and result.output.startswith(f"error: cannot listen on 127.0.0.1:{port}: ")
    monkeypatch.setitem(sys.modules, "nmt.serve.server", None)  # as if FastAPI and uvicorn were not installed
    result = runner.invoke(app, ["serve", "-m", str(copy_model), "--pair", "en-de"])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "pip install 'nmt[serve]'" in result.output


def test_an_export_is_served_by_ctranslate2_with_the_pair_it_stores(copy_model: Path, tmp_path: Path) -> None:
    pytest.importorskip("ctranslate2")
    from nmt.checkpoint import load_checkpoint
    from nmt.export import export_checkpoint

    labelled = tmp_path / "copy-en-fr.pt"
    replace(load_checkpoint(copy_model), languages=("en", "fr")).save(labelled)
    folder = export_checkpoint(labelled, tmp_path / "ct2")
    with running_server(folder, tmp_path, pair=None) as started:  # the pair comes from the folder's nmt.json
        assert httpx.get(f"{started.url}/health").json()["models"] == ["en-fr"]
        answer = post(started, {"q": SOURCES, "source": "en", "target": "fr", "beam": 2})
        assert answer.json() == {"translatedText": SOURCES}  # the copying model, through CTranslate2
    assert "en-fr in float32 (CTranslate2 on cpu)" in started.log.read_text()


def test_a_model_that_fails_to_load_stops_the_server_with_one_line(tmp_path: Path) -> None:
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    result = CliRunner().invoke(app, ["serve", "-m", str(broken), "--pair", "en-de", "--port", "0", *CPU])
    assert result.exit_code == 1
    assert result.output.splitlines()[-1] == f"error: {broken}: not an nmt checkpoint " \
                                             "(not a file written by nmt train or nmt average)"


def test_accepted_connections_send_without_waiting_for_acks() -> None:
    """TCP_NODELAY on the server's connections: without it each response on a kept-alive
    connection waited for the client's delayed ACK (about 40 ms a request)."""
    from nmt.serve.server import bind

    async def accepted_nodelay() -> int:
        answer: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            answer.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        listener = bind("127.0.0.1", 0)
        async with await asyncio.start_server(accepted, sock=listener):
            _, client = await asyncio.open_connection(*listener.getsockname()[:2])
            nodelay = await asyncio.wait_for(answer, 10)
            client.close()
        return nodelay

    assert asyncio.run(accepted_nodelay()) != 0
