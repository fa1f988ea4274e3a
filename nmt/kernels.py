"""Which kernel a decoder's output layer runs on the CPU in fp32: torch's default product or oneDNN's, measured.

The output layer (target vocabulary x d_model, e.g. 8,000 x 256) is a decoding step's largest product and
the one whose speed depends most on the kernel. On a 2-core AMD EPYC (Zen 3) torch's default fp32 product
(MKL) took 1.2-5x as long as oneDNN's at the row counts decoding gives (1 to 900 rows), while the smaller
layers ran at the same speed either way. Another CPU may favour MKL, so the choice is timed on the model's
own layer when a translator is made (tens of milliseconds), never assumed from the CPU's vendor. The two
kernels' logits differ in the last bits (about 1e-5), so an output can differ where two tokens tie that
closely.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from nmt.errors import NmtError

ONEDNN_MIN_SPEEDUP = 1.1  # oneDNN must be this much faster at every timed row count to be chosen
TIMED_ROWS = (8, 256)  # one sentence's beam; a batch
ROUNDS = 3
KERNELS = ("default", "onednn")

Projection = Callable[[Tensor], Tensor]


def onednn_available() -> bool:
    """Whether this torch can run a linear layer through oneDNN."""
    try:
        torch.ops.mkldnn._linear_pointwise  # noqa: B018 (a lookup that fails without oneDNN)
    except (AttributeError, RuntimeError):
        return False
    return torch.backends.mkldnn.is_available()


def project(linear: nn.Linear, x: Tensor, kernel: str = "default") -> Tensor:
    """`linear(x)`, through oneDNN's product under kernel "onednn" where x is 2-D float32 on the CPU."""
    if kernel == "default" or x.dim() != 2 or x.dtype != torch.float32 or x.device.type != "cpu":
        return linear(x)
    return torch.ops.mkldnn._linear_pointwise(x, linear.weight, linear.bias, "none", [], "")


def best_seconds(function: Projection, x: Tensor, calls: int) -> float:
    """The best of `ROUNDS` timings of `calls` calls, after one untimed call."""
    function(x)
    best = float("inf")
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for _ in range(calls):
            function(x)
        best = min(best, time.perf_counter() - start)
    return best


@torch.inference_mode()
def choose_output_kernel(model: nn.Module, kernel: str = "auto") -> str:
    """Set `model.output_kernel` (on a model that has one) to `kernel`, or under "auto" to "onednn" where
    oneDNN's product is measured `ONEDNN_MIN_SPEEDUP` faster at every row count of `TIMED_ROWS` (for an
    `output` layer on the CPU in fp32); return the kernel set."""
    if kernel not in ("auto", *KERNELS):
        raise NmtError(f"unknown output kernel {kernel!r}; choose one of auto, {', '.join(KERNELS)}")
    if not hasattr(model, "output_kernel"):
        return "default"
    if kernel == "auto":
        kernel = "onednn" if onednn_is_faster(getattr(model, "output", None)) else "default"
    if kernel == "onednn" and not onednn_available():
        raise NmtError("output kernel onednn needs a torch built with oneDNN")
    model.output_kernel = kernel
    return kernel


def onednn_is_faster(output: nn.Module | None) -> bool:
    """Whether oneDNN's product for the fp32 CPU layer `output` is clearly faster at every timed row count."""
    if not isinstance(output, nn.Linear) or not onednn_available():
        return False
    if output.weight.device.type != "cpu" or output.weight.dtype != torch.float32:
        return False

    def default(x: Tensor) -> Tensor:
        return project(output, x)

    def onednn(x: Tensor) -> Tensor:
        return project(output, x, "onednn")

    generator = torch.Generator().manual_seed(0)
    for rows in TIMED_ROWS:
        x = torch.randn(rows, output.in_features, generator=generator)
        calls = max(1, 64 // rows)  # about 10 ms per round at 8,000 x 256
        if best_seconds(default, x, calls) < ONEDNN_MIN_SPEEDUP * best_seconds(onednn, x, calls):
            return False
    return True
