"""A randomly initialised MarianMT model of OPUS-MT's shape, in Hugging Face's layout: what `nmt import` reads.

    python recipes/finetune/make_marian.py --src train.en --tgt train.de -o work/finetune/opus-mt-en-de

What `nmt import Helsinki-NLP/opus-mt-en-de` downloads, built offline and knowing nothing:
- OPUS-MT's Transformer: d_model 512, 6 + 6 layers, 8 heads, FFN 2,048, swish, scaled embeddings, post-norm,
  Marian's sinusoids, a logit bias, one embedding matrix for both sides and the output; its decoding
  defaults (beam 4, length penalty len ** 1).
- Two SentencePiece models trained with SentencePiece's defaults, as OPUS-MT's are (unigram, <unk>=0, <s>=1,
  </s>=2, no <pad>, nmt_nfkc), one per side on that side's training text, and one vocab.json in Marian's
  order (</s>=0, <unk>=1, both models' pieces, <pad> last). OPUS-MT's models have 32k pieces a side (58,101
  ids in all for en-de), more than a corpus of Multi30k's size supplies, so here each side gets at most
  SentencePiece's default 8,000 (a ceiling, not a demand: a small corpus gives what it can);
  `--vocab-size` pads the ids with pieces no text produces, to time a model of OPUS-MT's full size.
- Hugging Face's random initialisation, then `ending`: EOS grows likelier with every output token, so outputs
  end about as long as translations rather than at the length limit, and decoding costs what it costs with a
  trained model. Its translations mean nothing.

Needs `transformers` (in nmt's `dev` extra), which nmt itself never imports. The tests build their tiny
MarianMT models with these functions too.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch

OPUS_MT = dict(d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8, decoder_attention_heads=8,
               encoder_ffn_dim=2048, decoder_ffn_dim=2048, max_position_embeddings=512, activation_function="swish",
               scale_embedding=True, dropout=0.1, attention_dropout=0.0, activation_dropout=0.0)
OPUS_MT_BEAM = 4
EOS_POSITION, NORM_GAIN = 2.0, 3.0  # see `ending`


def train_spm(lines: Iterable[str], vocab_size: int, **options: Any) -> bytes:
    """A SentencePiece model with the library's defaults (special ids included), as Marian trains them."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
                                   model_type="unigram", minloglevel=2, **options)
    return model.getvalue()


def marian_vocab(*models: bytes, size: int = 0) -> dict[str, int]:
    """Marian's vocabulary over the pieces of `models`: </s>=0, <unk>=1, the pieces in first-seen order, <pad>
    last; with `size`, pieces that no text produces fill it to `size` ids before <pad>."""
    seen = dict.fromkeys(["</s>", "<unk>"])  # an ordered set: first-seen order, linear in the pieces
    for data in models:
        sp = spm.SentencePieceProcessor()
        sp.LoadFromSerializedProto(data)
        seen.update(dict.fromkeys(p for p in (sp.id_to_piece(i) for i in range(sp.get_piece_size()))
                                  if p not in ("<s>", "</s>", "<unk>")))
    pieces = list(seen)
    if size and size < len(pieces) + 1:
        raise ValueError(f"--vocab-size {size} is smaller than the {len(pieces) + 1} ids the pieces need")
    pieces += [f"<unused{i}>" for i in range(max(0, size - len(pieces) - 1))]
    return {piece: i for i, piece in enumerate([*pieces, "<pad>"])}


def build_folder(folder: Path, source: bytes, target: bytes, config: dict[str, Any], separate: bool = False,
                 seed: int = 0, vocab_size: int = 0, languages: tuple[str, str] = ("en", "de"),
                 randomise: Callable[[torch.nn.Module], None] | None = None, beam: int = OPUS_MT_BEAM,
                 max_length: int = 512) -> Path:
    """Write a random MarianMT model (`config`: MarianConfig's sizes and options; `randomise` changes the
    weights before `ending`), its tokenizer files and a generation config into `folder`."""
    from transformers import MarianConfig, MarianMTModel

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "source.spm").write_bytes(source)
    (folder / "target.spm").write_bytes(target)
    vocabs = ([marian_vocab(source, size=vocab_size), marian_vocab(target, size=vocab_size)] if separate
              else [marian_vocab(source, target, size=vocab_size)] * 2)
    write_json(folder / "vocab.json", vocabs[0])
    if separate:
        write_json(folder / "target_vocab.json", vocabs[1])
    pad = len(vocabs[0]) - 1  # separate vocabularies of one size: Hugging Face has one pad id for both sides
    options = dict(config, vocab_size=len(vocabs[0]), decoder_vocab_size=len(vocabs[1]), pad_token_id=pad,
                   eos_token_id=0, decoder_start_token_id=pad, share_encoder_decoder_embeddings=not separate)
    torch.manual_seed(seed)
    model = MarianMTModel(MarianConfig(**options)).eval()
    with torch.no_grad():
        if randomise is not None:
            randomise(model)
        ending(model)
    model.generation_config.update(num_beams=beam, max_length=max_length, bad_words_ids=[[pad]], length_penalty=1.0)
    model.save_pretrained(folder)
    write_json(folder / "tokenizer_config.json",
               {"source_lang": languages[0], "target_lang": languages[1], "separate_vocabs": separate})
    return folder


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


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


def side_model(path: Path, vocab_size: int) -> bytes:
    """One side's SentencePiece model, trained on its text; what goes wrong is one line naming the file or size."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read it ({exc.__class__.__name__})") from None
    try:
        return train_spm(lines, vocab_size, hard_vocab_limit=False)
    except RuntimeError as exc:  # SentencePiece's: "INTERNAL: file(line) [check] what went wrong"
        raise ValueError(f"--spm-vocab {vocab_size} on {path}: {str(exc).strip().rsplit('] ', 1)[-1]}") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, required=True, help="source-side training text, one sentence a line")
    parser.add_argument("--tgt", type=Path, required=True, help="target-side training text")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the MarianMT folder to write")
    parser.add_argument("--pair", default="en-de", help="source and target language codes (default en-de)")
    parser.add_argument("--spm-vocab", type=int, default=8000, help="the most pieces of each SentencePiece "
                        "model (default 8000, SentencePiece's own)")
    parser.add_argument("--vocab-size", type=int, default=0, help="pad the shared vocabulary to this many ids "
                        "(OPUS-MT en-de: 58101; default 0: the pieces only)")
    parser.add_argument("--d-model", type=int, default=OPUS_MT["d_model"])
    parser.add_argument("--layers", type=int, default=OPUS_MT["encoder_layers"], help="encoder and decoder layers")
    parser.add_argument("--heads", type=int, default=OPUS_MT["encoder_attention_heads"])
    parser.add_argument("--ffn", type=int, default=OPUS_MT["encoder_ffn_dim"])
    parser.add_argument("--seed", type=int, default=1)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    source_lang, _, target_lang = args.pair.partition("-")
    try:
        if not (source_lang and target_lang):
            raise ValueError(f"--pair {args.pair!r}: expected two language codes such as en-de")
        if min(args.d_model, args.layers, args.heads, args.ffn) < 1 or args.d_model % 2 or args.d_model % args.heads:
            raise ValueError(f"--d-model {args.d_model}, --layers {args.layers}, --heads {args.heads}, --ffn "
                             f"{args.ffn}: each must be 1 or more, and --d-model even and a multiple of --heads")
        source, target = (side_model(path, args.spm_vocab) for path in (args.src, args.tgt))
        sizes = dict(d_model=args.d_model, encoder_layers=args.layers, decoder_layers=args.layers,
                     encoder_attention_heads=args.heads, decoder_attention_heads=args.heads,
                     encoder_ffn_dim=args.ffn, decoder_ffn_dim=args.ffn)
        build_folder(args.output, source, target, OPUS_MT | sizes, seed=args.seed, vocab_size=args.vocab_size,
                     languages=(source_lang, target_lang))
    except ValueError as exc:
        sys.exit(f"error: {exc}")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
