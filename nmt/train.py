"""The training loop: loss, optimiser, schedule, mixed precision, DDP, validation, checkpoints.

One `Trainer` serves both architectures (they share the model interface) and
every device. A run is exactly resumable: the checkpoint holds the optimiser,
schedule, update/epoch/batch position, every RNG state and the early-stopping
counters, and batches are a pure function of (seed, epoch), so a run stopped at
update k and resumed reaches bitwise the same parameters as one never stopped.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from nmt.checkpoint import Checkpoint, load_checkpoint, write_bytes_atomic
from nmt.config import Config, DecodeConfig, to_toml
from nmt.data import PreparedData, TokenBatchSampler, collate, source_ids
from nmt.device import autocast, keep_freed_memory, resolve_device, set_threads
from nmt.distributed import Distributed
from nmt.errors import NmtError
from nmt.evaluate import corpus_scores
from nmt.loss import label_smoothed_loss
from nmt.models import build_model
from nmt.optim import LearningRate, build_optimizer
from nmt.precision import Precision, check_precision, choose_precision, matrix_shapes
from nmt.translate import translate_ids

HIGHER_IS_BETTER = {"bleu": True, "chrf": True, "loss": False, "ppl": False}
RESETTABLE = ("optimizer", "scheduler", "best")
TIMED_ROWS = 1024  # rows of the matrix products timed for precision="auto" (at most a batch's tokens)


class Monitor(Protocol):
    """Receives what a person watching training wants to see (rank 0 only)."""

    def started(self, info: dict[str, Any]) -> None: ...
    def logged(self, record: dict[str, Any]) -> None: ...
    def validated(self, record: dict[str, Any]) -> None: ...
    def message(self, text: str) -> None: ...


class _SilentMonitor:
    def started(self, info: dict[str, Any]) -> None: ...
    def logged(self, record: dict[str, Any]) -> None: ...
    def validated(self, record: dict[str, Any]) -> None: ...
    def message(self, text: str) -> None: ...


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    update: int = 0
    epoch: int = 1
    position: int = 0  # batches of this epoch already consumed (at an update boundary)
    best: float | None = None
    bad_validations: int = 0  # for early stopping
    elapsed: float = 0.0  # training seconds before this process started
    target_tokens: int = 0


@dataclass
class TrainResult:
    updates: int
    epochs_finished: int
    stop_reason: str
    last_checkpoint: Path | None
    best_checkpoint: Path | None
    best: float | None
    seconds: float
    target_tokens: int
    last_validation: dict[str, Any] | None


class Trainer:
    """Trains one model on one prepared dataset, as described by a resolved `Config`."""

    def __init__(self, config: Config, monitor: Monitor | None = None, resume: bool = False,
                 reset: tuple[str, ...] = ()) -> None:
        bad = set(reset) - set(RESETTABLE)
        if bad:
            raise NmtError(f"unknown --reset value(s) {', '.join(sorted(bad))}; choose from {', '.join(RESETTABLE)}")
        self.config = config
        self.cfg = config.train
        if self.cfg.best_metric not in HIGHER_IS_BETTER:
            raise NmtError(f"unknown best_metric {self.cfg.best_metric!r}; choose one of {', '.join(HIGHER_IS_BETTER)}")
        if self.cfg.best_metric in ("bleu", "chrf") and not self.cfg.valid_bleu:
            raise NmtError(f"best_metric {self.cfg.best_metric} needs train.valid_bleu = true")
        for name in ("accum_steps", "max_tokens", "log_every", "keep_last"):
            if getattr(self.cfg, name) < 1:
                raise NmtError(f"train.{name} must be at least 1, got {getattr(self.cfg, name)}")
        self.dist = Distributed.from_environment()
        self.device = self.dist.device if self.dist.enabled else resolve_device(self.cfg.device)
        if self.device.type == "cpu":
            set_threads(self.cfg.threads, processes=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
            keep_freed_memory()
        check_precision(self.cfg.precision, self.device)
        self.monitor = monitor if (monitor is not None and self.dist.is_main) else _SilentMonitor()
        self.run_dir = Path(self.cfg.run_dir)

        self.data = PreparedData.open(Path(self.cfg.data))
        self.train_split = self.data.split("train")
        self.valid_split = self.data.split("valid") if self.data.has_split("valid") else None
        self._fill_vocabulary(config)

        torch.manual_seed(self.cfg.seed)
        random.seed(self.cfg.seed)
        self.model = build_model(config.model).to(self.device)
        self.precision = self._choose_precision()
        self.amp_dtype = self.precision.dtype
        self.optimizer = build_optimizer(self.model, self.cfg)
        self.schedule = LearningRate(self.cfg, config.model.d_model)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.sampler = TokenBatchSampler(
            self.train_split.src_lengths, self.train_split.tgt_lengths, self.cfg.max_tokens,
            seed=self.cfg.seed, shuffle=True, rank=self.dist.rank, world_size=self.dist.world_size,
        )
        self.progress = Progress()
        self.reset = tuple(reset)
        if resume:
            self._resume()
        self.ddp_model: nn.Module = self.dist.wrap(self.model)
        self._stop_requested = False

    # ---------------------------------------------------------------- setup
    def _choose_precision(self) -> Precision:
        """`train.precision`, with "auto" measured on the model's matrix shapes; bf16 only if every rank measured it faster."""
        choice = choose_precision(self.cfg.precision, self.device, matrix_shapes(self.model, min(self.cfg.max_tokens, TIMED_ROWS)))
        if self.cfg.precision == "auto" and self.dist.any_true(choice.name != "bf16") and choice.name == "bf16":
            return Precision("fp32", f"{choice.reason}, but not on every rank", choice.gflops)
        return choice

    def _fill_vocabulary(self, config: Config) -> None:
        model = config.model
        model.src_vocab_size = self.data.src_tokenizer.vocab_size
        model.tgt_vocab_size = self.data.tgt_tokenizer.vocab_size
        model.joint_vocab = self.data.joint
        if model.share_embeddings and not self.data.joint:
            raise NmtError(
                "model.share_embeddings needs one joint tokenizer, but the data has one per side; "
                "set model.share_embeddings=false"
            )

    def _resume(self) -> None:
        path = latest_checkpoint(self.run_dir)
        if path is None:
            raise NmtError(f"{self.run_dir}: no checkpoint to resume from")
        ckpt = load_checkpoint(path, map_location="cpu")
        if ckpt.train_state is None:
            raise NmtError(f"{path}: inference-only checkpoint, cannot resume training from it")
        if ckpt.src_tokenizer != self.data.src_tokenizer or ckpt.tgt_tokenizer != self.data.tgt_tokenizer:
            raise NmtError(f"{path}: was trained with another tokenizer than the data in {self.cfg.data}")
        self._check_resumable(path, ckpt)
        self.model.load_state_dict(ckpt.model_state)
        state = ckpt.train_state
        if "optimizer" not in self.reset:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
        if "scheduler" not in self.reset:
            self.schedule.load_state_dict(state["schedule"])
        self.progress = Progress(**state["progress"])
        if "best" in self.reset:
            self.progress.best, self.progress.bad_validations = None, 0
        restore_rng(state["rng"][self.dist.rank])
        resets = f" (reset: {', '.join(self.reset)})" if self.reset else ""
        self.monitor.message(f"resumed from {path} at update {self.progress.update}, epoch {self.progress.epoch}{resets}")

    def _check_resumable(self, path: Path, ckpt: Checkpoint) -> None:
        """Refuse changes that would break the model or the batch order a resumed run continues."""
        old, new = vars(ckpt.config.model), vars(self.config.model)
        changed = [f"model.{k} ({old[k]} -> {new[k]})" for k in old if old[k] != new[k]]
        changed += [f"train.{k} ({getattr(ckpt.config.train, k)} -> {getattr(self.cfg, k)})"
                    for k in ("seed", "max_tokens", "accum_steps") if getattr(ckpt.config.train, k) != getattr(self.cfg, k)]
        processes = len(ckpt.train_state["rng"])
        if processes != self.dist.world_size:
            changed.append(f"processes ({processes} -> {self.dist.world_size})")
        if changed:
            raise NmtError(f"{path}: cannot resume with changed {', '.join(changed)}: the model or the batch order would differ")

    # ---------------------------------------------------------------- loop
    def train(self) -> TrainResult:
        """Run until a limit, early stopping or Ctrl-C; always end on a saved checkpoint."""
        cfg, progress = self.cfg, self.progress
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.toml").write_text(to_toml(self.config), encoding="utf-8")
        self._record({"kind": "setup", "update": progress.update, **self.precision.as_record()}, board=None)
        self.monitor.started(self._start_info())
        start = time.perf_counter() - progress.elapsed
        window = {"loss": 0.0, "nll": 0.0, "tokens": 0, "time": time.perf_counter()}
        last_validation: dict[str, Any] | None = None
        stop_reason = ""
        last_saved: Path | None = None
        with self._interrupt_guard(), self._tensorboard() as board:
            while not stop_reason:
                batches = self.sampler.batches(progress.epoch)
                for group in _groups(batches, progress.position, cfg.accum_steps):
                    loss, nll, tokens = self.update(group)
                    progress.update += 1
                    progress.position += len(group)
                    progress.target_tokens += tokens
                    window["loss"] += loss
                    window["nll"] += nll
                    window["tokens"] += tokens
                    if progress.update % cfg.log_every == 0:
                        self._log(window, start, board)
                    stop_reason = self._limit_reached(start)
                    if cfg.valid_every and progress.update % cfg.valid_every == 0:
                        last_validation, last_saved = self._validate_and_save(start, board)
                        stop_reason = stop_reason or self._patience_exhausted()
                    if self.dist.any_true(self._stop_requested) and not stop_reason:
                        stop_reason = "interrupted"  # every rank stops at the same update
                    if stop_reason:
                        break
                else:
                    progress.epoch += 1
                    progress.position = 0
                    if not (cfg.valid_every and progress.update % cfg.valid_every == 0):
                        last_validation, last_saved = self._validate_and_save(start, board, epoch=progress.epoch - 1)
                        stop_reason = self._patience_exhausted()
                    if cfg.max_epochs and progress.epoch > cfg.max_epochs:
                        stop_reason = stop_reason or "max_epochs"
                    if self.dist.any_true(self._stop_requested):
                        stop_reason = stop_reason or "interrupted"
            if last_saved != self._update_path():  # the final state is not on disk yet
                if stop_reason == "interrupted":
                    last_saved = self._save(start, None)
                else:
                    last_validation, last_saved = self._validate_and_save(start, board)
        self.dist.barrier()
        best_path = self.run_dir / "best.pt"
        return TrainResult(
            updates=progress.update,
            epochs_finished=progress.epoch - 1,
            stop_reason=stop_reason,
            last_checkpoint=last_saved,
            best_checkpoint=best_path if best_path.exists() else None,
            best=progress.best,
            seconds=time.perf_counter() - start,
            target_tokens=progress.target_tokens,
            last_validation=last_validation,
        )

    def update(self, group: list[list[int]]) -> tuple[float, float, int]:
        """One optimiser update over `group` batches; returns summed loss, NLL and target tokens."""
        self.model.train()
        pin = self.device.type == "cuda"  # page-locked batches copy to the GPU while it computes
        batches = [collate([self.train_split[i] for i in batch], pin_memory=pin) for batch in group]
        local_tokens = sum(b.tgt_tokens for b in batches)
        total_tokens = self.dist.sum_int(local_tokens)
        # DDP averages gradients over ranks; scaling by world size turns that into a per-token mean.
        scale = self.dist.world_size / total_tokens
        loss_sum = nll_sum = 0.0
        for index, batch in enumerate(batches):
            batch = batch.to(self.device, non_blocking=pin)
            last = index == len(batches) - 1
            try:
                # Gradients are all-reduced only in the backward pass of the update's last batch.
                with self.dist.no_sync(self.ddp_model, skip=not last):
                    with autocast(self.device, self.amp_dtype):
                        features = self.ddp_model(batch.src, batch.src_mask, batch.tgt_in, features_only=True)
                        loss, nll = label_smoothed_loss(
                            features, self.model.output.weight, batch.tgt_out, self.cfg.label_smoothing
                        )
                    self.scaler.scale(loss * scale).backward()
            except torch.OutOfMemoryError:
                raise NmtError(
                    f"out of memory at update {self.progress.update + 1} on {self.device} "
                    f"(batch of {batch.size} sentences); lower train.max_tokens and raise train.accum_steps"
                ) from None
            loss_sum += loss.item()
            nll_sum += nll.item()
        loss_sum, nll_sum = self.dist.sum_float(loss_sum), self.dist.sum_float(nll_sum)
        if not math.isfinite(loss_sum) and self.amp_dtype != torch.float16:  # the same decision on every rank
            raise NmtError(
                f"loss became {loss_sum} at update {self.progress.update + 1}; stopped without saving, "
                f"the last good checkpoint is {latest_checkpoint(self.run_dir) or 'none'} "
                "(try a lower train.lr or longer train.warmup)"
            )
        rate = self.schedule.apply(self.optimizer, self.progress.update + 1)
        if self.cfg.clip_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_norm)
        self.scaler.step(self.optimizer)  # skips the step on inf/NaN gradients in fp16
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.last_rate = rate
        return loss_sum, nll_sum, total_tokens

    def _limit_reached(self, start: float) -> str:
        cfg = self.cfg
        if cfg.max_updates and self.progress.update >= cfg.max_updates:
            return "max_updates"
        if cfg.max_minutes:
            over = (time.perf_counter() - start) >= cfg.max_minutes * 60
            if self.dist.any_true(over):
                return "max_minutes"
        return ""

    def _patience_exhausted(self) -> str:
        if self.cfg.patience and self.progress.bad_validations >= self.cfg.patience:
            self.monitor.message(f"early stopping: no improvement in {self.cfg.patience} validations")
            return "early_stopping"
        return ""

    # ---------------------------------------------------------------- reporting
    def _start_info(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "device": str(self.device),
            "precision": self.precision.describe(),
            "threads": torch.get_num_threads(),
            "world_size": self.dist.world_size,
            "parameters": self.model.num_parameters(),
            "train_examples": len(self.train_split),
            "batches_per_epoch": len(self.sampler.batches(self.progress.epoch)),
            "resumed_at": self.progress.update,
        }

    def _log(self, window: dict[str, float], start: float, board: Any) -> None:
        now = time.perf_counter()
        tokens = max(window["tokens"], 1)
        record = {
            "kind": "train",
            "update": self.progress.update,
            "epoch": self.progress.epoch,
            "loss": window["loss"] / tokens,
            "nll": window["nll"] / tokens,
            "ppl": math.exp(min(window["nll"] / tokens, 50.0)),
            "lr": self.last_rate,
            "tokens_per_s": window["tokens"] / max(now - window["time"], 1e-9),
            "elapsed": now - start,
        }
        window.update(loss=0.0, nll=0.0, tokens=0, time=now)
        self._record(record, board)
        self.monitor.logged(record)

    def _record(self, record: dict[str, Any], board: Any) -> None:
        if not self.dist.is_main:
            return
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if board is not None:
            for key, value in record.items():
                if key not in ("kind", "update", "epoch") and isinstance(value, (int, float)):
                    board.add_scalar(f"{record['kind']}/{key}", value, record["update"])

    @contextmanager
    def _tensorboard(self) -> Iterator[Any]:
        writer = None
        if self.dist.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter

                writer = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:
                writer = None
        try:
            yield writer
        finally:
            if writer is not None:
                writer.close()

    # ---------------------------------------------------------------- validation and checkpoints
    def _validate_and_save(self, start: float, board: Any, epoch: int | None = None) -> tuple[dict[str, Any] | None, Path]:
        """Validate (rank 0; the others wait for its result), update best/patience/plateau, save.

        `epoch` names the epoch a validation belongs to when it runs just after the epoch ended.
        """
        record = None
        if self.valid_split is not None:
            record = self._validate(epoch or self.progress.epoch) if self.dist.is_main else None
            record = self.dist.broadcast_object(record)
            score = record[self.cfg.best_metric]
            higher = HIGHER_IS_BETTER[self.cfg.best_metric]
            improved = self.progress.best is None or (score > self.progress.best if higher else score < self.progress.best)
            if improved:
                self.progress.best, self.progress.bad_validations = score, 0
            else:
                self.progress.bad_validations += 1
            if self.schedule.observe(score, higher):
                self.monitor.message(f"plateau: learning rate now {self.schedule.at(self.progress.update + 1):.3g}")
            record["best"] = self.progress.best
            record["improved"] = improved
            self._record(record, board)
            self.monitor.validated(record)
        else:
            improved = False
        return record, self._save(start, record, best=improved)

    @torch.inference_mode()
    def _validate(self, epoch: int) -> dict[str, Any]:
        """Teacher-forced loss and perplexity, and BLEU/chrF of greedy decoding, on the validation set."""
        model, split = self.model, self.valid_split
        assert split is not None
        model.eval()
        loss_sum = nll_sum = 0.0
        tokens = 0
        sampler = TokenBatchSampler(split.src_lengths, split.tgt_lengths, self.cfg.max_tokens, seed=0, shuffle=False)
        for batch_ids in sampler.batches(1):
            batch = collate([split[i] for i in batch_ids]).to(self.device)
            with autocast(self.device, self.amp_dtype):
                features = model(batch.src, batch.src_mask, batch.tgt_in, features_only=True)
                loss, nll = label_smoothed_loss(features, model.output.weight, batch.tgt_out, self.cfg.label_smoothing)
            loss_sum += loss.item()
            nll_sum += nll.item()
            tokens += batch.tgt_tokens
        record: dict[str, Any] = {
            "kind": "valid",
            "update": self.progress.update,
            "epoch": epoch,
            "loss": loss_sum / tokens,
            "ppl": math.exp(min(nll_sum / tokens, 50.0)),
        }
        if self.cfg.valid_bleu:
            count = len(split) if not self.cfg.valid_max_sentences else min(len(split), self.cfg.valid_max_sentences)
            sources = [source_ids(split[i][0]) for i in range(count)]
            greedy = _greedy(self.config.decode)
            with autocast(self.device, self.amp_dtype):
                results = translate_ids(model, sources, greedy, self.cfg.max_tokens, self.device)
            hypotheses = [self.data.tgt_tokenizer.decode(r[0].tokens) for r in results]
            references = split.references()[:count]
            scores = corpus_scores(hypotheses, references, metrics=("bleu", "chrf"))
            record["bleu"] = scores["bleu"].score
            record["chrf"] = scores["chrf"].score
            record["example"] = hypotheses[0] if hypotheses else ""
        return record

    def _update_path(self) -> Path:
        return self.run_dir / f"update_{self.progress.update:08d}.pt"

    def _save(self, start: float, record: dict[str, Any] | None, best: bool = False) -> Path:
        """Write update_N.pt (and best.pt when improved), keep the last K; rank 0 only."""
        path = self._update_path()
        self.progress.elapsed = time.perf_counter() - start
        rng = self.dist.gather_object(capture_rng())
        if self.dist.is_main:
            checkpoint = Checkpoint(
                config=self.config,
                model_state=self.model.state_dict(),
                src_tokenizer=self.data.src_tokenizer,
                tgt_tokenizer=self.data.tgt_tokenizer,
                train_state={
                    "optimizer": self.optimizer.state_dict(),
                    "scaler": self.scaler.state_dict(),
                    "schedule": self.schedule.state_dict(),
                    "progress": vars(self.progress).copy(),
                    "rng": rng,
                },
                metrics={k: v for k, v in (record or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
            )
            data = checkpoint.to_bytes()
            write_bytes_atomic(path, data)
            if best:
                write_bytes_atomic(self.run_dir / "best.pt", data)
            for old in sorted(self.run_dir.glob("update_*.pt"))[: -self.cfg.keep_last]:
                old.unlink()
        self.dist.barrier()
        return path

    @contextmanager
    def _interrupt_guard(self) -> Iterator[None]:
        """First Ctrl-C: finish the current update, save, stop. Second Ctrl-C: stop at once."""

        def handler(signum: int, frame: Any) -> None:
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested = True
            self.monitor.message("interrupt: saving a checkpoint after this update (Ctrl-C again to abort)")

        try:
            previous = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread: leave signals alone
            yield
            return
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


def _groups(batches: list[list[int]], position: int, size: int) -> Iterator[list[list[int]]]:
    """The batches of an epoch from `position` on, `size` at a time (one update each)."""
    for start in range(position, len(batches), size):
        yield batches[start:start + size]


def _greedy(decode: DecodeConfig) -> DecodeConfig:
    return replace(decode, beam=1, nbest=1, sampling=False)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The update checkpoint with the highest update number in a run directory."""
    found = sorted(Path(run_dir).glob("update_*.pt"))
    return found[-1] if found else None


def capture_rng() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    """random.setstate needs tuples back where serialisation may have produced lists."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
