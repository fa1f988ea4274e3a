"""`nmt serve` against a heavy client and against idle sockets: do the normal clients keep their latency?

    python recipes/bench/serve_fairness.py --model work/quickstart/transformer/averaged.pt \
        --src work/quickstart/test.src --pair en-de

One `nmt serve` on a free loopback port; three runs of `--seconds` each, with `--clients` (16)
normal clients throughout, each sending one sentence of `--src` per request, back to back:

- alone: their p50 and p99 latency, the baseline;
- heavy: beside them one client sends maximal requests back to back: lines of random letters
  (the most tokens per character) at beam 32, as many as the server admits (found by
  shrinking the request until it is not refused with 413);
- idle sockets: beside them `--idle-sockets` (500) connections are opened and held silent,
  each reopened as soon as the server closes it (after its `--idle-timeout`).

The server's RSS is sampled every 0.2 s. Everything runs on the same cores as the server,
so the clients' own CPU time is in every figure; the load average before and after is
recorded. Prints a table and writes JSON (`--out`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import statistics
import string
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from common import machine, print_table, write_json
from serve_load import start_server

COLUMNS = ["run", "requests", "errors", "p50_ms", "p99_ms", "p99_vs_alone", "heavy_requests", "heavy_answers",
           "heavy_p50_s", "rss_max_mb", "sockets_reopened"]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def sample_rss(pid: int, stop: asyncio.Event, samples: list[float]) -> None:
    while not stop.is_set():
        samples.append(rss_mb(pid))
        await asyncio.sleep(0.2)


async def normal_client(http: httpx.AsyncClient, args: argparse.Namespace, sentences: list[str], number: int,
                        until: float, latencies: list[float], errors: list[int]) -> None:
    source, target = args.pair.split("-")
    request = number
    while time.monotonic() < until:
        text = sentences[request % len(sentences)]
        request += args.clients
        start = time.perf_counter()
        answer = await http.post("/translate", json={"q": text, "source": source, "target": target})
        latencies.append(time.perf_counter() - start)
        errors[0] += answer.status_code != 200


def garbage_lines(count: int, chars: int, seed: int = 0) -> list[str]:
    """Random letters in words of 3-9: the most tokens, hence the longest outputs, per character."""
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        words, length = [], 0
        while length < chars - 10:
            word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 9)))
            words.append(word)
            length += len(word) + 1
        lines.append(" ".join(words))
    return lines


async def heavy_client(http: httpx.AsyncClient, args: argparse.Namespace, until: float, latencies: list[float],
                       statuses: dict[int, int], sizes: list[int]) -> None:
    """Maximal requests back to back: garbage at beam 32, first shrunk until the server stops answering 413
    (each 413 says how far over its limit the request is; those refusals are not counted)."""
    source, target = args.pair.split("-")
    count = args.max_sentences
    while time.monotonic() < until and count >= 1:
        body = {"q": garbage_lines(count, args.max_chars // count), "source": source, "target": target, "beam": 32}
        start = time.perf_counter()
        answer = await http.post("/translate", json=body)
        if answer.status_code == 413 and not sizes:
            over = re.search(r"(\d+) [^;]*; the limit is (\d+)", answer.json()["error"])
            count = min(count - 1, int(count * int(over.group(2)) / int(over.group(1)))) if over else count - 1
            continue
        sizes[:] = [count, sum(len(line) for line in body["q"])]
        latencies.append(time.perf_counter() - start)
        statuses[answer.status_code] = statuses.get(answer.status_code, 0) + 1


async def idle_sockets(url: str, count: int, until: float, reopened: list[int]) -> None:
    """`count` silent connections, each reopened as soon as the server closes it."""
    host, port = url.removeprefix("http://").split(":")

    async def hold() -> None:
        while time.monotonic() < until:
            try:
                reader, writer = await asyncio.open_connection(host, int(port))
            except OSError:
                await asyncio.sleep(0.1)
                continue
            try:
                await asyncio.wait_for(reader.read(1), max(0.01, until - time.monotonic()))  # b'': closed by the server
                reopened[0] += 1
            except TimeoutError:
                pass
            finally:
                writer.close()

    await asyncio.gather(*(hold() for _ in range(count)))


async def run(url: str, pid: int, args: argparse.Namespace, sentences: list[str], name: str,
              heavy: bool, idle: int) -> dict[str, Any]:
    latencies: list[float] = []
    errors, reopened, heavy_latencies, statuses, rss, sizes = [0], [0], [], {}, [], []  # type: ignore[var-annotated]
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_rss(pid, stop, rss))
    until = time.monotonic() + args.seconds
    limits = httpx.Limits(max_connections=args.clients + 1)
    async with httpx.AsyncClient(base_url=url, timeout=args.seconds + 120, limits=limits) as http:
        tasks = [normal_client(http, args, sentences, n, until, latencies, errors) for n in range(args.clients)]
        if heavy:
            tasks.append(heavy_client(http, args, until, heavy_latencies, statuses, sizes))
        if idle:
            tasks.append(idle_sockets(url, idle, until, reopened))
        await asyncio.gather(*tasks)
    stop.set()
    await sampler
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return {"run": name, "requests": len(latencies), "errors": errors[0], "p50_ms": cuts[49] * 1000,
            "p99_ms": cuts[98] * 1000, "heavy_requests": len(heavy_latencies) or None,
            "heavy_answers": ", ".join(f"{status}: {n}" for status, n in sorted(statuses.items())) or None,
            "heavy_p50_s": statistics.median(heavy_latencies) if heavy_latencies else None,
            "rss_max_mb": max(rss), "sockets_reopened": reopened[0] if idle else None,
            "heavy_lines_chars": sizes or None}


async def measure(url: str, pid: int, args: argparse.Namespace, sentences: list[str]) -> list[dict[str, Any]]:
    rows = []
    for name, heavy, idle in ((f"{args.clients} clients alone", False, 0), ("+ 1 heavy client", True, 0),
                              (f"+ {args.idle_sockets} idle sockets", False, args.idle_sockets)):
        rows.append(await run(url, pid, args, sentences, name, heavy, idle))
        print(rows[-1], flush=True)
    for row in rows:
        row["p99_vs_alone"] = f"{row['p99_ms'] / rows[0]['p99_ms']:.2f}x"
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--src", type=Path, required=True, help="sentences, one a line")
    parser.add_argument("--pair", default="en-de")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--idle-sockets", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=60, help="length of each run")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--max-sentences", type=int, default=128, help="the server's --max-sentences")
    parser.add_argument("--max-chars", type=int, default=20_000, help="the server's --max-chars")
    parser.add_argument("--serve-option", action="append", default=[], help="more nmt serve options, e.g. "
                                                                            "--serve-option=--max-work=100000")
    parser.add_argument("--out", type=Path, default=Path("work/bench/serve_fairness.json"))
    args = parser.parse_args()
    args.serve_option += [f"--max-sentences={args.max_sentences}", f"--max-chars={args.max_chars}"]
    sentences = [line for line in args.src.read_text(encoding="utf-8").splitlines() if line.strip()]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        process, url = start_server(args, Path(tmp) / "serve.log", *args.serve_option)
        try:
            rss_start = rss_mb(process.pid)
            rows = asyncio.run(measure(url, process.pid, args, sentences))
        finally:
            process.terminate()
            process.wait(120)
    print_table(f"nmt serve, {args.clients} normal clients, {args.seconds:g} s a run (RSS at start "
                f"{rss_start:.0f} MB)", rows, COLUMNS)
    write_json(args.out, {"machine": machine(), "load_average_before_after": [load_before, os.getloadavg()],
                          "model": str(args.model), "rss_start_mb": rss_start, "serve_options": args.serve_option,
                          "results": rows})


if __name__ == "__main__":
    main()
