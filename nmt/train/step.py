"""One optimiser update: forward and fused loss per batch, gradient accumulation, DDP, clipping, the step.

The loss is summed over target tokens and the gradients are divided by the target tokens of the
whole update (every rank's), so accumulation and data parallelism weigh every token alike.

The device never waits for the host: the next update's batches are collated (and pinned, on a
GPU) in a background thread while this one computes; losses are summed on the device; one
all-reduce per update carries loss, NLL and token count together, and reading it is the update's
single host synchronisation (it also decides, on every rank alike, whether the loss is finite).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from nmt.config import Config
from nmt.data import Batch, EncodedSplit
from nmt.device import autocast
from nmt.distributed import Distributed
from nmt.errors import NmtError
from nmt.loss import label_smoothed_loss
from nmt.optim import Budget, LearningRate, build_optimizer
from nmt.precision import Workload
from nmt.train.run_directory import RunDirectory

Group = Sequence[Sequence[int]]  # an update's batches, each a list of example indices
COMPILED_WIDTH_MULTIPLE = 8  # train.compile: batch widths rounded up to this (fewer shapes; GPU tensor cores)


def update_workload(model: nn.Module, batch: Batch, label_smoothing: float) -> Workload:
    """One forward and backward pass of `model` over a real `batch`, for precision="auto" to time (the
    padding and lengths matter: on one CPU bf16 measured 1.48x on a synthetic unpadded batch where real
    1,024-token batches trained at 1.0x); the gradients are cleared after it."""
    device = next(model.parameters()).device
    batch = batch.to(device)

    def run(dtype: torch.dtype | None) -> None:
        try:
            with autocast(device, dtype):
                features = model(batch.src, batch.src_mask, batch.tgt_in, features_only=True)
                loss, _ = label_smoothed_loss(features, model.output_projection(), batch.tgt_out, label_smoothing,
                                              bias=model.output_bias())
            loss.backward()
        finally:
            model.zero_grad(set_to_none=True)

    return run


class UpdateStep:
    """Owns what changes the parameters: optimiser, schedule, loss scaler and the DDP wrapper."""

    def __init__(self, model: nn.Module, split: EncodedSplit, config: Config, dist: Distributed, device: torch.device,
                 amp_dtype: torch.dtype | None, run_dir: RunDirectory, budget: Budget | None = None) -> None:
        self.model, self.split, self.cfg = model, split, config.train
        self.dist, self.device, self.amp_dtype, self.run_dir = dist, device, amp_dtype, run_dir
        self.optimizer = build_optimizer(model, self.cfg)
        self.schedule = LearningRate(self.cfg, config.model.d_model, budget)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        self.last_rate = 0.0
        self._ddp_model: nn.Module | None = None
        self._collator = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nmt-collate")
        self._prefetched: tuple[Group, Future[list[Batch]]] | None = None

    @property
    def ddp_model(self) -> nn.Module:
        """Wrapped at the first update, after a resumed run loaded its parameters (and compiled, if asked)."""
        if self._ddp_model is None:
            wrapped = self.dist.wrap(self.model)
            self._ddp_model = torch.compile(wrapped, dynamic=True) if self.cfg.compile else wrapped
        return self._ddp_model

    def __call__(self, group: Group, update: int, next_group: Group | None = None,
                 elapsed: float = 0.0) -> tuple[float, float, int]:
        """Update number `update` over the batches of example indices in `group`; returns summed loss, NLL
        and target tokens over every rank. `next_group`, if known, is collated meanwhile. `elapsed` is this
        rank's clock: averaged over ranks with the loss, so that a time-budgeted schedule gives every rank
        the same rate."""
        self.model.train()
        batches = self._collated(group)
        if next_group:
            self._prefetched = (next_group, self._collator.submit(self._collate, next_group))
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss, NLL, target tokens, the clock
        sums[3].fill_(elapsed)  # filled on the device: no host-to-device copy to wait for
        for index, batch in enumerate(batches):
            batch = batch.to(self.device, non_blocking=batch.src.is_pinned())
            batch = batch.with_token_dropout(self.cfg.src_token_dropout, self.cfg.tgt_token_dropout)
            try:
                # Gradients are all-reduced only in the backward pass of the update's last batch.
                with self.dist.no_sync(self.ddp_model, skip=index < len(batches) - 1):
                    with autocast(self.device, self.amp_dtype):
                        features = self.ddp_model(batch.src, batch.src_mask, batch.tgt_in, features_only=True)
                        loss, nll = label_smoothed_loss(
                            features, self.model.output_projection(), batch.tgt_out, self.cfg.label_smoothing,
                            bias=self.model.output_bias(),
                        )
                    self.scaler.scale(loss).backward()
            except torch.OutOfMemoryError:
                raise NmtError(
                    f"out of memory at update {update} on {self.device} (batch of {batch.size} sentences); "
                    "lower train.max_tokens and raise train.accum_steps"
                ) from None
            # new_full fills on the device; new_tensor would copy a host number over (a sync per batch on CUDA)
            sums[:3] += torch.stack([loss.detach().double(), nll.double(), sums.new_full((), float(batch.tgt_tokens))])
        loss_sum, nll_sum, total_tokens, elapsed_sum = self.dist.sum_tensor(sums).tolist()  # the one host sync
        if not math.isfinite(loss_sum) and self.amp_dtype != torch.float16:  # the same decision on every rank
            raise NmtError(
                f"loss became {loss_sum} at update {update}; stopped without saving, "
                f"the last good checkpoint is {self.run_dir.latest() or 'none'} "
                "(try a lower train.lr or longer train.warmup)"
            )
        world = self.dist.world_size
        self._step(update, world / total_tokens, elapsed_sum / world)
        return loss_sum, nll_sum, int(total_tokens)

    def _collate(self, group: Group) -> list[Batch]:
        pin = self.device.type == "cuda"  # page-locked batches copy to the GPU while it computes
        multiple = COMPILED_WIDTH_MULTIPLE if self.cfg.compile else 1
        return [self.split.batch(batch, pin_memory=pin, multiple=multiple) for batch in group]

    def _collated(self, group: Group) -> list[Batch]:
        """`group`'s batches: those the background thread prepared, or collated now."""
        prefetched, self._prefetched = self._prefetched, None
        if prefetched is not None and prefetched[0] == group:
            return prefetched[1].result()
        return self._collate(group)

    def _step(self, update: int, gradient_scale: float, elapsed: float) -> None:
        """Scale the summed gradients to a per-token mean (DDP already averaged them over ranks,
        hence the world size in `gradient_scale`), clip, and step at the rate of `update` and `elapsed`."""
        self.last_rate = self.schedule.apply(self.optimizer, update, elapsed)
        self.scaler.unscale_(self.optimizer)  # a no-op unless fp16 scales the loss
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        torch._foreach_mul_(grads, gradient_scale)
        if self.cfg.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_norm)
        self.scaler.step(self.optimizer)  # skips the step on inf/NaN gradients in fp16
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "schedule": self.schedule.state_dict()}

    def load_state_dict(self, state: dict[str, Any], reset: Sequence[str] = ()) -> None:
        """Restore what `reset` does not name ("optimizer" covers the loss scaler, "scheduler" the plateau state)."""
        if "optimizer" not in reset:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
        if "scheduler" not in reset:
            self.schedule.load_state_dict(state["schedule"])
