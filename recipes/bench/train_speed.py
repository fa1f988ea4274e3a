"""Training throughput on prepared data: target tokens/s and model-FLOPs utilisation.

    python recipes/bench/train_speed.py --data work/multi30k/data [--models transformer,lstm] [--updates 12]
    python recipes/bench/train_speed.py --data work/bench/opus-mt-data --models opus-mt=work/bench/opus-mt.pt

Runs the real `Trainer.update` (loss, backward, clipping, AdamW) on the reference
models: the small Transformer (3+3 layers, d_model 256, 4 heads, FFN 1024) and the
LSTM baseline of recipes/multi30k/lstm.toml, with 4,096-token batches; a model given as
NAME=CHECKPOINT is that checkpoint's (`train.init_from`: an imported OPUS-MT model, say,
on data that `nmt prepare --tokenizer-from` encoded with its tokenizers). The
matrix-product ceiling is timed before and after each measurement; a run during
which it dropped by more than 15% is marked "noisy". Utilisation is reported two
ways: the model's own FLOP count (3 × forward, `flops_per_token`) and 6 × parameters
× tokens (the count fairseq comparisons use). bf16 runs only where the CPU has
native bf16 instructions (or with --force-bf16). Peak memory covers the warm-up
and timed updates (`common.peak_memory`), with the model, optimiser and data resident.
`--compile both` adds a `train.compile` row beside each eager one (its compilation
falls in the warm-up updates).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

from common import machine, matmul_gflops, peak_memory, print_table, write_json
from nmt.config import Config, merge, parse_overrides
from nmt.device import tune_cpu
from nmt.precision import cpu_has_native_bf16
from nmt.train import Trainer

MODELS = {
    "transformer": [],
    "lstm": ["model.arch=rnn", "model.cell=lstm", "model.embed_dim=256", "model.hidden_size=512",
             "model.enc_layers=2", "model.dec_layers=2", "model.dropout=0.3", "train.scheduler=plateau",
             "train.warmup=0"],
}


def measure(data: Path, model: str, precision: str, updates: int, warmup: int, max_tokens: int,
            compiled: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as run_dir:
        config = Config()
        name, _, checkpoint = model.partition("=")
        model_options = [f'train.init_from="{checkpoint}"'] if checkpoint else MODELS[name]
        merge(config, parse_overrides([*model_options, f'train.data="{data}"', f'train.run_dir="{run_dir}"',
                                       f'train.precision="{precision}"', f"train.max_tokens={max_tokens}",
                                       f"train.compile={str(compiled).lower()}"]))
        trainer = Trainer(config)
        batches = trainer.sampler.batches(1)
        split = trainer.train_split
        src_len = float(split.src_lengths.mean()) + 1
        tgt_len = float(split.tgt_lengths.mean()) + 1
        before = matmul_gflops()  # outside the peak window: its matrices are not the trainer's
        with peak_memory(trainer.device) as peak:
            for group in batches[:warmup]:
                trainer.update([group])
            times, tokens = [], []
            for group in batches[warmup:warmup + updates]:
                start = time.perf_counter()
                _, _, count = trainer.update([group])
                times.append(time.perf_counter() - start)
                tokens.append(count)
        after = matmul_gflops()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            trainer.update([batches[warmup + updates]])
        total = sum(e.self_cpu_time_total for e in prof.key_averages())
        top = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
        rate = sum(tokens) / sum(times)
        model_flops = 3 * trainer.model.flops_per_token(round(src_len), round(tgt_len))
        params = trainer.model.num_parameters()
        ceiling = max(before, after)
        noisy = after < 0.85 * before or before < 0.85 * after
        return {
            "model": name + (" (compiled)" if compiled else ""),
            "precision": precision if precision != "auto" else f"auto: {trainer.precision.name}",
            "parameters": params,
            "tokens_per_s": rate,
            "seconds_per_update": statistics.median(times),
            "model_gflops": rate * model_flops / 1e9,
            "mfu_model_count": rate * model_flops / 1e9 / ceiling,
            "gflops_6pt": rate * 6 * params / 1e9,
            "mfu_6pt": rate * 6 * params / 1e9 / ceiling,
            "ceiling_before": before,
            "ceiling_after": after,
            "peak_mib": peak.mib,
            "note": "; ".join(filter(None, [trainer.precision.reason if precision == "auto" else "",
                                            "noisy" if noisy else "", peak.note])),
            "profile": [{"op": e.key, "share": e.self_cpu_time_total / total} for e in top],
        }


def measure_all(data: Path, models: list[str], precisions: list[str], updates: int, warmup: int, max_tokens: int,
                force_bf16: bool = False, compile_modes: tuple[bool, ...] = (False,)) -> list[dict]:
    """One row per model, precision and compile mode; emulated bf16 is slower than fp32, so it is skipped
    unless forced."""
    rows = []
    for model in models:
        for precision in precisions:
            if precision == "bf16" and not (cpu_has_native_bf16() or force_bf16):
                rows.append({"model": model.partition("=")[0], "precision": precision,
                             "note": "skipped: no native bf16 on this CPU"})
                continue
            for compiled in compile_modes:
                rows.append(measure(data, model, precision, updates, warmup, max_tokens, compiled))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="directory written by nmt prepare")
    parser.add_argument("--models", default="transformer,lstm",
                        help=f"comma-separated: {', '.join(MODELS)} or NAME=CHECKPOINT (that checkpoint's model)")
    parser.add_argument("--precisions", default="fp32,bf16,auto", help="auto: what precision=auto picks here, and why")
    parser.add_argument("--updates", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = all cores)")
    parser.add_argument("--force-bf16", action="store_true", help="measure bf16 even without native bf16 instructions")
    parser.add_argument("--compile", choices=["off", "on", "both"], default="off", help="train.compile rows")
    parser.add_argument("--out", type=Path, default=Path("work/bench/train_speed.json"))
    args = parser.parse_args()
    tune_cpu(args.threads)  # what nmt train does; the library leaves threads alone
    modes = {"off": (False,), "on": (True,), "both": (False, True)}[args.compile]
    rows = measure_all(args.data, args.models.split(","), args.precisions.split(","), args.updates, args.warmup,
                       args.max_tokens, args.force_bf16, modes)
    print_table("Training throughput", rows, ["model", "precision", "parameters", "tokens_per_s", "seconds_per_update",
                                              "model_gflops", "mfu_model_count", "gflops_6pt", "mfu_6pt",
                                              "ceiling_before", "ceiling_after", "peak_mib", "note"])
    for row in rows:
        if "profile" in row:
            print(f"{row['model']} {row['precision']}: "
                  + ", ".join(f"{p['op']} {p['share']:.0%}" for p in row["profile"]))
    write_json(args.out, {"machine": machine(), "results": rows})


if __name__ == "__main__":
    main()
