"""Decoding speed by batch size: nmt's greedy and beam 5 at several `--batch-tokens`, on one machine, in one run.

    python recipes/bench/batch_size.py --model work/quickstart/transformer/final.pt \
        --src work/quickstart/valid.src --sizes 6000,3000,12000,24000      # table + work/bench/batch_size.json

A batch holds at most `batch tokens` source tokens x beam (the translator's own rule). Larger batches share
each step's fixed cost (operator dispatch, host reads) among more sentences but pad more and run longer
to their longest sentence. The outputs do not depend on the batch (the batch-invariance tests), so the
fastest size can be the default. The sizes run in turn, `--repeats` rounds, so that the machine's drift
falls on every size alike; each row keeps its best round, and the fp32 matrix-product ceiling is timed
before and after.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from common import machine, matmul_gflops, print_table, write_json
from nmt.data import encode_source
from nmt.device import tune_cpu
from nmt.translate import BATCH_TOKENS, Translator, translate_ids

SEARCHES = {"greedy": {"beam": 1}, "beam 5": {"beam": 5}, "beam 5 early-stop": {"beam": 5, "early_stop": True}}


def timed(translator: Translator, sources: list[list[int]], search: str, batch_tokens: int) -> tuple[float, list]:
    """Seconds to translate every source once, and the best hypothesis's tokens of each."""
    decode = replace(translator.decode, nbest=1, **SEARCHES[search])
    with torch.inference_mode():
        start = time.perf_counter()
        results = translate_ids(translator.model, sources, decode, batch_tokens, translator.device)
        seconds = time.perf_counter() - start
    return seconds, [r[0].tokens for r in results]


def measure(translator: Translator, sources: list[list[int]], sizes: list[int], searches: list[str],
            repeats: int) -> list[dict[str, Any]]:
    """Best-of-`repeats` sentences/s per search and size, the sizes interleaved within each round."""
    best: dict[tuple[str, int], float] = {}
    outputs: dict[tuple[str, int], list] = {}
    for _ in range(repeats):
        for search in searches:
            for size in sizes:
                seconds, outputs[search, size] = timed(translator, sources, search, size)
                best[search, size] = min(seconds, best.get((search, size), float("inf")))
    rows = []
    for search in searches:
        base = best[search, sizes[0]]
        for size in sizes:
            rows.append({"search": search, "batch tokens": size, "sentences/s": len(sources) / best[search, size],
                         f"vs {sizes[0]}": base / best[search, size],
                         "same outputs": outputs[search, size] == outputs[search, sizes[0]]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--src", type=Path, required=True)
    parser.add_argument("--sizes", default=f"{BATCH_TOKENS},3000,12000,24000",
                        help="batch tokens; the first is the base")
    parser.add_argument("--searches", default=",".join(SEARCHES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--limit", type=int, default=0, help="first N sentences only (0 = all)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("work/bench/batch_size.json"))
    args = parser.parse_args()
    tune_cpu(args.threads)
    translator = Translator.from_checkpoint(args.model, device="cpu", precision="fp32")
    texts = args.src.read_text(encoding="utf-8").splitlines()[: args.limit or None]
    sources = [encode_source(translator.src_tokenizer, text) for text in texts]
    sizes = [int(size) for size in args.sizes.split(",")]
    timed(translator, sources[:32], "beam 5", sizes[0])  # warm up
    ceilings = [matmul_gflops()]
    rows = measure(translator, sources, sizes, args.searches.split(","), args.repeats)
    ceilings.append(matmul_gflops())
    print_table(f"nmt decoding by batch size, fp32, {len(sources)} sentences, best of {args.repeats}", rows,
                list(rows[0]))
    write_json(args.out, {"machine": machine(), "ceiling_gflops_before_after": ceilings, "results": rows})


if __name__ == "__main__":
    main()
