"""`nmt serve`: an HTTP translation server (LibreTranslate's API) with dynamic batching."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import err_console, handle_errors
from nmt.device import tune_cpu
from nmt.errors import NmtError
from nmt.serve import Limits, Service, check_model, resolve_pairs, serving_threads

LIMITS = Limits()  # the defaults, shown in --help


@handle_errors
def serve(
    model: Annotated[list[Path], typer.Option(
        "--model", "-m", help="Checkpoint, or folder from nmt export (served by CTranslate2), to serve; "
                              "repeat for more language pairs.")],
    pair: Annotated[list[str] | None, typer.Option(
        help="The models' language pairs, e.g. en-de, one per --model in order (default: the codes nmt prepare "
             "stored).")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 for every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0 picks a free one; the address is printed).")] = 5000,
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
        help="Seconds a request may take, queueing included; beyond it 504.")] = LIMITS.timeout,
    grace: Annotated[float, typer.Option(
        help="Seconds queued requests get to finish after SIGTERM/SIGINT; then 503.")] = 30.0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    precision: Annotated[str, typer.Option(
        help="auto (bf16 where measured faster), fp32, bf16 or fp16 (GPU).")] = "auto",
    threads: Annotated[int, typer.Option(
        help="torch threads of each model's decoding worker; 0: the cores but one (left to HTTP and clients), "
             "divided among the models.")] = 0,
) -> None:
    """Serve translations over HTTP: POST /translate, GET /languages, GET /health (LibreTranslate-compatible)."""
    try:
        from nmt.serve.app import Listen
        from nmt.serve.app import serve as run_server
    except ImportError as exc:  # the optional extra
        raise NmtError(f"nmt serve needs FastAPI and uvicorn ({exc}): pip install 'nmt[serve]'") from None
    if threads < 0:
        raise NmtError(f"--threads must be >= 0, got {threads}")
    if grace < 0:
        raise NmtError(f"--grace must be >= 0, got {grace}")
    for path in model:
        check_model(path)
    limits = Limits(max_sentences, max_chars, max_batch_tokens, max_wait_ms, max_queue, timeout)
    service = Service(model, resolve_pairs(model, pair or []), limits)
    tune_cpu(serving_threads(threads, len(model)))
    try:
        run_server(service, Listen(host, port, grace), device, precision)
    except KeyboardInterrupt:  # uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown: that is a clean stop
        pass
    if isinstance(service.failure, (NmtError, OSError)):
        raise service.failure
    if service.failure is not None:
        raise NmtError(f"loading the models failed: {service.failure}")
    err_console.print("nmt serve: stopped", highlight=False)
