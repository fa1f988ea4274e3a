"""A tiny MarianMT folder in Hugging Face's layout, built offline: what `nmt import` reads.

Two SentencePiece models trained with SentencePiece's defaults, as OPUS-MT's are
(<unk>=0, <s>=1, </s>=2, no <pad>, nmt_nfkc normalisation), a `vocab.json` in Marian's
order (</s>=0, <unk>=1, the pieces, <pad> last) over both models' pieces (shared) or one
per side (separate), and a `MarianMTModel` with random weights everywhere: LayerNorms,
biases, the logit bias, the pad row. Needs `transformers` (a test-only extra).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import sentencepiece as spm
import torch

from tests.conftest import make_parallel

SIZES = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
             encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)
# Sub-layers as strong as the embeddings (Hugging Face's init_std of 0.02 would leave a bigram model that repeats
# one token): outputs that depend on the source
INIT_STD, EMBEDDING_STD = 0.3, 0.1
EOS_POSITION, EOS_BIAS, NORM_GAIN = 2.0, 1.0, 3.0  # EOS grows likelier with every token: outputs of mixed lengths


def train_spm(lines: list[str], vocab_size: int) -> bytes:
    """A SentencePiece model with the library's default special ids, as Marian trains them."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
                                   model_type="unigram", minloglevel=2, seed_sentencepiece_size=1000)
    return model.getvalue()


def marian_vocab(*models: bytes) -> dict[str, int]:
    """Marian's vocabulary over the pieces of `models`: </s>=0, <unk>=1, the pieces in first-seen order, <pad> last."""
    pieces = ["</s>", "<unk>"]
    for data in models:
        sp = spm.SentencePieceProcessor()
        sp.LoadFromSerializedProto(data)
        pieces += [p for p in (sp.id_to_piece(i) for i in range(sp.get_piece_size()))
                   if p not in pieces and p not in ("<s>", "</s>", "<unk>")]
    return {piece: i for i, piece in enumerate([*pieces, "<pad>"])}


def build_marian_folder(folder: Path, separate: bool = False, seed: int = 0, **config: object) -> Path:
    """Write a random MarianMT model, its tokenizer files and a generation config into `folder`."""
    from transformers import MarianConfig, MarianMTModel

    folder.mkdir(parents=True, exist_ok=True)
    src_text, tgt_text = make_parallel(300, seed=11)
    source, target = train_spm(src_text, 40), train_spm(tgt_text, 40)  # separate vocabularies of one size:
    # Hugging Face has one pad id (the decoder start) for both sides
    (folder / "source.spm").write_bytes(source)
    (folder / "target.spm").write_bytes(target)
    vocabs = [marian_vocab(source), marian_vocab(target)] if separate else [marian_vocab(source, target)] * 2
    (folder / "vocab.json").write_text(json.dumps(vocabs[0], ensure_ascii=False), encoding="utf-8")
    if separate:
        (folder / "target_vocab.json").write_text(json.dumps(vocabs[1], ensure_ascii=False), encoding="utf-8")
    pad = len(vocabs[0]) - 1
    options = dict(SIZES, vocab_size=len(vocabs[0]), decoder_vocab_size=len(vocabs[1]), pad_token_id=pad,
                   eos_token_id=0, decoder_start_token_id=pad, activation_function="swish", dropout=0.0,
                   share_encoder_decoder_embeddings=not separate, scale_embedding=True, init_std=INIT_STD, **config)
    torch.manual_seed(seed)
    model = MarianMTModel(MarianConfig(**options)).eval()
    with torch.no_grad():
        for name, value in model.named_parameters():
            if "norm" in name:
                value.uniform_(0.5, 1.5) if name.endswith("weight") else value.normal_(std=0.1)
            elif name.endswith("bias"):
                value.normal_(std=0.1)
        for embedding in (model.model.encoder.embed_tokens, model.model.decoder.embed_tokens):
            embedding.weight.normal_(std=EMBEDDING_STD)  # the pad row too: the decoder starts from it
        model.final_logits_bias.normal_(std=0.5)[0, 0] = EOS_BIAS
        ending(model)
    model.generation_config.update(num_beams=3, max_length=30, bad_words_ids=[[pad]], length_penalty=1.0)
    model.save_pretrained(folder)
    tokenizer_config = {"source_lang": "en", "target_lang": "de", "separate_vocabs": separate}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")
    return folder


def ending(model: torch.nn.Module) -> None:
    """Let EOS grow likelier along the output: one channel of the decoder carries only the position's
    cos(0.1 * position) (Marian's concatenated sinusoids put it at d/2 + d/8; no token embedding or
    sub-layer writes there, and the post-norms keep its scale), and EOS's output row reads it with weight
    -EOS_POSITION."""
    channel = model.config.d_model // 2 + model.config.d_model // 8
    decoder = model.model.decoder
    for layer in decoder.layers:
        for linear in (layer.self_attn.out_proj, layer.encoder_attn.out_proj, layer.fc2):
            linear.weight[channel], linear.bias[channel] = 0.0, 0.0
        for norm in (layer.self_attn_layer_norm, layer.encoder_attn_layer_norm, layer.final_layer_norm):
            norm.weight[channel], norm.bias[channel] = NORM_GAIN, 0.0  # as large as what the norm divides by
    decoder.embed_tokens.weight[:, channel] = 0.0
    model.get_output_embeddings().weight[model.config.eos_token_id, channel] = -EOS_POSITION
