"""A tiny MarianMT folder in Hugging Face's layout, built offline: what `nmt import` reads.

recipes/finetune/make_marian.py builds it (SentencePiece models with SentencePiece's defaults, as
OPUS-MT's are, a `vocab.json` in Marian's order, a `MarianMTModel` whose EOS grows likelier along the
output); here at tiny sizes, on the toy corpus, with random weights everywhere: LayerNorms, biases, the
logit bias, the pad row. Needs `transformers` (a test-only extra).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from tests.conftest import make_parallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes" / "finetune"))
from make_marian import build_folder, train_spm

SIZES = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
             encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)
# Sub-layers as strong as the embeddings (Hugging Face's init_std of 0.02 would leave a bigram model that repeats
# one token): outputs that depend on the source
INIT_STD, EMBEDDING_STD = 0.3, 0.1
EOS_BIAS = 1.0


def build_marian_folder(folder: Path, separate: bool = False, seed: int = 0, **config: object) -> Path:
    """Write a random MarianMT model, its tokenizer files and a generation config into `folder`."""
    src_text, tgt_text = make_parallel(300, seed=11)
    source, target = (train_spm(text, 40, seed_sentencepiece_size=1000) for text in (src_text, tgt_text))
    options = dict(SIZES, activation_function="swish", dropout=0.0, scale_embedding=True, init_std=INIT_STD,
                   **config)
    return build_folder(folder, source, target, options, separate=separate, seed=seed, randomise=randomise,
                        beam=3, max_length=30)


def randomise(model: torch.nn.Module) -> None:
    """Random LayerNorms, biases, embeddings (the pad row too: the decoder starts from it) and logit bias."""
    for name, value in model.named_parameters():
        if "norm" in name:
            value.uniform_(0.5, 1.5) if name.endswith("weight") else value.normal_(std=0.1)
        elif name.endswith("bias"):
            value.normal_(std=0.1)
    for embedding in (model.model.encoder.embed_tokens, model.model.decoder.embed_tokens):
        embedding.weight.normal_(std=EMBEDDING_STD)
    model.final_logits_bias.normal_(std=0.5)[0, 0] = EOS_BIAS
