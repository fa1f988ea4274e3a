"""Label-smoothed cross-entropy that ignores padding (Szegedy et al. 2016)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nmt.tokenizer import PAD_ID


def label_smoothed_loss(logits: torch.Tensor, target: torch.Tensor, smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed smoothed loss and summed NLL over non-pad target tokens.

    The smoothed target puts 1 - smoothing on the reference token and spreads
    `smoothing` uniformly over the whole vocabulary (as torch's `label_smoothing`).
    Sums, not means: callers divide by the token count of the whole update, so
    accumulation and data parallelism weigh every token equally.
    logits: (B, T, V) any float dtype; target: (B, T) with PAD_ID at padding.
    """
    log_probs = F.log_softmax(logits.float(), dim=-1).view(-1, logits.size(-1))  # (B*T, V), float32
    target = target.reshape(-1)
    keep = target != PAD_ID
    log_probs, target = log_probs[keep], target[keep]
    nll = -log_probs.gather(1, target.unsqueeze(1)).squeeze(1).sum()
    if smoothing == 0.0:
        return nll, nll.detach()
    uniform = -log_probs.mean(dim=-1).sum()
    return (1.0 - smoothing) * nll + smoothing * uniform, nll.detach()
