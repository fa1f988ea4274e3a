"""Model construction: the one place that knows every architecture."""

from __future__ import annotations

from nmt.config import ModelConfig
from nmt.models.common import Seq2Seq, State, check_choice
from nmt.models.rnn import RNNSeq2Seq
from nmt.models.transformer import Transformer

ARCHITECTURES: dict[str, type[Seq2Seq]] = {"transformer": Transformer, "rnn": RNNSeq2Seq}

__all__ = ["ARCHITECTURES", "Seq2Seq", "State", "build_model"]


def build_model(config: ModelConfig) -> Seq2Seq:
    """A freshly initialised model for `config` (vocabulary sizes must be filled in)."""
    check_choice("arch", config.arch, tuple(ARCHITECTURES))
    return ARCHITECTURES[config.arch](config)
