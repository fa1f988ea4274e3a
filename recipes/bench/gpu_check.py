"""Prove nmt's GPU path and measure it, in one run: a table per section and one JSON file.

    python recipes/bench/gpu_check.py --data work/multi30k/data --src work/multi30k/test.src \
        --ref work/multi30k/test.ref                     # on a GPU machine, under 8 minutes on one GPU
    python recipes/bench/gpu_check.py --dry              # anywhere: tiny model and data, every step exercised

Sections: the environment (torch, CUDA, GPU, bf16); CPU vs device parity of loss and gradients on the
same weights (fp32, bf16, and fp16 with its scaler on CUDA); training throughput of the reference
Transformer and the LSTM at 4k, 16k and 64k-token batches in bf16 and fp32, with model-FLOPs
utilisation, peak memory, and host syncs and kernel launches per update from the profiler, and the
Transformer at 64k in bf16 under `train.compile`; resume
exactness with and without `train.deterministic`; `nmt train --device` and `--resume` through the CLI;
`nmt translate` greedy and beam 5 in bf16 and fp32 with BLEU and agreement with the CPU. `--dry` runs
on the CPU with a tiny model and generated data (the test suite runs it so).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from common import matmul_gflops, print_table, write_json
from nmt.config import Config, merge, parse_overrides
from nmt.data import Sources, TextFiles, collate, prepare
from nmt.evaluate import corpus_scores
from nmt.loss import label_smoothed_loss
from nmt.tokenizer import Tokenizer, train_sentencepiece
from nmt.train import Trainer

PEAK_TFLOPS = {"H100": {"bf16": 989.0, "fp32": 494.0}, "H200": {"bf16": 989.0, "fp32": 494.0},
               "A100": {"bf16": 312.0, "fp32": 156.0}}  # dense tensor-core peaks (fp32 = TF32)
TOLERANCES = {"fp32": 1e-4, "bf16": 5e-2, "fp16": 2e-2}  # largest relative gradient difference allowed
SYNC_OPS = ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize")
MODELS = {"transformer": [], "lstm": ["model.arch=rnn", "model.cell=lstm", "model.embed_dim=256",
                                      "model.hidden_size=512", "model.enc_layers=2", "model.dec_layers=2"]}
TINY = ["model.d_model=32", "model.heads=2", "model.ffn_dim=64", "model.enc_layers=1", "model.dec_layers=1",
        "model.embed_dim=32", "model.hidden_size=32"]


def environment(device: torch.device) -> dict[str, Any]:
    cuda = device.type == "cuda"
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if cuda else "none",
            "bf16": torch.cuda.is_bf16_supported() if cuda else "emulated or native CPU",
            "fp32 ceiling GFLOP/s (CPU 2048^2)": round(matmul_gflops(), 1)}


def config_for(data: Path, run_dir: Path, model: str, dry: bool, *extra: str) -> Config:
    config = Config()
    merge(config, parse_overrides([*MODELS[model], *(TINY if dry else []), f'train.data="{data}"',
                                   f'train.run_dir="{run_dir}"', "train.valid_bleu=false",
                                   "train.best_metric=loss", "train.log_every=1", *extra]))
    return config


def parity(data: Path, device: torch.device, dry: bool, work: Path) -> list[dict[str, Any]]:
    """Loss and gradients of one batch on the CPU (fp32) and on `device` in each precision, same weights."""
    trainer = Trainer(config_for(data, work / "parity", "transformer", dry, "train.device=cpu", "model.dropout=0",
                                 "train.precision=fp32", "train.max_tokens=2000"))
    batch = collate([trainer.train_split[i] for i in trainer.sampler.batches(1)[0]])
    reference = _loss_and_grads(trainer.model, batch, torch.device("cpu"), None)
    rows = []
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if name == "fp16" and device.type != "cuda":
            continue
        loss, grads = _loss_and_grads(trainer.model.to(device), batch.to(device), device, dtype)
        worst = max(float((g.cpu() - r).norm() / r.norm().clamp(min=1e-12))
                    for g, r in zip(grads, reference[1], strict=True))
        rows.append({"precision": name, "loss cpu": reference[0], "loss device": loss,
                     "max rel grad diff": worst, "ok": worst <= TOLERANCES[name]})
        trainer.model.to("cpu")
    return rows


def _loss_and_grads(model: torch.nn.Module, batch: Any, device: torch.device,
                    dtype: torch.dtype | None) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        features = model(batch.src, batch.src_mask, batch.tgt_in, features_only=True)
        loss, _ = label_smoothed_loss(features, model.output_projection(), batch.tgt_out, 0.1)
    scaler.scale(loss / batch.tgt_tokens).backward()
    scale = scaler.get_scale() if scaler.is_enabled() else 1.0
    return float(loss.detach()), [p.grad.detach().float() / scale for p in model.parameters() if p.grad is not None]


def throughput(data: Path, device: torch.device, dry: bool, work: Path) -> list[dict[str, Any]]:
    rows = []
    sizes = (600,) if dry else (4096, 16384, 65536)
    for model in MODELS:
        for tokens in sizes:
            for precision in ("bf16", "fp32"):
                rows.append(_throughput_row(data, device, dry, work, model, tokens, precision))
    rows.append(_throughput_row(data, device, dry, work, "transformer", sizes[-1], "bf16", compiled=True))
    return rows


def _throughput_row(data: Path, device: torch.device, dry: bool, work: Path, model: str, tokens: int,
                    precision: str, compiled: bool = False) -> dict[str, Any]:
    """Tokens/s of the real update after 2 warm-up updates (where train.compile compiles)."""
    trainer = Trainer(config_for(data, work / f"tp_{model}_{tokens}_{precision}_{compiled}", model, dry,
                                 f"train.device={device}", f"train.precision={precision}",
                                 f"train.max_tokens={tokens}", f"train.compile={str(compiled).lower()}"))
    batches = trainer.sampler.batches(1)
    timed = 2 if dry else 6
    for group in batches[:2]:
        trainer.update([group])
    _synchronize(device)
    torch.cuda.reset_peak_memory_stats(device) if device.type == "cuda" else None
    start, count = time.perf_counter(), 0
    for group in batches[2:2 + timed]:
        count += trainer.update([group])[2]
    _synchronize(device)
    rate = count / (time.perf_counter() - start)
    syncs, launches = _profile_update(trainer, batches[(2 + timed) % len(batches)])
    flops = 6 * trainer.model.num_parameters() * rate
    return {"model": model + (" compiled" if compiled else ""), "batch tokens": tokens, "precision": precision,
            "tokens/s": round(rate),
            "MFU": _mfu(flops, device, precision), "host syncs/update": syncs, "kernel launches/update": launches,
            "peak MiB": round(torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else ""}


def _profile_update(trainer: Trainer, group: list[int]) -> tuple[int, int]:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        trainer.update([group])
        _synchronize(trainer.device)
    events = prof.key_averages()
    syncs = sum(e.count for e in events if e.key in SYNC_OPS and e.key != "cudaDeviceSynchronize")
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel"))
    return syncs, launches


def _mfu(flops: float, device: torch.device, precision: str) -> str:
    if device.type != "cuda":
        return ""
    name = torch.cuda.get_device_name(device)
    peak = next((p[precision] for gpu, p in PEAK_TFLOPS.items() if gpu in name), None)
    return f"{flops / (peak * 1e12):.1%}" if peak else "unknown peak"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resume(data: Path, device: torch.device, dry: bool, work: Path) -> list[dict[str, Any]]:
    """An uninterrupted run against one stopped half-way and resumed: equal parameters, bitwise?"""
    rows = []
    for deterministic in (False, True):
        common = [f"train.device={device}", "train.precision=fp32", f"train.deterministic={str(deterministic).lower()}",
                  "train.max_tokens=1000", "train.valid_every=0"]
        straight = Trainer(config_for(data, work / f"r{deterministic}a", "transformer", dry, *common,
                                      "train.max_updates=8")).train()
        config = config_for(data, work / f"r{deterministic}b", "transformer", dry, *common, "train.max_updates=4")
        Trainer(config).train()
        config.train.max_updates = 8
        resumed = Trainer(config, resume=True).train()
        a, b = (torch.load(r.last_checkpoint, weights_only=True)["model"] for r in (straight, resumed))
        worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
        rows.append({"deterministic": deterministic, "bitwise equal": worst == 0.0, "max abs diff": worst})
    torch.use_deterministic_algorithms(False)
    return rows


def cli(data: Path, device: torch.device, dry: bool, work: Path, src: Path, ref: Path) -> list[dict[str, Any]]:
    """nmt train --device, --resume, then nmt translate greedy and beam 5 in bf16 and fp32."""
    run, updates = work / "cli", 6 if dry else 300
    tiny = [a for item in (TINY if dry else []) for a in ("--set", item)]
    nmt = [str(Path(sys.executable).with_name("nmt"))]
    _run([*nmt, "train", "--data", str(data), "--run-dir", str(run), "--device", str(device),
          "--max-updates", str(updates), *tiny, "--set", "train.valid_every=0"])
    _run([*nmt, "train", "--run-dir", str(run), "--resume", "--max-updates", str(updates + updates // 6 + 1)])
    model = sorted(run.glob("update_*.pt"))[-1]
    texts, refs = src.read_text(encoding="utf-8").splitlines(), ref.read_text(encoding="utf-8").splitlines()
    on_cpu = _translate(nmt, model, "cpu", "fp32", 1, src)
    rows = []
    for beam in (1, 5):
        for precision in ("bf16", "fp32"):
            start = time.perf_counter()
            hyps = _translate(nmt, model, str(device), precision, beam, src)
            seconds = time.perf_counter() - start
            same = sum(h == c for h, c in zip(hyps, on_cpu, strict=True)) / len(texts) if beam == 1 else ""
            rows.append({"search": "greedy" if beam == 1 else "beam 5", "precision": precision,
                         "sentences/s (with start-up)": round(len(texts) / seconds, 1),
                         "BLEU": round(corpus_scores(hyps, [refs], metrics=("bleu",))["bleu"].score, 2),
                         "same as CPU fp32": f"{same:.1%}" if same != "" else ""})
    return rows


def _translate(nmt: list[str], model: Path, device: str, precision: str, beam: int, src: Path) -> list[str]:
    out = _run([*nmt, "translate", "-m", str(model), "-i", str(src), "--device", device, "--precision", precision,
                "--beam", str(beam)])
    return out.splitlines()


def _run(command: list[str]) -> str:
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "NMT_PROGRESS": ""})
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr}")
    return result.stdout


def toy_data(work: Path) -> tuple[Path, Path, Path]:
    """Generated word-for-word parallel text, prepared: enough for every step of --dry. Returns the data
    and the validation source and reference files."""
    rng = random.Random(0)
    words = list(zip("a man woman dog runs on the street with red ball".split(),
                     "ein mann frau hund läuft auf der straße mit rotem ball".split(), strict=True))
    lines = list({tuple(rng.choice(words) for _ in range(rng.randint(3, 10))) for _ in range(440)})
    for split, part in (("train", lines[:-40]), ("valid", lines[-40:])):
        for side, index in (("en", 0), ("de", 1)):
            text = "".join(" ".join(w[index] for w in line) + "\n" for line in part)
            (work / f"{split}.{side}").write_text(text, encoding="utf-8")
    train_sentencepiece([work / "train.en", work / "train.de"], work / "spm", vocab_size=100, byte_fallback=False)
    tokenizer = Tokenizer.load(work / "spm.model")
    prepare(work / "data", Sources(train=TextFiles(work / "train.en", work / "train.de"),
                                   valid=TextFiles(work / "valid.en", work / "valid.de")), (tokenizer, tokenizer))
    return work / "data", work / "valid.en", work / "valid.de"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="directory written by nmt prepare (not needed with --dry)")
    parser.add_argument("--src", type=Path)
    parser.add_argument("--ref", type=Path)
    parser.add_argument("--dry", action="store_true", help="CPU, tiny model and generated data: every step, quickly")
    parser.add_argument("--out", type=Path, default=Path("work/bench/gpu_check.json"))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry else "cpu")
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        data, src, ref = toy_data(work) if args.dry or args.data is None else (args.data, args.src, args.ref)
        report = {"environment": environment(device), "parity": parity(data, device, args.dry, work),
                  "throughput": throughput(data, device, args.dry, work),
                  "resume": resume(data, device, args.dry, work),
                  "cli": cli(data, device, args.dry, work, src, ref)}
    for section, rows in report.items():
        rows = [rows] if isinstance(rows, dict) else rows
        print_table(section, rows, list(rows[0]))
    write_json(args.out, report)
    failed = [row for row in report["parity"] if not row["ok"]]
    sys.exit(json.dumps(failed) if failed else 0)


if __name__ == "__main__":
    main()
