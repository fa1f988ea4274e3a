"""A Transformer whose weights are set, not trained, so that it copies its input token for token.

Plumbing tests (streams, order, empty lines, UTF-8, n-best formatting, eval on
translations) need a model whose output is known in advance on every machine.
Training a tiny model for a few hundred updates gives different weights on CPUs
that round differently; this model's output is fixed by construction instead.

How it copies (pre-norm, one encoder and one decoder layer, one head, every
residual sub-layer zeroed except the decoder's cross-attention):
- the residual stream has four blocks: the input token (one-hot), the position
  (one-hot, learned positions), the copied token (one-hot) and one spare channel;
  every token and position vector has the same magnitude, so each LayerNorm maps
  every input to the same two values (hot, cold);
- decoder step t attends only to source position t (query and key read the
  position block, shifted so that cold channels are zero), and the value moves
  that source token into the copied-token block;
- the untied output layer reads the copied-token block, so the source token at t
  is the next token by a logit margin of `MARGIN`; the source's EOS ends the copy.
Distinct small offsets per token (through the spare channel) break every tie
among the other tokens, so n-best lists are the same on every machine too.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from nmt.checkpoint import Checkpoint
from nmt.config import Config, ModelConfig
from nmt.models import build_model
from nmt.tokenizer import Tokenizer

MARGIN = 30.0  # logit gap between the copied token and every other token
ATTENTION_GAP = 50.0  # score gap between the aligned source position and every other one
TIE_BREAK = 0.01  # logit offset between consecutive token ids among the non-copied tokens
SCALE = 10.0  # magnitude of each hot channel in the residual stream (keeps LayerNorm's eps negligible)


def copy_config(vocab_size: int, max_positions: int) -> ModelConfig:
    """One layer each way, one head, d_model wide enough for the four blocks."""
    width = 2 * vocab_size + max_positions + 1
    return ModelConfig(
        arch="transformer", src_vocab_size=vocab_size, tgt_vocab_size=vocab_size, joint_vocab=True,
        share_embeddings=True, tie_output=False, enc_layers=1, dec_layers=1, dropout=0.0, d_model=width,
        heads=1, ffn_dim=4, norm="pre", positions="learned", max_positions=max_positions,
    )


def layer_norm_levels(hot: int, width: int) -> tuple[float, float]:
    """LayerNorm output of a vector with `hot` equal non-zero channels among `width`: (hot value, cold value)."""
    mean = hot / width
    std = math.sqrt(hot / width - mean * mean)
    return (1 - mean) / std, -mean / std


@torch.no_grad()
def set_copy_weights(model: torch.nn.Module, vocab: int, positions: int) -> None:
    """Overwrite a freshly built `copy_config` Transformer's weights (see the module docstring)."""
    for parameter in model.parameters():
        parameter.zero_()
    for name, parameter in model.named_parameters():
        if "norm" in name and name.endswith("weight"):
            parameter.fill_(1.0)  # LayerNorm gains
    width = model.config.d_model
    token, position, copied = (torch.arange(vocab), vocab + torch.arange(positions),
                               vocab + positions + torch.arange(vocab))
    spare = width - 1
    model.embed.src.weight[token, token] = SCALE / model.embed.scale
    model.embed.src.weight[0].zero_()  # padding
    model.learned_positions.weight[torch.arange(positions), position] = SCALE

    hot, cold = layer_norm_levels(2, width)  # every encoder output and decoder input after its norm
    cross = model.decoder[0].cross_attn
    query_scale = ATTENTION_GAP * math.sqrt(width) / (hot - cold) ** 2
    cross.q.weight[position, position] = query_scale
    cross.q.bias[position] = -cold * query_scale
    cross.kv.weight[position, position] = 1.0  # keys: the source position, cold channels shifted to zero
    cross.kv.bias[position] = -cold
    cross.kv.weight[width + copied, token] = 1.0  # values: the source token, moved to the copied block
    cross.kv.bias[width + copied] = -cold
    cross.out.weight[copied, copied] = SCALE / (hot - cold)  # the copied token as hot as the others

    hot3, cold3 = layer_norm_levels(3, width)  # after the cross-attention: input, position and copied hot
    model.output.weight[token, copied] = MARGIN / (hot3 - cold3)
    model.output.weight[token, spare] = -TIE_BREAK * token.float() / cold3  # lower ids win ties


def copy_checkpoint(tokenizer: Tokenizer, max_positions: int = 64) -> Checkpoint:
    """A checkpoint of the copying Transformer over `tokenizer` (joint), greedy by default."""
    config = Config()
    config.model = copy_config(tokenizer.vocab_size, max_positions)
    config.decode.beam = 1
    config.decode.max_len_a, config.decode.max_len_b = 1.0, 5
    model = build_model(config.model)
    set_copy_weights(model, tokenizer.vocab_size, max_positions)
    return Checkpoint(config=config, model_state=model.state_dict(), src_tokenizer=tokenizer, tgt_tokenizer=tokenizer)


def save_copy_checkpoint(tokenizer: Tokenizer, path: Path, max_positions: int = 64) -> Path:
    copy_checkpoint(tokenizer, max_positions).save(path)
    return path
