"""nmt against CTranslate2 on the same weights: greedy and beam 5, fp32 and int8, one machine, one run.

    python recipes/bench/engines.py --model work/quickstart/transformer/averaged.pt \
        --src work/quickstart/test.src --ref work/quickstart/test.ref      # table + work/bench/engines.json

The checkpoint is exported once (`nmt export`, fp32 weights); CTranslate2's int8 rows compute in int8
from those weights, nmt's use dynamic int8 linear layers. nmt's beam runs with its exact stopping rule
and with `--early-stop`, which is CTranslate2's rule. Each row translates the whole test set in batch
mode (the translators' own sorting and batching) and reports sentences/s, target tokens/s (EOS
counted), BLEU, and the share of outputs identical to nmt fp32 with the same search (the early-stop
row for CTranslate2's beam). The load average is recorded before and after: timings on a shared
machine are only as quiet as it was.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from common import machine, matmul_gflops, print_table, write_json
from nmt.checkpoint import load_checkpoint
from nmt.device import tune_cpu
from nmt.engines import CT2Translator
from nmt.evaluate import corpus_scores
from nmt.export import export_checkpoint
from nmt.io import read_lines
from nmt.translate import Translator

SEARCHES = {"greedy": {"beam": 1}, "beam 5": {"beam": 5, "early_stop": False},
            "beam 5 early-stop": {"beam": 5, "early_stop": True}}


def run(translator: Translator, texts: list[str], references: list[str]) -> tuple[dict[str, Any], list[list[int]]]:
    """Translate everything once (after a few sentences to warm up); the row's numbers and the output ids."""
    list(translator.translate_lines(texts[:16]))
    start = time.perf_counter()
    results = list(translator.translate_lines(texts))
    seconds = time.perf_counter() - start
    tokens = sum(len(r.best.tokens) for r in results)
    bleu = corpus_scores([r.best.text for r in results], references, metrics=("bleu",))["bleu"].score
    row = {"seconds": seconds, "sentences/s": len(texts) / seconds, "target tokens/s": tokens / seconds, "BLEU": bleu}
    return row, [r.best.tokens for r in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("work/quickstart/transformer/averaged.pt"))
    parser.add_argument("--src", type=Path, default=Path("work/quickstart/test.src"))
    parser.add_argument("--ref", type=Path, default=Path("work/quickstart/test.ref"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=0, help="First N sentences only (0 = all).")
    parser.add_argument("--output", type=Path, default=Path("work/bench/engines.json"))
    args = parser.parse_args()
    tune_cpu(args.threads)
    texts, references = list(read_lines(args.src)), list(read_lines(args.ref))
    if args.limit:
        texts, references = texts[: args.limit], references[: args.limit]
    checkpoint = load_checkpoint(args.model)
    load, ceilings = [os.getloadavg()[0]], [matmul_gflops()]
    rows: list[dict[str, Any]] = []
    outputs: dict[tuple[str, str], list[list[int]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = export_checkpoint(args.model, Path(tmp) / "ct2")
        for precision in ("fp32", "int8"):
            quantize = "int8" if precision == "int8" else "none"
            for search, options in SEARCHES.items():
                decode = replace(checkpoint.config.decode, **options)
                engines: dict[str, Translator] = {
                    "nmt": Translator(checkpoint, decode=decode, device="cpu", precision="fp32", quantize=quantize)}
                if search != "beam 5":  # CTranslate2 has no exact stopping rule
                    engines["ctranslate2"] = CT2Translator(folder, decode=decode, device="cpu", precision="fp32",
                                                           quantize=quantize, threads=args.threads)
                for engine, translator in engines.items():
                    row, ids = run(translator, texts, references)
                    reference = outputs.setdefault(("fp32", search), ids)
                    identical = sum(a == b for a, b in zip(ids, reference, strict=True)) / len(ids)
                    rows.append({"engine": engine, "precision": precision, "search": search, **row,
                                 "identical": f"{100 * identical:.1f}%"})
                    print(rows[-1], flush=True)
    load.append(os.getloadavg()[0])
    ceilings.append(matmul_gflops())
    note = (f"{len(texts)} sentences, {args.threads} threads, fp32 ceiling {ceilings[0]:.0f} -> {ceilings[1]:.0f} "
            f"GFLOP/s, load average {load[0]:.1f} -> {load[1]:.1f}")
    print_table(f"nmt vs CTranslate2 ({note})", rows,
                ["engine", "precision", "search", "sentences/s", "target tokens/s", "BLEU", "identical"])
    write_json(args.output, {"machine": machine(), "model": str(args.model), "sentences": len(texts),
                             "threads": args.threads, "gflops_before_after": ceilings, "load_before_after": load,
                             "rows": rows})


if __name__ == "__main__":
    main()
