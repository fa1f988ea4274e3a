"""What a checkpoint holds of a run in progress, and the checks a resumed run must pass.

A run is exactly resumable: the checkpoint holds the optimiser, schedule, update/epoch/batch
position, every RNG state and the early-stopping counters, and batches are a pure function
of (seed, epoch), so a run stopped at update k and resumed reaches bitwise the same
parameters as one never stopped.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from nmt.checkpoint import Checkpoint, load_checkpoint
from nmt.config import Config, TrainConfig
from nmt.data import PreparedData
from nmt.errors import NmtError
from nmt.optim import Improvement
from nmt.train.run_directory import RunDirectory
from nmt.train.selection import Selection

RESETTABLE = ("optimizer", "scheduler", "best")


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    update: int = 0
    epoch: int = 1
    position: int = 0  # batches of this epoch already consumed (at an update boundary)
    elapsed: float = 0.0  # wall-clock seconds of the run before this process started
    target_tokens: int = 0
    validation_seconds: float = 0.0  # the part of `elapsed` spent validating
    improvement: Improvement = field(default_factory=Improvement)  # best score and patience count

    @property
    def best(self) -> float | None:
        return self.improvement.best

    def state_dict(self) -> dict[str, Any]:
        """Flat plain data (the checkpoint format of earlier versions, plus validation_seconds)."""
        plain = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "improvement"}
        return {**plain, **self.improvement.state_dict()}

    def skip_finished_epoch(self, batches: int) -> None:
        """Start the next epoch if all `batches` of this one are done (earlier versions saved such states)."""
        if self.position >= batches:
            self.epoch, self.position = self.epoch + 1, 0

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], reset_best: bool = False) -> Progress:
        """The saved progress; with `reset_best`, best score and patience count start afresh."""
        names = {f.name for f in fields(cls)} - {"improvement"}
        improvement = Improvement() if reset_best else Improvement.from_state_dict(state)
        return cls(**{k: v for k, v in state.items() if k in names}, improvement=improvement)


@dataclass
class TrainResult:
    updates: int
    epochs_finished: int
    stop_reason: str
    last_checkpoint: Path | None
    best_checkpoint: Path | None
    best: float | None
    seconds: float  # wall clock of the whole run, validation included
    validation_seconds: float
    target_tokens: int
    last_validation: dict[str, Any] | None
    selection: Selection | None = None  # how final.pt was chosen (None: not chosen, see train.select_final)

    @property
    def tokens_per_second(self) -> float:
        """Target tokens per second of training, validation time left out."""
        return self.target_tokens / max(self.seconds - self.validation_seconds, 1e-9)


def limit_reached(train: TrainConfig, progress: Progress, out_of_time: bool) -> str:
    """Which of train.max_updates, max_epochs, max_minutes (`out_of_time`) stops the run before its next update."""
    if train.max_updates and progress.update >= train.max_updates:
        return "max_updates"
    if train.max_epochs and progress.epoch > train.max_epochs:
        return "max_epochs"
    return "max_minutes" if out_of_time else ""


def check_reset(reset: Sequence[str], resume: bool) -> None:
    bad = set(reset) - set(RESETTABLE)
    if bad:
        raise NmtError(f"unknown --reset value(s) {', '.join(sorted(bad))}; choose from {', '.join(RESETTABLE)}")
    if reset and not resume:
        raise NmtError("--reset only makes sense with --resume")


def load_resumable(run_dir: RunDirectory, data: PreparedData, config: Config,
                   processes: int) -> tuple[Path, Checkpoint]:
    """The latest checkpoint of `run_dir`, refused if continuing it with `config` would not be the same run."""
    path = run_dir.latest()
    if path is None:
        raise NmtError(f"{run_dir.path}: no checkpoint to resume from")
    ckpt = load_checkpoint(path, map_location="cpu")
    if ckpt.train_state is None:
        raise NmtError(f"{path}: inference-only checkpoint, cannot resume training from it")
    if ckpt.src_tokenizer != data.src_tokenizer or ckpt.tgt_tokenizer != data.tgt_tokenizer:
        raise NmtError(f"{path}: was trained with another tokenizer than the data in {config.train.data}")
    old, new = vars(ckpt.config.model), vars(config.model)
    changed = [f"model.{k} ({old[k]} -> {new[k]})" for k in old if old[k] != new[k]]
    old_train, new_train = vars(ckpt.config.train), vars(config.train)
    changed += [f"train.{k} ({old_train[k]} -> {new_train[k]})"
                for k in ("seed", "max_tokens", "accum_steps") if old_train[k] != new_train[k]]
    saved_processes = len(ckpt.train_state["rng"])
    if saved_processes != processes:
        changed.append(f"processes ({saved_processes} -> {processes})")
    if changed:
        raise NmtError(f"{path}: cannot resume with changed {', '.join(changed)}: "
                       "the model or the batch order would differ")
    return path, ckpt


def capture_rng(device: torch.device | None = None) -> dict[str, Any]:
    """The CPU's and Python's generators, and the generator of the one GPU this process trains on
    (not of every visible GPU: a resume may see fewer, or others)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device is not None and device.type == "cuda":
        state["cuda_device"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device | None = None) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda_device" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_device"], device)


def _as_tuple(value: Any) -> Any:
    """random.setstate needs tuples back where serialisation may have produced lists."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
