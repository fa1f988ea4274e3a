"""GPU layouts a launcher can give a process, and the RNG state a checkpoint keeps (no GPU needed)."""

from __future__ import annotations

import pytest
import torch

from nmt.distributed import local_cuda_index
from nmt.errors import NmtError
from nmt.train.state import capture_rng, restore_rng


def test_each_process_finds_its_gpu() -> None:
    assert local_cuda_index(local_rank=3, visible=8) == 3  # torchrun on one node: every GPU visible
    assert local_cuda_index(local_rank=1, visible=1) == 0  # SLURM --gpus-per-task: only its own
    with pytest.raises(NmtError, match="LOCAL_RANK 4 but only 2 GPUs are visible to this process"):
        local_cuda_index(local_rank=4, visible=2)


def test_rng_state_is_the_trained_devices_only() -> None:
    state = capture_rng(torch.device("cpu"))
    assert set(state) == {"torch", "python"}  # no GPU generators: a resume may see other GPUs
    expected = torch.rand(3)
    restore_rng(state, torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected)
