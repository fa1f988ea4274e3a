"""Collating training batches: one example at a time against the vectorised gather, side by side.

    python recipes/bench/collate_speed.py --data work/quickstart/data --max-tokens 4096

The trainer's background thread collates the next update's batches while the current one
computes; on a GPU it must keep ahead of updates that take a few milliseconds. Both rows
collate the same token batches of the training split (the sampler's, in its order), each
timed alternately for `--rounds` rounds, so that a drifting machine affects both alike.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import machine, print_table, write_json
from nmt.data import PreparedData, TokenBatchSampler, collate
from nmt.data.store import EncodedSplit

COLUMNS = ["method", "batches", "examples_per_s", "ms_per_batch", "speedup"]


def per_example(split: EncodedSplit, batches: list[list[int]]) -> None:
    for batch in batches:
        collate([split[i] for i in batch])


def vectorised(split: EncodedSplit, batches: list[list[int]]) -> None:
    for batch in batches:
        split.batch(batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a directory written by nmt prepare")
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("work/bench/collate_speed.json"))
    args = parser.parse_args()
    split = PreparedData.open(args.data).split("train")
    sampler = TokenBatchSampler(split.src_lengths, split.tgt_lengths, args.max_tokens, seed=1)
    batches = sampler.batches(1)[:args.batches]
    examples = sum(len(batch) for batch in batches)
    methods = {"one example at a time (collate)": per_example, "vectorised (EncodedSplit.batch)": vectorised}
    seconds = {name: 0.0 for name in methods}
    for _ in range(args.rounds):
        for name, method in methods.items():
            start = time.perf_counter()
            method(split, batches)
            seconds[name] += time.perf_counter() - start
    slowest = max(seconds.values())
    timed = len(batches) * args.rounds
    rows = [{"method": name, "batches": timed, "examples_per_s": examples * args.rounds / total,
             "ms_per_batch": 1000 * total / timed, "speedup": f"{slowest / total:.1f}x"}
            for name, total in seconds.items()]
    print_table(f"Collating {args.max_tokens}-token batches of {args.data}", rows, COLUMNS)
    write_json(args.out, {"machine": machine(), "max_tokens": args.max_tokens, "results": rows})


if __name__ == "__main__":
    main()
