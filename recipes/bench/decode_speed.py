"""Decoding speed and quality on a test set: greedy and beam 5, fp32 / bf16 / int8 / auto, batch and one at a time.

    python recipes/bench/decode_speed.py --model transformer=work/multi30k/transformer/final.pt \
        --model lstm=work/multi30k/lstm/final.pt --src work/multi30k/test.src --ref work/multi30k/test.ref

For every model, precision and search it reports sentences/s and target tokens/s
in batch mode, the mean latency of translating sentences one at a time, and BLEU,
so speed is never bought with quality. For Transformers it also runs beam 5
through `NoCacheDecoder`, the straightforward implementation that re-runs the
decoder over the whole prefix at every step, to show what the key/value cache buys.
Peak memory covers each row's translation (`common.peak_memory`), with the model resident.
A second table gives, per model in fp32, one decoding step at 1, 16 and 128 sentences (greedy and
beam 5): the operators it dispatches and its milliseconds (`step_profile.py`).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from step_profile import profile

from common import machine, matmul_gflops, peak_memory, print_table, write_json
from nmt.data import encode_source
from nmt.device import autocast, tune_cpu
from nmt.evaluate import corpus_scores
from nmt.models import Seq2Seq
from nmt.models.transformer import Transformer
from nmt.precision import cpu_has_native_bf16
from nmt.translate import BATCH_TOKENS, Translator, translate_ids


class NoCacheDecoder:
    """The reference path: the model interface with `step` recomputing the decoder over the whole prefix."""

    def __init__(self, model: Seq2Seq) -> None:
        self.model = model
        self.max_positions = model.max_positions

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode(src, src_mask)

    def init_state(self, memory: torch.Tensor, src_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        prefix = torch.zeros(memory.size(0), 0, dtype=torch.long, device=memory.device)
        return {"memory": memory, "src_mask": src_mask, "prefix": prefix}

    def step(self, tokens: torch.Tensor,
             state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        m = self.model
        prefix = torch.cat([state["prefix"], tokens[:, None]], dim=1)  # (B, t)
        x = m._with_positions(m.embed.target(prefix))
        mask = state["src_mask"][:, None, None, :]
        for layer in m.decoder:
            x = layer(x, layer.cross_attn.keys_values(state["memory"]), mask)
        logits = m.output(m.decoder_norm(x[:, -1]))
        return torch.log_softmax(logits.float(), dim=-1), {**state, "prefix": prefix}

    def reorder_state(self, state: dict[str, torch.Tensor], rows: torch.Tensor,
                      sentences: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return {key: value.index_select(0, rows) for key, value in state.items()}  # every entry is per row here


def run(translator: Translator, model: Any, sources: list[list[int]], beam: int, latency_count: int,
        references: list[str]) -> dict[str, Any]:
    decode = replace(translator.decode, beam=beam, nbest=1)
    with (peak_memory(translator.device) as peak, torch.inference_mode(),
          autocast(translator.device, translator.amp_dtype)):
        start = time.perf_counter()
        results = translate_ids(model, sources, decode, translator.batch_tokens, translator.device)
        seconds = time.perf_counter() - start
        start = time.perf_counter()
        for source in sources[:latency_count]:
            translate_ids(model, [source], decode, translator.batch_tokens, translator.device)
        latency = (time.perf_counter() - start) / max(latency_count, 1)
    hypotheses = [translator.tgt_tokenizer.decode(r[0].tokens) for r in results]
    tokens = sum(len(r[0].tokens) for r in results)
    bleu = corpus_scores(hypotheses, references, metrics=("bleu",))["bleu"].score
    return {"sentences_per_s": len(sources) / seconds, "tokens_per_s": tokens / seconds,
            "latency_ms": latency * 1000, "bleu": bleu, "seconds": seconds, "peak_mib": peak.mib, "note": peak.note}


def measure_model(name: str, path: Path, texts: list[str], references: list[str], precisions: list[str],
                  latency_count: int, batch_tokens: int, no_cache: bool = True) -> list[dict[str, Any]]:
    """One row per precision and search of one checkpoint; emulated bf16 is slower than fp32, so it is skipped."""
    rows: list[dict[str, Any]] = []
    for precision in precisions:
        if precision == "bf16" and not cpu_has_native_bf16():
            rows.append({"model": name, "precision": "bf16", "note": "skipped: no native bf16 on this CPU"})
            continue
        translator = Translator.from_checkpoint(
            path, device="cpu", batch_tokens=batch_tokens,
            precision="fp32" if precision == "int8" else precision, quantize="int8" if precision == "int8" else "none",
        )
        label_precision = f"auto: {translator.precision.name}" if precision == "auto" else precision
        sources = [encode_source(translator.src_tokenizer, t) for t in texts]
        paths = [("kv-cache", translator.model)]
        if no_cache and precision == "fp32" and isinstance(translator.model, Transformer):
            paths.append(("no-cache", NoCacheDecoder(translator.model)))
        for label, model in paths:
            for beam in ((1, 5) if label == "kv-cache" else (5,)):
                result = run(translator, model, sources, beam, latency_count, references)
                rows.append({"model": name, "precision": label_precision,
                             "mode": f"{'greedy' if beam == 1 else 'beam 5'} {label}", **result})
                if precision == "auto":
                    rows[-1]["note"] = "; ".join(filter(None, [translator.precision.reason, rows[-1]["note"]]))
                print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="NAME=CHECKPOINT (repeatable)")
    parser.add_argument("--src", type=Path, required=True)
    parser.add_argument("--ref", type=Path, required=True)
    parser.add_argument("--precisions", default="fp32,bf16,int8,auto", help="auto: what precision=auto picks here")
    parser.add_argument("--latency-sentences", type=int, default=50)
    parser.add_argument("--batch-tokens", type=int, default=BATCH_TOKENS)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("work/bench/decode_speed.json"))
    args = parser.parse_args()
    tune_cpu(args.threads)
    texts = args.src.read_text(encoding="utf-8").splitlines()
    references = args.ref.read_text(encoding="utf-8").splitlines()
    rows: list[dict[str, Any]] = []
    ceilings = [matmul_gflops()]
    for spec in args.model:
        name, _, path = spec.partition("=")
        rows += measure_model(name, Path(path), texts, references, args.precisions.split(","), args.latency_sentences,
                              args.batch_tokens)
    steps = []
    for spec in args.model:
        name, _, path = spec.partition("=")
        translator = Translator.from_checkpoint(Path(path), device="cpu", precision="fp32")
        vocab = translator.checkpoint.config.model.src_vocab_size
        steps += [{"model": name, **row} for row in profile(translator.model, vocab, translator.decode, timed=True)]
    ceilings.append(matmul_gflops())
    print_table("Decoding on the test set", rows, ["model", "precision", "mode", "sentences_per_s", "tokens_per_s",
                                                   "latency_ms", "bleu", "peak_mib", "note"])
    print_table("One decoding step in fp32 (step_profile.py)", steps,
                ["model", "search", "sentences", "ops/step", "model ops", "search ops", "ms/step"])
    write_json(args.out, {"machine": machine(), "ceiling_gflops_before_after": ceilings, "results": rows,
                          "steps": steps})


if __name__ == "__main__":
    main()
