"""Optimiser with weight-decay groups, the learning-rate schedules of NMT training, the budget clock that
budget-aware schedules read, and improvement tracking.

A run may be bounded by updates (`max_updates`), epochs (`max_epochs`, counted in updates) or
wall-clock time (`max_minutes`); whichever is nearest its end decides. A time budget is read on
the same clock as the limit that stops the run (wall-clock time, validation included), so the
decay ends exactly when the run does, on a fast machine or a slow one.

Options are checked once, by `nmt.config.validate`, before anything here is built.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from nmt.config import TrainConfig


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam or AdamW; weight decay only on weight matrices, never on biases, norms or embeddings."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for param in dict.fromkeys(p for p in model.parameters() if p.requires_grad):  # tied weights once
        (decay if param.dim() >= 2 and id(param) not in embeddings else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    # The fused kernel updates all parameters in one pass; the per-parameter loop it
    # replaces costs about 10% of a small Transformer's update on a CPU.
    return cls(groups, lr=config.lr, betas=config.adam_betas, eps=config.adam_eps, fused=True)


@dataclass
class Improvement:
    """The best validation score so far and the validations since it last improved.

    Early stopping (the trainer's) and plateau decay (the schedule's) both count with one of these.
    """

    best: float | None = None
    bad_validations: int = 0

    def observe(self, score: float, higher_is_better: bool) -> bool:
        """Feed a validation score; returns whether it is a new best."""
        improved = self.best is None or (score > self.best if higher_is_better else score < self.best)
        if improved:
            self.best, self.bad_validations = score, 0
        else:
            self.bad_validations += 1
        return improved

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Improvement:
        return cls(best=state["best"], bad_validations=state["bad_validations"])


@dataclass(frozen=True)
class Budget:
    """A run's limits: updates (0 = none; epochs already converted) and seconds (0 = none)."""

    updates: int = 0
    seconds: float = 0.0

    @classmethod
    def of(cls, config: TrainConfig, updates_per_epoch: int) -> Budget:
        """The budget of `config`; `updates_per_epoch` turns an epoch limit into updates."""
        limits = [n for n in (config.max_updates, config.max_epochs * updates_per_epoch) if n > 0]
        return cls(min(limits, default=0), config.max_minutes * 60.0)

    @property
    def bounded(self) -> bool:
        return self.updates > 0 or self.seconds > 0

    def fraction(self, update: int, elapsed: float = 0.0) -> float:
        """The share of the budget used after `update` updates and `elapsed` seconds; 1.0 once any limit is
        reached, 0.0 for an unbounded run."""
        parts = []
        if self.updates:
            parts.append(update / self.updates)
        if self.seconds:
            parts.append(elapsed / self.seconds)
        return min(1.0, max(parts, default=0.0))


class LearningRate:
    """The learning rate as a function of the update number and the budget used, plus plateau decay.

    inverse_sqrt: linear warm-up to `lr`, then lr * sqrt(warmup / update) (fairseq).
    noam: lr * d_model**-0.5 * min(update**-0.5, update * warmup**-1.5) (Vaswani et al.).
    linear, cosine, wsd: linear warm-up, then from `lr` down to `min_lr` exactly when the run's budget
    (nmt.train.budget) ends: a straight line, half a cosine (Loshchilov & Hutter 2017), or
    warmup-stable-decay (Hagele et al. 2024): `lr` until the last `decay_fraction` of the budget, then a
    1 - sqrt cooldown. With a known end, annealing to it beats a rate still high when the budget runs out
    (Li et al. 2020, "Budgeted training"). The decay runs over the budget left after warm-up.
    plateau / constant: linear warm-up (if any) to `lr`; plateau multiplies the rate
    by `plateau_factor` after `plateau_patience` validations without improvement.
    """

    def __init__(self, config: TrainConfig, d_model: int, budget: Budget | None = None) -> None:
        self.config = config
        self.d_model = d_model
        self.budget = budget if budget is not None else Budget(config.max_updates, config.max_minutes * 60.0)
        self.name, self.reason = resolve_scheduler(config.scheduler, self.budget, config.warmup)
        self.scale = 1.0  # plateau decay so far
        self.plateau = Improvement()
        self.warmup_end = self.budget.fraction(config.warmup)  # the budget used when warm-up ends

    def at(self, update: int, elapsed: float = 0.0) -> float:
        """The rate used for update number `update` (1-based), `elapsed` seconds into the run."""
        c, u = self.config, max(update, 1)
        warm = min(1.0, u / c.warmup) if c.warmup > 0 else 1.0
        if self.name == "inverse_sqrt":
            return c.lr * min(u / c.warmup, math.sqrt(c.warmup / u))
        if self.name == "noam":
            return c.lr * self.d_model**-0.5 * min(u**-0.5, u * c.warmup**-1.5)
        if self.name in DECAYS and u > c.warmup:
            used = self.budget.fraction(u, elapsed)
            progress = min(1.0, max(0.0, (used - self.warmup_end) / max(1.0 - self.warmup_end, 1e-12)))
            share = 0.0 if progress >= 1.0 else DECAYS[self.name](progress, c.decay_fraction)  # the floor exactly
            return c.min_lr + (c.lr - c.min_lr) * share
        return max(c.lr * warm * self.scale, c.min_lr if self.scale < 1.0 else 0.0)

    def apply(self, optimizer: torch.optim.Optimizer, update: int, elapsed: float = 0.0) -> float:
        if update <= self.config.warmup and self.budget.seconds:  # where a time budget stood when warm-up ended
            self.warmup_end = self.budget.fraction(update, elapsed)
        rate = self.at(update, elapsed)
        for group in optimizer.param_groups:
            group["lr"] = rate
        return rate

    def observe(self, score: float, higher_is_better: bool) -> bool:
        """Feed a validation score; returns True when the plateau rule decayed the rate."""
        if self.name != "plateau":
            return False
        if self.plateau.observe(score, higher_is_better) or self.plateau.bad_validations < self.config.plateau_patience:
            return False
        self.plateau.bad_validations = 0
        self.scale *= self.config.plateau_factor
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "warmup_end": self.warmup_end, **self.plateau.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale, self.plateau = state["scale"], Improvement.from_state_dict(state)
        if self.budget.seconds:  # a time budget's warm-up ended where the clock said; an update budget's is computed
            self.warmup_end = state.get("warmup_end", 0.0)


def _wsd(progress: float, decay_fraction: float) -> float:
    """Warmup-stable-decay: 1 until the cooldown, then 1 - sqrt of the cooldown done (Hagele et al. 2024)."""
    start = 1.0 - decay_fraction
    return 1.0 if progress <= start else 1.0 - math.sqrt((progress - start) / decay_fraction)


DECAYS = {  # budget-aware shapes: the share of (lr - min_lr) left at `progress` through the decay
    "linear": lambda progress, _: 1.0 - progress,
    "cosine": lambda progress, _: 0.5 * (1.0 + math.cos(math.pi * progress)),
    "wsd": _wsd,
}
BUDGETED_DEFAULT = "wsd"  # what scheduler "auto" picks for a bounded run (measured: README, "The schedule")


def resolve_scheduler(name: str, budget: Budget, warmup: int) -> tuple[str, str]:
    """The schedule a run uses and why: "auto" decays to the end of a bounded run; an unbounded one has nothing
    to decay towards, so it takes inverse_sqrt after a warm-up, or plateau decay without one (the RNN's)."""
    if name != "auto":
        return name, "train.scheduler"
    if budget.bounded:
        return BUDGETED_DEFAULT, "bounded run: the rate reaches train.min_lr exactly when its budget ends"
    if warmup > 0:
        return "inverse_sqrt", "no limit (max_updates, max_epochs, max_minutes) to decay towards"
    return "plateau", "no limit to decay towards and no warm-up: halve the rate when validation stalls"
