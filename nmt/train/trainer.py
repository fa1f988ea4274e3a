"""The training loop, and only the loop: the parts it drives each have their own module.

One `Trainer` serves both architectures (they share the model interface) and every device.
After every update one decision (`_after_update`) logs, checks the limits, the stop signals
and patience, validates and saves; limits are checked before every update, so a run resumed
at its limit does no update at all.
"""

from __future__ import annotations

import copy
import os
import random
import time
from collections.abc import Collection
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from nmt.checkpoint import Checkpoint
from nmt.config import HIGHER_IS_BETTER, Config, ModelConfig, to_toml, validate
from nmt.data import Batch, EncodedSplit, PreparedData, TokenBatchSampler
from nmt.device import resolve_device
from nmt.distributed import Distributed
from nmt.errors import NmtError
from nmt.models import build_model
from nmt.optim import Budget
from nmt.precision import Precision, Workload, check_precision, choose_precision, time_workloads
from nmt.train.init_from import OWN_OPTIONS, start_from
from nmt.train.meter import TrainMeter
from nmt.train.metrics_log import MetricsLog
from nmt.train.monitor import Monitor, SilentMonitor
from nmt.train.run_directory import RunDirectory
from nmt.train.selection import select_after_training
from nmt.train.signals import StopSignals, stop_reason
from nmt.train.sizing import choose_schedule_and_regularisation, choose_shape
from nmt.train.state import Progress, TrainResult, capture_rng, check_reset, limit_reached, load_resumable, restore_rng
from nmt.train.step import UpdateStep, update_workload
from nmt.train.validator import Validator


class Trainer:
    """Trains one model on one prepared dataset as a `Config` describes (validated here, copied, never changed)."""

    def __init__(self, config: Config, monitor: Monitor | None = None, resume: bool = False,
                 reset: tuple[str, ...] = (), choose: Collection[str] = ()) -> None:
        """`choose`: the options (nmt.train.sizing.SIZED_OPTIONS) this run may size to its data and budget,
        those not given explicitly; a resumed run keeps its stored ones."""
        validate(config, sized=() if resume else choose)
        check_reset(reset, resume)
        self.config = copy.deepcopy(config)
        self.cfg = cfg = self.config.train
        self.dist = Distributed.from_environment()
        self.device = self.dist.device if self.dist.enabled else resolve_device(cfg.device)
        check_precision(cfg.precision, self.device)
        if cfg.deterministic:
            use_deterministic_kernels()
        self.monitor: Monitor = monitor if (monitor is not None and self.dist.is_main) else SilentMonitor()
        self.run_dir = RunDirectory(Path(cfg.run_dir))
        self.dist.main_only(lambda: self.run_dir.check_available(resume))
        self.resumed = resume
        self.data = open_data(Path(cfg.data), resume)
        self.train_split = self.data.split("train")
        free = self._start(frozenset() if resume else frozenset(choose))
        self.model = build_seeded_model(self.config, self.device)
        split, dist = self.train_split, self.dist
        self.sampler = TokenBatchSampler(split.src_lengths, split.tgt_lengths, cfg.max_tokens, seed=cfg.seed,
                                         shuffle=True, rank=dist.rank, world_size=dist.world_size)
        batch = timing_batch(self.sampler, split)
        self.precision = choose_run_precision(self.config, self.device, self.model, batch, dist)
        self.amp_dtype = self.precision.dtype
        updates_per_epoch = -(-len(self.sampler.batches(1)) // cfg.accum_steps)
        if free:
            self._size_to_budget(free, updates_per_epoch, batch)
        else:
            validate(self.config)  # what the first check left to sizing, where nothing was sized
        if self.start is not None:  # after sizing, which rebuilds the model
            self.model.load_state_dict(self.start.model_state)
        self.step = UpdateStep(self.model, self.train_split, self.config, self.dist, self.device, self.amp_dtype,
                               self.run_dir, Budget.of(cfg, updates_per_epoch))
        self.optimizer = self.step.optimizer
        self.validator = Validator.for_run(self.data, self.config, self.device, self.amp_dtype, self.dist)
        self.progress, self.last_saved, self.last_validation = Progress(), None, None
        if resume:
            self._resume(reset)
        self.meter = TrainMeter(self.progress.elapsed, self.progress.validation_seconds)

    def _start(self, free: frozenset[str]) -> frozenset[str]:
        """The model config (a new run's from `train.init_from`, with the fine-tuning defaults, or the shape sized
        to the corpus) and its vocabulary sizes; returns the options still free for the budget to size."""
        self.start, self.choices = None, []
        if self.cfg.init_from and not self.resumed:
            self.start, self.choices = start_from(self.config, self.data, free)
            validate(self.config)
            free = frozenset(option for option in free - OWN_OPTIONS if not option.startswith("model."))
        fill_vocabulary(self.config.model, self.data)
        if self.config.model.arch != "transformer":
            return frozenset()
        if free and self.start is None:
            self.choices = choose_shape(self.config, len(self.train_split), free)
        return free

    def _size_to_budget(self, free: Collection[str], updates_per_epoch: int, batch: Batch) -> None:
        """Choose warm-up, validation interval and regularisation from the updates the budget allows (timing an
        update on rank 0 for a time budget), then rebuild the model with the chosen dropouts."""
        def seconds_per_update() -> float:
            workload = update_workload(self.model, batch, self.cfg.label_smoothing)
            timed = time_update(workload, self.amp_dtype, self.device) * self.cfg.accum_steps
            return self.dist.broadcast_object(timed)  # every rank makes the same choices

        self.choices += choose_schedule_and_regularisation(self.config, len(self.train_split), free,
                                                           updates_per_epoch, seconds_per_update)
        validate(self.config)
        self.model = build_seeded_model(self.config, self.device)

    def _resume(self, reset: tuple[str, ...]) -> None:
        path, ckpt = load_resumable(self.run_dir, self.data, self.config, self.dist.world_size)
        self.model.load_state_dict(ckpt.model_state)
        self.step.load_state_dict(ckpt.train_state, reset)
        self.progress = Progress.from_state_dict(ckpt.train_state["progress"], reset_best="best" in reset)
        self.progress.skip_finished_epoch(len(self.sampler.batches(self.progress.epoch)))
        restore_rng(ckpt.train_state["rng"][self.dist.rank], self.device)
        self.last_saved = path
        resets = f" (reset: {', '.join(reset)})" if reset else ""
        self.monitor.message(f"resumed from {path} at update {self.progress.update}, "
                             f"epoch {self.progress.epoch}{resets}")

    def update(self, group: list[list[int]], next_group: list[list[int]] | None = None) -> tuple[float, float, int]:
        """One optimiser update over `group` batches (`next_group` is collated meanwhile);
        returns summed loss, NLL and target tokens."""
        return self.step(group, self.progress.update + 1, next_group, self.meter.elapsed())

    def train(self) -> TrainResult:
        """Run until a limit, early stopping or a stop signal; always end on a saved checkpoint."""
        self.meter = TrainMeter(self.progress.elapsed, self.progress.validation_seconds)
        with ExitStack() as stack:
            self.dist.main_only(lambda: stack.enter_context(self.run_dir.lock()))
            self.log = stack.enter_context(MetricsLog(*self.run_dir.log_paths, enabled=self.dist.is_main))
            self.signals = stack.enter_context(StopSignals(self.monitor.message))
            self.log.write({"kind": "setup", "update": self.progress.update, **self.precision.as_record()})
            self.monitor.started(self._start_info())
            for choice in self.choices:
                self.monitor.message(f"auto: {choice.option} = {choice.value} ({choice.reason})")
            schedule = self.step.schedule
            self.monitor.message(f"learning-rate schedule: {schedule.name} ({schedule.reason})")
            reason = self._limit_reached()
            while not reason:
                reason = self._after_update(self._train_next_group())
        self.dist.barrier()
        result = self._result(reason)
        result.selection = select_after_training(self.config, self.data, reason, self.dist, self.device,
                                                 self.amp_dtype, self.monitor)
        return result

    def _train_next_group(self) -> bool:
        """One update on the next `accum_steps` batches of the epoch; returns whether it ended the epoch."""
        progress = self.progress
        batches = self.sampler.batches(progress.epoch)
        start, size = progress.position, self.cfg.accum_steps
        group, upcoming = batches[start:start + size], batches[start + size:start + 2 * size]
        loss, nll, tokens = self.update(group, upcoming)
        progress.update += 1
        progress.position += len(group)
        progress.target_tokens += tokens
        self.meter.add(loss, nll, tokens)
        return progress.position >= len(batches)

    def _after_update(self, epoch_ended: bool) -> str:
        """The one place that decides, after each update, what to log, validate and save, and whether to stop."""
        cfg, progress = self.cfg, self.progress
        if progress.update % cfg.log_every == 0:
            record = self.meter.record(progress.update, progress.epoch, self.step.last_rate)
            self.log.write(record)
            self.monitor.logged(record)
        epoch = progress.epoch
        if epoch_ended:
            progress.epoch, progress.position = epoch + 1, 0
        limit = self._limit_reached()
        signalled = stop_reason(self.dist.max_int(self.signals.received))  # every rank stops at the same update
        # every valid_every updates, or each epoch end when it is 0: on a small corpus, epochs of a few dozen
        # updates would otherwise spend much of a time budget validating
        due = progress.update % cfg.valid_every == 0 if cfg.valid_every else epoch_ended
        if limit or due:
            self._save(self._validate(epoch))
            return limit or self._patience_exhausted() or signalled
        if signalled:
            self._save(None)
        return signalled

    def _limit_reached(self) -> str:
        over = bool(self.cfg.max_minutes) and self.dist.any_true(self.meter.elapsed() >= self.cfg.max_minutes * 60)
        return limit_reached(self.cfg, self.progress, out_of_time=over)

    def _patience_exhausted(self) -> str:
        if self.cfg.patience and self.progress.improvement.bad_validations >= self.cfg.patience:
            self.monitor.message(f"early stopping: no improvement in {self.cfg.patience} validations")
            return "early_stopping"
        return ""

    def _validate(self, epoch: int) -> dict[str, Any] | None:
        """Validate (every rank its share), log the record, update best, patience and plateau.
        Its time is kept out of training rates."""
        if self.validator is None:
            return None
        started = time.perf_counter()
        record = self.validator(self.model, self.progress.update, epoch, self.monitor)
        record = self.dist.broadcast_object(record)  # rank 0's, to the letter, on every rank
        self.meter.exclude(time.perf_counter() - started)
        score, higher = record[self.cfg.best_metric], HIGHER_IS_BETTER[self.cfg.best_metric]
        improved = self.progress.improvement.observe(score, higher)
        if self.step.schedule.observe(score, higher):
            self.monitor.message(f"plateau: learning rate now {self.step.schedule.at(self.progress.update + 1):.3g}")
        record.update(best=self.progress.best, improved=improved)
        self.log.write(record)
        self.monitor.validated(record)
        self.last_validation = record
        return record

    def _save(self, validation: dict[str, Any] | None) -> None:
        """Write update_N.pt (best.pt too if `validation` improved) and config.toml on rank 0; every rank waits."""
        self.progress.elapsed, self.progress.validation_seconds = self.meter.elapsed(), self.meter.validation_seconds
        rng = self.dist.gather_object(capture_rng(self.device))
        if self.dist.is_main:
            state = {**self.step.state_dict(), "progress": self.progress.state_dict(), "rng": rng}
            checkpoint = Checkpoint(self.config, self.model.state_dict(), self.data.src_tokenizer,
                                    self.data.tgt_tokenizer, train_state=state, metrics=numbers(validation or {}),
                                    languages=self.data.languages)
            best = validation is not None and validation["improved"]
            self.run_dir.save(checkpoint.to_bytes(), self.progress.update, best, self.cfg.keep_last,
                              to_toml(self.config))
        self.last_saved = self.run_dir.update_path(self.progress.update)
        self.dist.barrier()

    def _start_info(self) -> dict[str, Any]:
        return {"config": self.config, "device": str(self.device), "precision": self.precision.describe(),
                "threads": torch.get_num_threads(), "world_size": self.dist.world_size,
                "parameters": self.model.num_parameters(), "train_examples": len(self.train_split),
                "batches_per_epoch": len(self.sampler.batches(self.progress.epoch)), "resumed_at": self.progress.update}

    def _result(self, reason: str) -> TrainResult:
        best = self.run_dir.best_path
        return TrainResult(self.progress.update, self.progress.epoch - 1, reason, self.last_saved,
                           best if best.exists() else None, self.progress.best, self.meter.elapsed(),
                           self.meter.validation_seconds, self.progress.target_tokens, self.last_validation)


def use_deterministic_kernels() -> None:
    """train.deterministic: the same kernels, with the same reduction order, at every run, which a
    bitwise resume on CUDA needs (cuBLAS needs its workspace fixed before its first call)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def time_update(workload: Workload, dtype: torch.dtype | None, device: torch.device, rounds: int = 3) -> float:
    """The best of `rounds` timed training updates, after one untimed (warm-up) one; the random state is kept."""
    best = float("inf")
    with torch.random.fork_rng(devices=[]):
        for round_number in range(rounds + 1):
            begin = time.perf_counter()
            workload(dtype)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if round_number:
                best = min(best, time.perf_counter() - begin)
    return best


def numbers(record: dict[str, Any]) -> dict[str, float]:
    """The numeric fields of a record (what a checkpoint keeps of its validation)."""
    return {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def build_seeded_model(config: Config, device: torch.device) -> torch.nn.Module:
    """The model with the initial weights of `train.seed` (Python's RNG seeded too, for whatever draws from it)."""
    torch.manual_seed(config.train.seed)
    random.seed(config.train.seed)
    return build_model(config.model).to(device)


def timing_batch(sampler: TokenBatchSampler, split: EncodedSplit) -> Batch:
    """What precision="auto" times: the batch of median width among the first epoch's first 200."""
    batches = sampler.batches(1)[:200]
    widths = [int(split.src_lengths[batch].max()) for batch in batches]
    return split.batch(batches[sorted(range(len(batches)), key=widths.__getitem__)[len(batches) // 2]])


def choose_run_precision(config: Config, device: torch.device, model: torch.nn.Module, batch: Batch,
                         dist: Distributed) -> Precision:
    """`train.precision`; "auto" times a training update on a real `batch`, keeping bf16 only if every rank
    found it faster. Measured afresh at every run, never cached: the timing costs seconds against a run's
    minutes, and a cached one taken while the machine was busy would decide every later run."""
    name = config.train.precision
    workload = {"a training update": update_workload(model, batch, config.train.label_smoothing)}
    choice = choose_precision(name, device, workload, measure=lambda _, workloads: time_workloads(workloads))
    if name == "auto" and dist.any_true(choice.name != "bf16") and choice.name == "bf16":
        return Precision("fp32", f"{choice.reason}, but not on every rank", choice.speedups)
    return choice


def open_data(path: Path, resumed: bool) -> PreparedData:
    """The prepared data, with errors that say what the path is and, when resuming, how to point elsewhere."""
    if path.exists() and not path.is_dir():
        raise NmtError(f"{path}: is a file, not a directory written by `nmt prepare`")
    if not path.exists() and resumed:
        raise NmtError(f"{path}: no such data directory (the resumed run's train.data; if it is elsewhere "
                       "or relative to another working directory, pass --data DIR or --set train.data=DIR)")
    return PreparedData.open(path)


def fill_vocabulary(model: ModelConfig, data: PreparedData) -> None:
    """The vocabulary sizes come from the data's tokenizers; a different size set in the config is refused,
    never silently replaced (a resumed run's stored sizes are the data's)."""
    for side, tokenizer in (("src", data.src_tokenizer), ("tgt", data.tgt_tokenizer)):
        given = getattr(model, f"{side}_vocab_size")
        if given and given != tokenizer.vocab_size:
            raise NmtError(f"model.{side}_vocab_size {given} differs from the tokenizer's {tokenizer.vocab_size} "
                           f"in {data.path}: vocabulary sizes come from the tokenizer; leave them unset")
    model.src_vocab_size = data.src_tokenizer.vocab_size
    model.tgt_vocab_size = data.tgt_tokenizer.vocab_size
    model.joint_vocab = data.shared_ids
    if model.share_embeddings and not data.shared_ids:
        raise NmtError(
            "model.share_embeddings needs one joint tokenizer, but the data has one per side; "
            "set model.share_embeddings=false"
        )
