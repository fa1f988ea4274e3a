"""nmt against CTranslate2 on the same weights: greedy and beam 5, fp32 and int8, one machine, one run.

    python recipes/bench/engines.py --model work/quickstart/transformer/final.pt \
        --src work/quickstart/test.src --ref work/quickstart/test.ref      # table + work/bench/engines.json

The checkpoint is exported once (`nmt export`, fp32 weights); CTranslate2's int8 rows compute in int8
from those weights, nmt's use dynamic int8 linear layers. Three engines per precision and search:
- "nmt": nmt's own search; its beam runs with its exact stopping rule and with `--early-stop`;
- "nmt --engine ctranslate2": `CT2Translator`, nmt's translator around CTranslate2;
- "ctranslate2 raw": `ctranslate2.Translator.translate_batch` called as its users call it: SentencePiece
  pieces in, its own batching (batch_type="tokens", max_batch_size 2048 source tokens, sorted by length),
  its own length penalty (its average form, with the checkpoint's alpha), early stopping, one hypothesis,
  and per batch a max_decoding_length equal to nmt's limit for the batch's longest sentence.
Each row translates the whole test set in batch mode and reports sentences/s, target tokens/s (EOS
counted), BLEU, and the share of outputs identical to nmt fp32 with the same search (the early-stop
row for CTranslate2's beam). The load average and the fp32 matrix-product ceiling are recorded before and
after: timings on a shared machine are only as quiet as it was.
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
from nmt.config import DecodeConfig
from nmt.data import encode_source, pad_sources
from nmt.device import tune_cpu
from nmt.engines import CT2Translator
from nmt.evaluate import corpus_scores
from nmt.export import ExportedModel, export_checkpoint, pieces
from nmt.io import read_lines
from nmt.search import max_output_lengths
from nmt.tokenizer import EOS_ID
from nmt.translate import Translator

RAW_BATCH_TOKENS = 2048
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


def run_raw(folder: Path, decode: DecodeConfig, compute_type: str, threads: int, texts: list[str],
            references: list[str]) -> tuple[dict[str, Any], list[list[int]]]:
    """CTranslate2 as its users run it (see the module notes); timed from text to text, as nmt's rows."""
    import ctranslate2

    exported = ExportedModel(folder)
    engine = ctranslate2.Translator(str(folder), device="cpu", compute_type=compute_type, intra_threads=threads)
    src_pieces, tgt_ids = pieces(exported.src_tokenizer), {p: i for i, p in enumerate(pieces(exported.tgt_tokenizer))}
    options = {"beam_size": decode.beam, "length_penalty": decode.alpha, "max_batch_size": RAW_BATCH_TOKENS,
               "batch_type": "tokens", "max_input_length": 0}

    def translate(lines: list[str]) -> list[list[int]]:
        sources = [encode_source(exported.src_tokenizer, line) for line in lines]
        limits = max_output_lengths(pad_sources(sources)[1], decode, exported.max_positions).tolist()
        order = sorted(range(len(sources)), key=lambda i: len(sources[i]), reverse=True)
        found: list[list[int]] = [[] for _ in sources]
        start = 0
        while start < len(order):  # CTranslate2's own batches, each with its longest sentence's limit
            count = max(1, RAW_BATCH_TOKENS // len(sources[order[start]]))
            batch = order[start:start + count]
            outputs = engine.translate_batch([[src_pieces[t] for t in sources[i][:-1]] for i in batch],
                                             max_decoding_length=max(limits[i] for i in batch), **options)
            for i, output in zip(batch, outputs, strict=True):
                found[i] = [tgt_ids[p] for p in output.hypotheses[0]] + [EOS_ID]
            start += count
        return found

    translate(texts[:16])
    start = time.perf_counter()
    ids = translate(texts)
    hypotheses = [exported.tgt_tokenizer.decode(i[:-1]) for i in ids]
    seconds = time.perf_counter() - start
    bleu = corpus_scores(hypotheses, references, metrics=("bleu",))["bleu"].score
    tokens = sum(map(len, ids))
    return {"seconds": seconds, "sentences/s": len(texts) / seconds, "target tokens/s": tokens / seconds,
            "BLEU": bleu}, ids


def measure(model: Path, texts: list[str], references: list[str], threads: int) -> list[dict[str, Any]]:
    """Every engine, precision and search, in one process, one after another."""
    checkpoint = load_checkpoint(model)
    rows: list[dict[str, Any]] = []
    outputs: dict[str, list[list[int]]] = {}

    def record(engine: str, precision: str, search: str, row: dict[str, Any], ids: list[list[int]]) -> None:
        reference = outputs.setdefault(search, ids)  # nmt fp32 runs first
        identical = sum(a == b for a, b in zip(ids, reference, strict=True)) / len(ids)
        rows.append({"engine": engine, "precision": precision, "search": search, **row,
                     "identical": f"{100 * identical:.1f}%"})
        print(rows[-1], flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        folder = export_checkpoint(model, Path(tmp) / "ct2")
        for precision in ("fp32", "int8"):
            quantize = "int8" if precision == "int8" else "none"
            for search, options in SEARCHES.items():
                decode = replace(checkpoint.config.decode, **options)
                record("nmt", precision, search, *run(Translator(checkpoint, decode=decode, device="cpu",
                                                                 precision="fp32", quantize=quantize),
                                                      texts, references))
                if search == "beam 5":  # CTranslate2 has no exact stopping rule
                    continue
                ours = CT2Translator(folder, decode=decode, device="cpu", precision="fp32", quantize=quantize,
                                     threads=threads)
                record("nmt --engine ctranslate2", precision, search, *run(ours, texts, references))
                compute_type = "int8" if precision == "int8" else "float32"
                record("ctranslate2 raw", precision, search,
                       *run_raw(folder, decode, compute_type, threads, texts, references))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("work/quickstart/transformer/final.pt"))
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
    load, ceilings = [os.getloadavg()[0]], [matmul_gflops()]
    rows = measure(args.model, texts, references, args.threads)
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
