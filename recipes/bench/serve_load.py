"""`nmt serve` under load: 1, 8 and 64 concurrent single-sentence clients against the library in batch mode.

    python recipes/bench/serve_load.py --model work/quickstart/transformer/final.pt \
        --src work/quickstart/test.src --pair en-de --beam 5

The library rows translate the same sentences in-process with `Translator.translate_lines`:
all at once (batch mode, the throughput ceiling) and one at a time (the latency floor). Then
the script starts `nmt serve` on a free loopback port and, for each client count, keeps that
many clients busy with one-sentence requests until `--requests` are answered or `--seconds`
have passed (bounded both ways; traffic to 127.0.0.1 only). The clients run in this process,
on the same cores as the server, so the server rows include the clients' own CPU time; the
load average before and after is recorded with the results.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from common import machine, print_table, write_json
from nmt.device import tune_cpu
from nmt.translate import Translator

COLUMNS = ["mode", "clients", "requests", "errors", "requests_per_s", "sentences_per_s", "p50_ms", "p95_ms", "p99_ms",
           "vs_batch", "vs_one_sentence"]


def percentiles(seconds: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(seconds, n=100, method="inclusive") if len(seconds) > 1 else [seconds[0]] * 99
    return {"p50_ms": cuts[49] * 1000, "p95_ms": cuts[94] * 1000, "p99_ms": cuts[98] * 1000}


def library_rows(args: argparse.Namespace, sentences: list[str]) -> list[dict[str, Any]]:
    """Batch mode over every sentence, then one sentence at a time (the first `--one-at-a-time`)."""
    translator = Translator.from_checkpoint(args.model, device="cpu", precision=args.precision, beam=args.beam)
    start = time.perf_counter()
    done = sum(1 for _ in translator.translate_lines(sentences))
    batch_seconds = time.perf_counter() - start
    latencies = []
    for sentence in sentences[:args.one_at_a_time]:
        start = time.perf_counter()
        list(translator.translate_lines([sentence]))
        latencies.append(time.perf_counter() - start)
    return [
        {"mode": "library, batch", "sentences_per_s": done / batch_seconds},
        {"mode": "library, one sentence", "requests": len(latencies), "clients": 1,
         "sentences_per_s": len(latencies) / sum(latencies), **percentiles(latencies)},
    ]


def start_server(args: argparse.Namespace, log: Path, *options: str) -> tuple[subprocess.Popen[bytes], str]:
    """`nmt serve` on a free loopback port (with more `options`), once it answers /health; and its URL."""
    command = [str(Path(sys.executable).with_name("nmt")), "serve", "-m", str(args.model), "--pair", args.pair,
               "--port", "0", "--device", "cpu", "--precision", args.precision, "--threads", str(args.threads),
               *options]
    process = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not (found := re.search(r"listening on (http://127\.0\.0\.1:\d+)", log.read_text())):
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"nmt serve did not start: {log.read_text()}")
        time.sleep(0.1)
    url = found.group(1)
    while httpx.get(f"{url}/health").status_code != 200:
        if time.monotonic() > deadline:
            raise SystemExit("nmt serve did not load its model in 120 s")
        time.sleep(0.1)
    return process, url


async def load(url: str, args: argparse.Namespace, sentences: list[str], clients: int) -> dict[str, Any]:
    """`clients` loops of one-sentence requests, until `--requests` answers or `--seconds` are spent."""
    source, target = args.pair.split("-")
    latencies: list[float] = []
    errors = 0
    sent = 0
    stop = time.monotonic() + args.seconds

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal errors, sent
        while sent < args.requests and time.monotonic() < stop:
            text = sentences[sent % len(sentences)]
            sent += 1
            start = time.perf_counter()
            answer = await http.post("/translate", json={"q": text, "source": source, "target": target,
                                                         "beam": args.beam})
            latencies.append(time.perf_counter() - start)
            errors += answer.status_code != 200

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=args.seconds + 60, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        seconds = time.perf_counter() - start
    return {"mode": "server", "clients": clients, "requests": len(latencies), "errors": errors,
            "requests_per_s": len(latencies) / seconds, "sentences_per_s": (len(latencies) - errors) / seconds,
            **percentiles(latencies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--src", type=Path, required=True, help="sentences, one a line")
    parser.add_argument("--pair", default="en-de")
    parser.add_argument("--sentences", type=int, default=256, help="how many of --src to use")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--clients", default="1,8,64")
    parser.add_argument("--requests", type=int, default=256, help="requests per client count (at most)")
    parser.add_argument("--seconds", type=float, default=60, help="time per client count (at most)")
    parser.add_argument("--one-at-a-time", type=int, default=50, help="sentences timed alone in the library")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("work/bench/serve_load.json"))
    args = parser.parse_args()
    sentences = [line for line in args.src.read_text(encoding="utf-8").splitlines() if line.strip()][:args.sentences]
    load_before = os.getloadavg()
    tune_cpu(args.threads)
    rows = library_rows(args, sentences)
    with tempfile.TemporaryDirectory() as tmp:
        process, url = start_server(args, Path(tmp) / "serve.log")
        try:
            for clients in (int(c) for c in args.clients.split(",")):
                rows.append(asyncio.run(load(url, args, sentences, clients)))
                print(rows[-1], flush=True)
        finally:
            process.terminate()
            process.wait(60)
    batch, one = rows[0]["sentences_per_s"], rows[1]["p50_ms"]
    for row in rows[2:]:
        row["vs_batch"] = f"{row['sentences_per_s'] / batch:.0%}"
        row["vs_one_sentence"] = f"{row['p50_ms'] / one:.2f}x"
    print_table(f"nmt serve under load: {len(sentences)} sentences, beam {args.beam}, {args.precision}", rows, COLUMNS)
    write_json(args.out, {"machine": machine(), "load_average_before_after": [load_before, os.getloadavg()],
                          "beam": args.beam, "model": str(args.model), "results": rows})


if __name__ == "__main__":
    main()
