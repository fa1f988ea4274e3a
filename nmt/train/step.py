"""One optimiser update: forward and fused loss per batch, gradient accumulation, DDP, clipping, the step.

The loss is summed over target tokens and divided by the target tokens of the whole update
(every rank's), so accumulation and data parallelism weigh every token alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from nmt.config import Config
from nmt.data import EncodedSplit, collate
from nmt.device import autocast
from nmt.distributed import Distributed
from nmt.errors import NmtError
from nmt.loss import label_smoothed_loss
from nmt.optim import LearningRate, build_optimizer
from nmt.train.run_directory import RunDirectory


class UpdateStep:
    """Owns what changes the parameters: optimiser, schedule, loss scaler and the DDP wrapper."""

    def __init__(self, model: nn.Module, split: EncodedSplit, config: Config, dist: Distributed, device: torch.device,
                 amp_dtype: torch.dtype | None, run_dir: RunDirectory) -> None:
        self.model, self.split, self.cfg = model, split, config.train
        self.dist, self.device, self.amp_dtype, self.run_dir = dist, device, amp_dtype, run_dir
        self.optimizer = build_optimizer(model, self.cfg)
        self.schedule = LearningRate(self.cfg, config.model.d_model)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        self.last_rate = 0.0
        self._ddp_model: nn.Module | None = None

    @property
    def ddp_model(self) -> nn.Module:
        """Wrapped at the first update, after a resumed run loaded its parameters."""
        if self._ddp_model is None:
            self._ddp_model = self.dist.wrap(self.model)
        return self._ddp_model

    def __call__(self, group: Sequence[Sequence[int]], update: int) -> tuple[float, float, int]:
        """Update number `update` over the batches of example indices in `group`; returns summed loss, NLL
        and target tokens over every rank."""
        self.model.train()
        pin = self.device.type == "cuda"  # page-locked batches copy to the GPU while it computes
        batches = [collate([self.split[i] for i in batch], pin_memory=pin) for batch in group]
        total_tokens = self.dist.sum_int(sum(b.tgt_tokens for b in batches))
        # DDP averages gradients over ranks; scaling by world size turns that into a per-token mean.
        scale = self.dist.world_size / total_tokens
        loss_sum = nll_sum = 0.0
        for index, batch in enumerate(batches):
            batch = batch.to(self.device, non_blocking=pin)
            try:
                # Gradients are all-reduced only in the backward pass of the update's last batch.
                with self.dist.no_sync(self.ddp_model, skip=index < len(batches) - 1):
                    with autocast(self.device, self.amp_dtype):
                        features = self.ddp_model(batch.src, batch.src_mask, batch.tgt_in, features_only=True)
                        loss, nll = label_smoothed_loss(
                            features, self.model.output.weight, batch.tgt_out, self.cfg.label_smoothing
                        )
                    self.scaler.scale(loss * scale).backward()
            except torch.OutOfMemoryError:
                raise NmtError(
                    f"out of memory at update {update} on {self.device} (batch of {batch.size} sentences); "
                    "lower train.max_tokens and raise train.accum_steps"
                ) from None
            loss_sum += loss.item()
            nll_sum += nll.item()
        loss_sum, nll_sum = self.dist.sum_float(loss_sum), self.dist.sum_float(nll_sum)
        if not math.isfinite(loss_sum) and self.amp_dtype != torch.float16:  # the same decision on every rank
            raise NmtError(
                f"loss became {loss_sum} at update {update}; stopped without saving, "
                f"the last good checkpoint is {self.run_dir.latest() or 'none'} "
                "(try a lower train.lr or longer train.warmup)"
            )
        self._step(update)
        return loss_sum, nll_sum, total_tokens

    def _step(self, update: int) -> None:
        self.last_rate = self.schedule.apply(self.optimizer, update)
        if self.cfg.clip_norm > 0:
            self.scaler.unscale_(self.optimizer)
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
