"""What every architecture shares: the interface base class, embeddings and the output layer.

`Seq2Seq` holds the parts of the model interface that do not depend on the
architecture (parameter count, state reordering, float32 log-probs, the output
projection), so search and training code can treat a Transformer and an RNN alike.

The letters of every shape comment in nmt, one legend for all modules:
    B  sentences in a batch (or rows of a decoder state: sentences x beams)
    S  source length, T target length, t target tokens decoded so far (all with BOS/EOS)
    D  model width (d_model), Dh per-head width, H attention heads, L layers
    E  RNN embedding width, C RNN hidden size, V vocabulary size
    in search: N live sentences, W live beams per sentence, K candidates kept per sentence,
    R rows searched (N x W, or sentences x samples), n size of the n-best list
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from nmt.config import ModelConfig
from nmt.errors import NmtError
from nmt.tokenizer import PAD_ID

State = dict[str, Tensor]


def check_choice(option: str, value: str, choices: Sequence[str]) -> None:
    """Reject an unknown option value in one line, listing the valid ones."""
    if value not in choices:
        raise NmtError(f"unknown model.{option} {value!r}; choose one of {', '.join(choices)}")


class Seq2Seq(nn.Module):
    """Base class of every encoder-decoder; see the model interface in the design notes."""

    max_positions: int | None = None
    # State entries computed from the encoder output alone: equal for every beam of a sentence.
    sentence_keys: frozenset[str] = frozenset()
    # State entries that are scratch space for the next `reorder_state`, not part of what the state holds.
    buffer_keys: frozenset[str] = frozenset()

    def num_parameters(self) -> int:
        """Trainable parameters, each shared tensor counted once."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def reorder_state(self, state: State, rows: Tensor, sentences: Tensor | None = None) -> State:
        """Gather the state's batch-first tensors along dim 0 (beam expansion, back-pointers, pruning).

        The per-sentence entries (`sentence_keys`: encoder output, cross-attention keys/values, source
        mask) hold one row per sentence, shared by all of its beams: they move only when the sentences
        change (`sentences`: the old index of each new sentence; None keeps them as they are), so a beam
        step never copies them. Every other entry holds one row per hypothesis: `rows` gives the old row
        of each new one. A sentence's rows stay side by side, the same number for every sentence, in the
        order of its sentence entries (what `step` needs to match each row with its sentence).
        """
        return {
            key: (value if not value.dim() or (key in self.sentence_keys and sentences is None)
                  else value.index_select(0, sentences if key in self.sentence_keys else rows))
            for key, value in state.items()
        }

    def output_projection(self) -> Tensor:
        """The (V, D) weight that maps `forward(..., features_only=True)` to logits:
        what the fused loss multiplies by."""
        return self.output.weight

    def output_bias(self) -> Tensor | None:
        """The (V,) bias added to those logits, if the model has one (`model.output_bias`)."""
        return self.output.bias

    def flops_per_token(self, src_len: int, tgt_len: int) -> float:
        raise NotImplementedError


class Embeddings(nn.Module):
    """Source and target token tables, one shared table when the vocabulary is joint."""

    def __init__(self, config: ModelConfig, dim: int) -> None:
        super().__init__()
        if config.src_vocab_size <= 0 or config.tgt_vocab_size <= 0:
            raise NmtError("model vocabulary sizes are not set (src_vocab_size, tgt_vocab_size)")
        if config.joint_vocab and config.src_vocab_size != config.tgt_vocab_size:
            raise NmtError(
                f"joint_vocab needs equal vocabulary sizes, got source {config.src_vocab_size} "
                f"and target {config.tgt_vocab_size}"
            )
        if config.share_embeddings and not config.joint_vocab:
            raise NmtError("model.share_embeddings needs a joint vocabulary (joint_vocab); "
                           "set share_embeddings = false")
        self.src = nn.Embedding(config.src_vocab_size, dim, padding_idx=PAD_ID)
        self.tgt = self.src if config.share_embeddings else nn.Embedding(config.tgt_vocab_size, dim, padding_idx=PAD_ID)
        self.scale = math.sqrt(dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, 1/dim) tables read through a sqrt(dim) scale: inputs have unit variance, while a
        tied output layer starts with logits of unit scale (N(0, 1) tables would make them sqrt(dim)
        times larger, which GRU and Elman RNN decoders do not recover from)."""
        for table in dict.fromkeys([self.src, self.tgt]):
            nn.init.normal_(table.weight, std=table.embedding_dim**-0.5)
            with torch.no_grad():
                table.weight[table.padding_idx].zero_()

    def source(self, tokens: Tensor) -> Tensor:
        """Source token ids (B, S) -> scaled embeddings (B, S, dim)."""
        return self.src(tokens) * self.scale

    def target(self, tokens: Tensor) -> Tensor:
        """Target token ids (B, T) -> scaled embeddings (B, T, dim)."""
        return self.tgt(tokens) * self.scale


def output_layer(config: ModelConfig, dim: int, tgt_embed: nn.Embedding) -> nn.Linear:
    """Projection to target-vocabulary logits, with a bias only under `output_bias` (imported Marian models);
    its weight *is* the target table when tied."""
    output = nn.Linear(dim, config.tgt_vocab_size, bias=config.output_bias)
    if config.tie_output:
        if tgt_embed.embedding_dim != dim:
            raise NmtError(f"model.tie_output needs embeddings of size {dim}, got {tgt_embed.embedding_dim}")
        output.weight = tgt_embed.weight
    return output


def log_probs(logits: Tensor) -> Tensor:
    """Log-softmax in float32 whatever the autocast dtype, so beam scores do not drift."""
    return torch.log_softmax(logits if logits.dtype == torch.float32 else logits.float(), dim=-1)
