"""Every option of a model, a training run and a decoding run, as dataclasses.

A config file (TOML) has one table per dataclass: [model], [train], [decode].
`load_config` reads it, `apply_overrides` merges `section.key=value` strings from
the command line, and `to_dict` gives the resolved form stored in checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    """Architecture options. Vocabulary sizes are filled in from the tokenizer(s)."""

    arch: str = "transformer"  # "transformer" or "rnn"
    src_vocab_size: int = 0
    tgt_vocab_size: int = 0
    joint_vocab: bool = False  # source and target share one tokenizer
    share_embeddings: bool = True  # one embedding table for source and target (needs joint_vocab)
    tie_output: bool = True  # output projection shares the target embedding matrix
    enc_layers: int = 3
    dec_layers: int = 3
    dropout: float = 0.1
    # Transformer
    d_model: int = 256
    heads: int = 4
    ffn_dim: int = 1024
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    activation: str = "relu"  # "relu" or "gelu"
    norm: str = "pre"  # "pre" (LayerNorm before each sub-layer) or "post" (as the 2017 paper)
    positions: str = "sinusoidal"  # "sinusoidal" or "learned"
    max_positions: int = 1024  # longest source or target, in tokens, including BOS/EOS
    # Recurrent (arch = "rnn")
    cell: str = "lstm"  # "lstm", "gru" or "rnn"
    embed_dim: int = 256
    hidden_size: int = 512
    attention: str = "general"  # "dot", "general" (Luong) or "bahdanau" (additive)
    input_feeding: bool = True
    bridge: bool = True  # learned projection of the encoder's final state to the decoder's initial state


@dataclass
class DecodeConfig:
    """Search options shared by `nmt translate`, `nmt eval -m` and validation during training."""

    beam: int = 5
    alpha: float = 0.6  # length penalty exponent; 0 disables it
    length_penalty: str = "gnmt"  # "gnmt": ((5 + len) / 6) ** alpha, "average": len ** alpha
    nbest: int = 1
    max_len_a: float = 1.5  # output length limit per sentence: a * src_len + b
    max_len_b: int = 10
    min_len: int = 0
    ban_unk: bool = False
    early_stop: bool = False  # stop a sentence once `beam` hypotheses finished (faster, inexact)
    sampling: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
