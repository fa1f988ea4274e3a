"""Label-smoothed cross-entropy over the output projection, fused and chunked for speed and memory.

The smoothed target puts 1 - ε on the reference token and spreads ε uniformly
over the whole vocabulary (as torch's `label_smoothing`). With z the logits and
lse = logsumexp(z), a token's NLL is lse - z[gold] and its uniform term is
lse - mean(z); the gradient with respect to z is softmax(z) - target distribution.

The loss takes the decoder's features and the output matrix rather than logits:
it projects a chunk of rows at a time, turns the chunk's logits into their
gradient in place, and multiplies that back into the gradients of the features
and of the output matrix. The (tokens × vocabulary) logits and their gradient
(120 MB each for a 4,096-token batch and an 8k vocabulary) never exist, only one
chunk's; the backward pass only scales the stored gradients.

An optional bias b is added to the logits (imported Marian models carry one). A column whose
bias is -inf is a token the model can never produce (nmt's <s> in an imported vocabulary):
it takes no probability, and the uniform smoothing term spreads ε over the other columns
only, so such a column neither makes the loss infinite nor receives a gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from nmt.tokenizer import PAD_ID

ROWS_PER_CHUNK = 512  # CPU: 512 rows × an 8k vocabulary = 16 MB of logits, while the projection stays efficient
CUDA_ROWS_PER_CHUNK = 8192  # GPU: few large kernels (a 64k-token batch is 8 chunks, 256 MB of logits each at 8k)


def rows_per_chunk(device: torch.device) -> int:
    """Small chunks stay in a CPU's caches; a GPU wants few large kernels instead of thousands of small ones."""
    return CUDA_ROWS_PER_CHUNK if device.type == "cuda" else ROWS_PER_CHUNK


class _Columns:
    """The output bias and what the uniform smoothing term needs of the columns it spreads over."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        self.bias = None if bias is None else bias.float()  # (V,)
        self.allowed: Tensor | None = None  # (1, V) float, 1 where the bias is finite; None: all columns
        if self.bias is None or bool(torch.isfinite(self.bias).all()):
            self.count = weight.size(0)
            self.weight_mean = weight.float().mean(dim=0)  # (D,)
            self.bias_mean = None if self.bias is None else self.bias.mean()
        else:
            allowed = torch.isfinite(self.bias)
            self.count = int(allowed.sum())
            self.allowed = allowed.float().unsqueeze(0)
            self.weight_mean = (self.allowed @ weight.float()).squeeze(0) / self.count
            self.bias_mean = self.bias[allowed].mean()

    def mean_logit(self, h: Tensor) -> Tensor:
        """mean(z) over the allowed columns, (n,), from the rows h (n, D) without a pass over the logits."""
        mean = (h.float() * self.weight_mean).sum(dim=1)
        return mean if self.bias_mean is None else mean + self.bias_mean


def _chunk_loss(
    h: Tensor, weight: Tensor, columns: _Columns, target: Tensor, keep: Tensor, smoothing: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Rows h (n, D) -> summed smoothed loss, summed NLL, exp(z - max) (n, V) and its row sums (n, 1).

    Four passes over the logits z, in place: logsumexp would allocate z - max, and
    mean(z) = h · mean(weight) (+ mean(bias)) needs no pass at all (computed in float32,
    outside autocast's reach).
    """
    z = (h @ weight.t()).float()  # (n, V); under autocast the product runs in bf16/fp16
    if columns.bias is not None:
        z.add_(columns.bias)
    gold = z.gather(1, target.unsqueeze(1)).squeeze(1)  # (n,)
    top = z.amax(dim=1, keepdim=True)  # (n, 1)
    exp = z.sub_(top).exp_()
    total = exp.sum(dim=1, keepdim=True)  # (n, 1)
    lse = (top + total.log()).squeeze(1)  # (n,)
    nll = torch.where(keep, lse - gold, 0.0).sum()
    uniform = torch.where(keep, lse - columns.mean_logit(h), 0.0).sum()
    return (1.0 - smoothing) * nll + smoothing * uniform, nll, exp, total


Gradients = tuple[Tensor, Tensor, Tensor | None]


def _projected_loss(
    features: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, smoothing: float, with_gradients: bool
) -> tuple[Tensor, Tensor, Gradients | None]:
    """features (N, D), target (N,) -> summed loss, summed NLL and, if asked, the float32 gradients
    of the loss with respect to features (N, D), weight (V, D) and bias (V,), one chunk of rows at a time."""
    keep = target != PAD_ID  # (N,)
    columns = _Columns(weight, bias)
    autocasting = torch.is_autocast_enabled(features.device.type)
    grads: Gradients | None = None
    if with_gradients:
        grads = (torch.empty(features.shape, dtype=torch.float32, device=features.device),
                 torch.zeros(weight.shape, dtype=torch.float32, device=weight.device),
                 None if bias is None else torch.zeros(bias.shape, dtype=torch.float32, device=bias.device))
    loss = nll = features.new_zeros((), dtype=torch.float32)
    step = rows_per_chunk(features.device)
    for rows in range(0, features.size(0), step):
        part = slice(rows, rows + step)
        h = features[part]  # (n, D)
        chunk_loss, chunk_nll, exp, total = _chunk_loss(h, weight, columns, target[part], keep[part], smoothing)
        loss, nll = loss + chunk_loss, nll + chunk_nll
        if grads is None:  # validation: the loss only
            continue
        grad_features, grad_weight, grad_bias = grads
        # softmax - smoothed target, in the logits' buffer; padding rows become zero
        kept = keep[part].unsqueeze(1).float()  # (n, 1)
        grad = exp.mul_(kept / total)
        if columns.allowed is None:
            grad.sub_(kept * (smoothing / columns.count))
        else:  # masked columns: softmax 0, no smoothing mass, so no gradient
            grad.addcmul_(kept * (smoothing / columns.count), columns.allowed, value=-1.0)
        grad.scatter_add_(1, target[part].unsqueeze(1), kept * (smoothing - 1.0))
        if grad_bias is not None:
            grad_bias += grad.sum(dim=0)
        if autocasting:  # products in the autocast dtype, accumulated in float32
            grad_features[part] = grad @ weight
            grad_weight += grad.t() @ h
        else:  # no temporaries
            torch.mm(grad, weight, out=grad_features[part])
            grad_weight.addmm_(grad.t(), h)
    return loss, nll, grads


class _ProjectedSmoothedCrossEntropy(torch.autograd.Function):
    """Gradients are computed in the forward pass, in float32 (scaled by the loss's gradient in backward,
    then cast to the inputs' dtypes); the NLL output is a report and carries none."""

    @staticmethod
    def forward(ctx, features: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor,  # type: ignore[override]
                smoothing: float) -> tuple[Tensor, Tensor]:
        loss, nll, grads = _projected_loss(features, weight, bias, target, smoothing, with_gradients=True)
        assert grads is not None
        grad_features, grad_weight, grad_bias = grads
        ctx.save_for_backward(grad_features, grad_weight, grad_bias)
        ctx.dtypes = features.dtype, weight.dtype, None if bias is None else bias.dtype
        ctx.mark_non_differentiable(nll)
        return loss, nll

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor, grad_nll: Tensor  # type: ignore[override]
                 ) -> tuple[Tensor, Tensor, Tensor | None, None, None]:
        grad_features, grad_weight, grad_bias = ctx.saved_tensors
        features_dtype, weight_dtype, bias_dtype = ctx.dtypes
        return ((grad_features * grad_loss).to(features_dtype), (grad_weight * grad_loss).to(weight_dtype),
                None if grad_bias is None else (grad_bias * grad_loss).to(bias_dtype), None, None)


def label_smoothed_loss(features: Tensor, weight: Tensor, target: Tensor, smoothing: float,
                        bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Summed smoothed loss and summed NLL (detached) of the logits `features @ weight.T (+ bias)` over non-pad
    targets.

    Sums, not means: callers divide by the token count of the whole update, so
    accumulation and data parallelism weigh every token equally. The NLL carries
    no gradient; it is reported as perplexity.
    features: (B, T, D) decoder output before the projection; weight: (V, D) the output
    matrix (the models' `output_projection()`); bias: (V,) the models' `output_bias()`;
    target: (B, T) with PAD_ID at padding.
    """
    flat, target = features.reshape(-1, features.size(-1)), target.reshape(-1)  # (B*T, D), (B*T,)
    differentiable = [features, weight] + ([] if bias is None else [bias])
    if torch.is_grad_enabled() and any(t.requires_grad for t in differentiable):
        loss, nll = _ProjectedSmoothedCrossEntropy.apply(flat, weight, bias, target, float(smoothing))
        return loss, nll.detach()
    loss, nll, _ = _projected_loss(flat, weight, bias, target, float(smoothing), with_gradients=False)  # validation
    return loss, nll
