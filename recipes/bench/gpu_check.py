"""Prove nmt's GPU path and measure it, in one run: a table per section and one JSON file.

    python recipes/bench/gpu_check.py --data work/multi30k/data --src work/multi30k/test.src \
        --ref work/multi30k/test.ref                     # on a GPU machine, under 8 minutes on one GPU
    python recipes/bench/gpu_check.py --dry              # anywhere: tiny model and data, every step exercised

Sections: environment; CPU vs device parity of loss and gradients on the same weights (fp32, bf16; on
CUDA also TF32, and fp16 scaled as the trainer does); training throughput of the Transformer and the LSTM
at 4k, 16k and 64k-token batches in bf16 and fp32 (TF32 on CUDA, as `nmt train`) with MFU, peak memory,
host syncs and kernel launches per update, then (last: it compiles for minutes) the Transformer at 64k in
bf16 under `train.compile`; resume exactness with and without `train.deterministic`; `nmt train --device`
and `--resume`; `nmt translate` greedy and beam 5 in bf16 and fp32: BLEU, agreement with the CPU, search
host syncs. A failed section or row is recorded and the rest run, the JSON is rewritten after each section,
and what would start past `--budget` seconds is skipped. `--dry`: CPU, tiny model, generated data (tests).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from common import matmul_gflops, print_table, write_json
from nmt.config import Config, merge, parse_overrides
from nmt.data import Sources, TextFiles, collate, prepare
from nmt.device import autocast
from nmt.evaluate import corpus_scores
from nmt.loss import label_smoothed_loss
from nmt.tokenizer import Tokenizer, train_sentencepiece
from nmt.train import Trainer, latest_checkpoint
from nmt.translate import Translator

PEAK_TFLOPS = (  # dense peaks: bf16 and TF32 on the tensor cores, fp32 without them; the first name found wins
    ("H100 PCIe", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.0}),
    ("H100 NVL", {"bf16": 835.0, "tf32": 418.0, "fp32": 60.0}),
    ("H100", {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0}),  # SXM
    ("H200", {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0}),  # also GH200
    ("A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
)
TOLERANCES = {"fp32": 1e-4, "tf32": 2e-2, "bf16": 5e-2, "fp16": 2e-2}  # largest relative gradient difference
# CUDA API calls the host waits in (a D2H copy: cudaMemcpyAsync + cudaStreamSynchronize); not cudaDeviceSynchronize,
# which the profiler calls itself as it stops (nmt never does)
SYNC_CALLS = frozenset({"cudaStreamSynchronize", "cudaEventSynchronize", "cudaMemcpy", "cuStreamSynchronize",
                        "cuEventSynchronize", "cuCtxSynchronize"})
LAUNCH_CALLS = frozenset({"cudaLaunchKernel", "cudaLaunchKernelExC", "cudaLaunchCooperativeKernel", "cuLaunchKernel",
                          "cuLaunchKernelEx", "cudaGraphLaunch", "cuGraphLaunch"})  # Triton: cuLaunchKernel(Ex)
API_SUFFIX = re.compile(r"(_v\d+|_ptsz|_ptds)+$")  # in CUDA API event names: cudaLaunchKernel_v7000, _ptsz
COMPILE_SECONDS = 150  # budget the train.compile row needs left to start
MODELS = {"transformer": [], "lstm": ["model.arch=rnn", "model.cell=lstm", "model.embed_dim=256",
                                      "model.hidden_size=512", "model.enc_layers=2", "model.dec_layers=2"]}
TINY = ["model.d_model=32", "model.heads=2", "model.ffn_dim=64", "model.enc_layers=1", "model.dec_layers=1",
        "model.embed_dim=32", "model.hidden_size=32"]


@dataclass
class Run:
    """What every section needs: data, device, a scratch directory and the deadline."""

    data: Path
    src: Path
    ref: Path
    device: torch.device
    dry: bool
    work: Path
    deadline: float
    cuda: bool

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def check(self, what: str, need: float = 0.0) -> None:
        if self.left() < need:
            raise TimeoutError(f"{what} skipped: {max(self.left(), 0.0):.0f} s of the time budget left")


def environment(run: Run) -> dict[str, Any]:
    """torch, CUDA, the GPU and the peaks its MFU is computed from."""
    found: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(run.device),
                             "fp32 ceiling GFLOP/s (CPU 2048^2)": round(matmul_gflops(), 1)}
    if not run.cuda:
        return {**found, "gpu": "none", "bf16": "emulated or native CPU"}
    props = torch.cuda.get_device_properties(run.device)
    found.update({"gpu": props.name, "capability": f"{props.major}.{props.minor}", "SMs": props.multi_processor_count,
                  "memory GiB": round(props.total_memory / 2**30, 1), "cudnn": torch.backends.cudnn.version(),
                  "bf16": torch.cuda.is_bf16_supported(including_emulation=False),  # native, not emulated
                  "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG", ""),
                  **{f"{name} peak TFLOP/s (MFU's)": _peak(run.device, name) or "?" for name in ("bf16", "tf32")}})
    return found


@contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    """float32 products on the tensor cores in TF32 (what `nmt train` and `nmt translate` turn on), or not."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def config_for(run: Run, name: str, model: str, *extra: str) -> Config:
    config = Config()
    merge(config, parse_overrides([*MODELS[model], *(TINY if run.dry else []), f'train.data="{run.data}"',
                                   f'train.run_dir="{run.work / name}"', "train.valid_bleu=false",
                                   "train.best_metric=loss", "train.log_every=1", *extra]))
    return config


def parity(run: Run) -> list[dict[str, Any]]:
    """Loss and gradients of one batch on the CPU (fp32) and on the device in each precision, same weights."""
    trainer = Trainer(config_for(run, "parity", "transformer", "train.device=cpu", "model.dropout=0",
                                 "train.precision=fp32", "train.max_tokens=2000"))
    model, cpu = trainer.model, torch.device("cpu")
    batch = collate([trainer.train_split[i] for i in trainer.sampler.batches(1)[0]])
    loss_cpu, reference, _ = _grads(model, batch, cpu, "fp32")
    rows = []
    for name in ("fp32", "bf16", "tf32", "fp16") if run.cuda else ("fp32", "bf16"):
        with _tf32(name == "tf32"):  # fp32 proper, then TF32 products as nmt train's fp32 runs them on CUDA
            loss, grads, scale = _grads(model.to(run.device), batch.to(run.device), run.device, name)
        worst = max(float((g.cpu() - r).norm() / r.norm().clamp(min=1e-12)) for g, r in zip(grads, reference,
                                                                                             strict=True))
        worst = worst if worst == worst else float("inf")  # NaN: an overflow
        model.to(cpu)
        rows.append({"precision": name, "loss cpu": loss_cpu, "loss device": loss, "loss scale": scale,
                     "max rel grad diff": worst, "ok": worst <= TOLERANCES[name]})
    return rows


def _grads(model: torch.nn.Module, batch: Any, device: torch.device, name: str) -> tuple[float, list[Any], float]:
    """Summed loss and fp32 gradients per token as the trainer's: fp16 scales the summed loss from 2**16,
    halved after each overflow as by the GradScaler."""
    dtype, scale = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(name), 2.0**16 if name == "fp16" else 1.0
    while True:
        model.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            features = model(batch.src, batch.src_mask, batch.tgt_in, features_only=True)
            loss, _ = label_smoothed_loss(features, model.output_projection(), batch.tgt_out, 0.1)
        (loss * scale).backward()
        grads = [p.grad.float() / (scale * batch.tgt_tokens) for p in model.parameters() if p.grad is not None]
        if name != "fp16" or scale < 1.0 or all(bool(g.isfinite().all()) for g in grads):
            return float(loss.detach()), grads, scale
        scale /= 2


def throughput(run: Run, compiled: bool = False) -> list[dict[str, Any]]:
    """Each model at each batch size in each precision; `compiled`: the Transformer at the largest batch in
    bf16 under train.compile (run last, as it compiles for minutes)."""
    sizes = (600,) if run.dry else (4096, 16384, 65536)
    cases = [("transformer", sizes[-1], "bf16")] if compiled else [
        (model, tokens, precision) for model in MODELS for tokens in sizes for precision in ("bf16", "fp32")]
    return [_guarded(partial(_throughput_row, run, model, tokens, precision, compiled), model=model
                     + (" compiled" if compiled else ""), **{"batch tokens": tokens, "precision": precision})
            for model, tokens, precision in cases]


def _throughput_row(run: Run, model: str, tokens: int, precision: str, compiled: bool = False) -> dict[str, Any]:
    """Tokens/s of 3-30 updates (1.5 s) prefetching as in training, after 2 warm-up ones; then one profiled."""
    run.check(f"{model} at {tokens} tokens in {precision}", COMPILE_SECONDS if compiled and not run.dry else 0.0)
    trainer = Trainer(config_for(run, f"tp_{model}_{tokens}_{precision}_{compiled}", model,
                                 f"train.device={run.device}", f"train.precision={precision}",
                                 f"train.max_tokens={tokens}", f"train.compile={str(compiled).lower()}"))
    batches, done = trainer.sampler.batches(1), [0]

    def update() -> int:  # batches repeat where an epoch has fewer than the updates
        i = done[0] = done[0] + 1
        return trainer.update([batches[i % len(batches)]], [batches[(i + 1) % len(batches)]])[2]

    with _tf32(True):  # fp32 as nmt train runs it
        for _ in range(2):
            update()
        run.synchronize()
        if run.cuda:
            torch.cuda.reset_peak_memory_stats(run.device)
        start, count, timed = time.perf_counter(), 0, 0
        while timed < (2 if run.dry else 3) or (not run.dry and timed < 30 and time.perf_counter() - start < 1.5):
            count, timed = count + update(), timed + 1
        run.synchronize()
        rate = count / (time.perf_counter() - start)
        syncs, launches, kernels = _profile(run, update)
    key = "tf32" if precision == "fp32" and run.cuda else precision
    peak, flops = _peak(run.device, key) if run.cuda else None, 6 * _multiplying_parameters(trainer.model) * rate
    mfu = f"{flops / (peak * 1e12):.1%}" if peak else "unknown peak" if run.cuda else ""
    mib = round(torch.cuda.max_memory_allocated(run.device) / 2**20) if run.cuda else ""
    return {"model": model + (" compiled" if compiled else ""), "batch tokens": tokens,
            "precision": "fp32 (TF32)" if key == "tf32" else precision, "updates timed": timed,
            "tokens/s": round(rate), "MFU": mfu, "host syncs/update": syncs, "kernel launches/update": launches,
            "GPU kernels/update": kernels, "peak MiB": mib}


def _multiplying_parameters(model: torch.nn.Module) -> int:
    """Parameters worth 6 FLOPs a token: not embedding tables (looked up) unless also the output matrix."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    output = model.output_projection()
    return sum(p.numel() for p in model.parameters() if id(p) not in tables or p is output)


def _profile(run: Run, action: Callable[[], Any]) -> tuple[int, int | str, int | str]:
    """Host syncs, kernel launches (API calls) and GPU kernels of `action`; on a CPU: values read (item)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if run.cuda else [])
    with profile(activities=activities) as prof:
        action()
        run.synchronize()
    events = prof.key_averages()
    if not run.cuda:
        return sum(e.count for e in events if e.key == "aten::_local_scalar_dense"), "", ""
    syncs = sum(e.count for e in events if API_SUFFIX.sub("", e.key) in SYNC_CALLS)
    launches = sum(e.count for e in events if API_SUFFIX.sub("", e.key) in LAUNCH_CALLS)
    kernels = sum(e.count for e in events if e.device_type == DeviceType.CUDA and e.key[:6] not in ("Memcpy", "Memset"))
    if not launches and not kernels:
        return syncs, "no CUDA events (CUPTI?)", ""
    return syncs, launches, kernels


def _peak(device: torch.device, precision: str) -> float | None:
    name = torch.cuda.get_device_name(device)
    return next((peaks[precision] for gpu, peaks in PEAK_TFLOPS if gpu in name), None)


def resume(run: Run) -> list[dict[str, Any]]:
    """An uninterrupted run against one stopped half-way and resumed: equal parameters, bitwise?"""
    return [_guarded(partial(_resume_row, run, deterministic), deterministic=deterministic)
            for deterministic in (False, True)]


def _resume_row(run: Run, deterministic: bool) -> dict[str, Any]:
    run.check(f"resume (deterministic={deterministic})")
    common = [f"train.device={run.device}", "train.precision=fp32", f"train.deterministic={str(deterministic).lower()}",
              "train.max_tokens=1000", "train.valid_every=0"]
    straight = Trainer(config_for(run, f"r{deterministic}a", "transformer", *common, "train.max_updates=8")).train()
    config = config_for(run, f"r{deterministic}b", "transformer", *common, "train.max_updates=4")
    Trainer(config).train()
    config.train.max_updates = 8
    resumed = Trainer(config, resume=True).train()
    a, b = (torch.load(r.last_checkpoint, map_location="cpu", weights_only=True)["model"] for r in (straight, resumed))
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    return {"deterministic": deterministic, "bitwise equal": worst == 0.0, "max abs diff": worst}


def cli(run: Run) -> list[dict[str, Any]]:
    """nmt train --device, --resume, then nmt translate greedy and beam 5 in bf16 and fp32."""
    directory, updates = run.work / "cli", 6 if run.dry else 300
    tiny = [a for item in (TINY if run.dry else []) for a in ("--set", item)]
    nmt = [str(Path(sys.executable).with_name("nmt"))]
    _run(run, [*nmt, "train", "--data", str(run.data), "--run-dir", str(directory), "--device", str(run.device),
               "--max-updates", str(updates), *tiny, "--set", "train.valid_every=0"])
    note = ""
    try:  # a failed resume still leaves a checkpoint to translate with
        _run(run, [*nmt, "train", "--run-dir", str(directory), "--resume", "--max-updates", str(updates * 7 // 6 + 1)])
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        traceback.print_exc()
        note = f"nmt train --resume failed: {type(exc).__name__}: {exc}"[:300]
    model = latest_checkpoint(directory)
    texts, refs = run.src.read_text(encoding="utf-8").splitlines(), run.ref.read_text(encoding="utf-8").splitlines()
    on_cpu = _translate(run, nmt, model, "cpu", "fp32", 1)
    return [_guarded(partial(_translate_row, run, nmt, model, beam, precision, texts, refs, on_cpu, note),
                     search="greedy" if beam == 1 else "beam 5", precision=precision)
            for beam in (1, 5) for precision in ("bf16", "fp32")]


def _translate_row(run: Run, nmt: list[str], model: Path, beam: int, precision: str, texts: list[str],
                   refs: list[str], on_cpu: list[str], note: str) -> dict[str, Any]:
    """`nmt translate` of the test set, timed; then, in this process, the host syncs of translating its first
    64 sentences (a GPU search reads the device every 8 steps: about its longest output / 8 per batch)."""
    run.check(f"nmt translate beam {beam} {precision}")
    start = time.perf_counter()
    hyps = _translate(run, nmt, model, str(run.device), precision, beam)
    seconds = time.perf_counter() - start
    same = sum(h == c for h, c in zip(hyps, on_cpu, strict=True)) / len(texts) if beam == 1 else None
    with _tf32(True):
        translator = Translator.from_checkpoint(model, device=str(run.device), precision=precision, beam=beam)
        translator.translate(texts[:2])  # warm-up
        found: list[Any] = []
        syncs, _, _ = _profile(run, lambda: found.extend(translator.translate_nbest(texts[:64])))
    return {"search": "greedy" if beam == 1 else "beam 5", "precision": precision,
            "sentences/s (with start-up)": round(len(texts) / seconds, 1),
            "BLEU": round(corpus_scores(hyps, [refs], metrics=("bleu",))["bleu"].score, 2),
            "same as CPU fp32": f"{same:.1%}" if same is not None else "", "host syncs (64 sentences)": syncs,
            "longest output": max((len(h[0].tokens) for h in found if h), default=0), "note": note}


def _translate(run: Run, nmt: list[str], model: Path, device: str, precision: str, beam: int) -> list[str]:
    return _run(run, [*nmt, "translate", "-m", str(model), "-i", str(run.src), "--device", device,
                      "--precision", precision, "--beam", str(beam)]).splitlines()


def _run(run: Run, command: list[str]) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=max(run.left(), 30.0),
                            env={**os.environ, "NMT_PROGRESS": ""})
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def _guarded(action: Callable[[], Any], **label: Any) -> Any:
    """`action`'s result, or `label` and the error that stopped it (an OOM, a missing compiler): the rest still
    run. After it, what it held is freed: the next row's peak memory is its own and it has the whole GPU."""
    try:
        return action()
    except Exception as exc:
        traceback.print_exc()
        return {**label, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    finally:
        torch.use_deterministic_algorithms(False)
        gc.collect()
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()


def toy_data(work: Path) -> tuple[Path, Path, Path]:
    """Generated word-for-word parallel text, prepared, for --dry: the data, valid source and reference."""
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


def _section(report: dict[str, Any], seconds: dict[str, float], key: str, title: str, action: Callable[[], Any],
             run: Run, out: Path) -> None:
    """One section into `report` (or its error), its table, and the JSON rewritten: what ran is kept."""
    started = time.monotonic()
    result = _guarded(lambda: (run.check(title), action())[1])
    result = [*report.get(key, []), result] if "error" in result else result  # a later step's error: added
    report[key], seconds[title] = result, round(time.monotonic() - started, 1)
    rows = [result] if isinstance(result, dict) else result
    print_table(title, rows, list(dict.fromkeys(column for row in rows for column in row)))
    write_json(out, {**report, "seconds": seconds})


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="directory written by nmt prepare (not needed with --dry)")
    parser.add_argument("--src", type=Path, help="test source sentences (with --data)")
    parser.add_argument("--ref", type=Path, help="their reference translations (with --data)")
    parser.add_argument("--dry", action="store_true", help="CPU, tiny model and generated data: every step, quickly")
    parser.add_argument("--out", type=Path, default=Path("work/bench/gpu_check.json"))
    parser.add_argument("--budget", type=float, default=420.0, help="seconds: what would start later is skipped")
    args = parser.parse_args()
    if args.data is not None and not args.dry and (args.src is None or args.ref is None):
        parser.error("--data needs --src and --ref")
    return args


def main() -> None:
    args = _arguments()
    # train.deterministic's cuBLAS workspace, set before the first cuBLAS call: torch reads the variable once, and
    # train.deterministic sets it too late in a process that already multiplied on the GPU (cuBLAS would then raise)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry else "cpu")
    report: dict[str, Any] = {}
    seconds: dict[str, float] = {}  # per section: what the budget went on
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        data, src, ref = toy_data(work) if args.dry or args.data is None else (args.data, args.src, args.ref)
        run = Run(data, src, ref, device, args.dry, work, time.monotonic() + args.budget, device.type == "cuda")
        steps = [(name, name, partial(section, run)) for name, section in (("environment", environment),
                 ("parity", parity), ("throughput", throughput), ("resume", resume), ("cli", cli))]
        steps.append(("throughput", "throughput with train.compile",
                      lambda: [*report["throughput"], *throughput(run, compiled=True)]))
        for key, title, action in steps:
            _section(report, seconds, key, title, action, run, args.out)
    rows = [row for value in report.values() for row in ([value] if isinstance(value, dict) else value)]
    failed = [row for row in rows if "error" in row or row.get("ok") is False]
    sys.exit(json.dumps(failed) if failed else 0)


if __name__ == "__main__":
    main()
