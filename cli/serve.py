"""`nmt serve`: an HTTP translation server (LibreTranslate's API) with dynamic batching."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import err_console, handle_errors
from nmt.device import tune_cpu
from nmt.errors import NmtError
from nmt.serve import Limits, Service, check_model, resolve_pairs, serving_threads
from nmt.serve.listen import Listen

LIMITS = Limits()  # the defaults, shown in --help
LISTEN = Listen()


@handle_errors
def serve(
    model: Annotated[list[Path], typer.Option(
        "--model", "-m", help="Checkpoint, or folder from nmt export (served by CTranslate2), to serve; "
                              "repeat for more language pairs.")],
    pair: Annotated[list[str] | None, typer.Option(
        help="The models' language pairs, e.g. en-de, one per --model in order (default: the codes nmt prepare "
             "stored).")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 for every interface).")] = LISTEN.host,
    port: Annotated[int, typer.Option(help="Port to listen on (0 picks a free one; the address is printed).")
    ] = LISTEN.port,
    max_batch_tokens: Annotated[int, typer.Option(
        help="Source tokens of the requests batched together (searched as this × beam).")] = LIMITS.max_batch_tokens,
    max_wait_ms: Annotated[float, typer.Option(
        help="How long the oldest request waits for others to join its batch, while requests overlap "
             "(a lone client is served at once).")] = LIMITS.max_wait_ms,
    max_queue: Annotated[int, typer.Option(
        help="Requests waiting per model; beyond it 503 with Retry-After.")] = LIMITS.max_queue,
    max_sentences: Annotated[int, typer.Option(help="Lines per request; beyond it 413.")] = LIMITS.max_sentences,
    max_chars: Annotated[int, typer.Option(help="Characters per request; beyond it 413.")] = LIMITS.max_chars,
    timeout: Annotated[float, typer.Option(
        help="Seconds a request may take, queueing included; beyond it 504 and its decoding stops.")] = LIMITS.timeout,
    max_work: Annotated[int, typer.Option(
        help="Decoding work of one request: its lines' output limits (max-len-a × source tokens + max-len-b) × "
             "beam; beyond it 413.")] = LIMITS.max_work,
    slice_work: Annotated[int, typer.Option(
        help="A request of more decoding work is translated in slices of this much, on a second thread that "
             "lets shorter requests through between any two decoding steps.")] = LIMITS.slice_work,
    grace: Annotated[float, typer.Option(
        help="Seconds queued requests get to finish after SIGTERM/SIGINT; then 503.")] = LISTEN.grace,
    max_connections: Annotated[int, typer.Option(
        help="Open connections; beyond them new ones are closed at once (lowered to fit ulimit -n).")
    ] = LISTEN.max_connections,
    idle_timeout: Annotated[float, typer.Option(
        help="Seconds a connection may stay silent (or take to send a request's headers) before it is "
             "closed.")] = LISTEN.idle_timeout,
    api_keys: Annotated[Path | None, typer.Option(
        envvar="NMT_API_KEYS", help="File of API keys, one a line: /translate then needs one in api_key (403 "
                                    "otherwise). Without keys anyone who can reach the port can use it.")] = None,
    key_rate: Annotated[int, typer.Option(
        help="Requests a minute each API key may make (0: no limit); beyond it 429.")] = 0,
    cors_origins: Annotated[list[str] | None, typer.Option(
        metavar="ORIGIN", help="Web origin allowed to call the server from a page (CORS), e.g. https://example.org; "
             "repeat for more.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    precision: Annotated[str, typer.Option(
        help="auto (bf16 where measured faster), fp32, bf16 or fp16 (GPU).")] = "auto",
    threads: Annotated[int, typer.Option(
        help="torch threads of each model's decoding worker; 0: the cores but one (left to HTTP and clients), "
             "divided among the models.")] = 0,
) -> None:
    """Serve translations over HTTP: POST /translate, GET /languages, GET /health (LibreTranslate-compatible)."""
    try:
        from nmt.serve.keys import ApiKeys
        from nmt.serve.server import serve as run_server
    except ImportError as exc:  # the optional extra
        raise NmtError(f"nmt serve needs FastAPI and uvicorn ({exc}): pip install 'nmt[serve]'") from None
    if threads < 0:
        raise NmtError(f"--threads must be >= 0, got {threads}")
    listen = Listen(host, port, grace, max_connections, idle_timeout)
    if key_rate and api_keys is None:
        raise NmtError("--key-rate limits each API key: give the keys with --api-keys FILE")
    keys = ApiKeys.load(api_keys, key_rate) if api_keys is not None else None
    for path in model:
        check_model(path)
    limits = Limits(max_sentences, max_chars, max_batch_tokens, max_wait_ms, max_queue, timeout, max_work, slice_work)
    service = Service(model, resolve_pairs(model, pair or []), limits)
    tune_cpu(serving_threads(threads, len(model)))
    try:
        run_server(service, listen, device, precision, keys, cors_origins or [])
    except KeyboardInterrupt:  # uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown: that is a clean stop
        pass
    if isinstance(service.failure, (NmtError, OSError)):
        raise service.failure
    if service.failure is not None:
        raise NmtError(f"loading the models failed: {service.failure}")
    err_console.print("nmt serve: stopped", highlight=False)
