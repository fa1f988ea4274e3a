"""Pretrained checkpoints into nmt: OPUS-MT models in Hugging Face's MarianMT layout -> one nmt checkpoint.

A MarianMT Transformer is nmt's post-norm Transformer with swish activations,
sinusoids laid out as all sines then all cosines, and a bias on the output logits
(`model.activation`, `model.position_layout`, `model.output_bias`). What differs is
the vocabulary. Marian numbers its pieces through `vocab.json`: </s>=0, <unk>=1, the
pieces, <pad> last; its decoder starts from the <pad> row and it has no <s>. nmt fixes
<pad>, <unk>, <s>, </s> at 0-3 everywhere (data, search, loss, export), so the import
permutes the embedding rows (and logit columns) into nmt's order:

    nmt id:   0 <pad>   1 <unk>   2 <s>            3 </s>   4.. the other pieces in Marian's order
    Marian:   <pad>     <unk>     <pad> (a copy)   </s>     ...

The <s> row is a copy of the <pad> row, the decoder's start, so nmt's decoder (which
starts from <s>) reads what Marian's reads. The copy adds one column to the output, and
its logit bias is -inf: <s> is never produced and takes no probability, so every
log-probability is Marian's own (the fused loss leaves -inf columns out of smoothing too).
Why a permutation rather than ids kept as Marian's: nothing else in nmt has to know
that a model was imported. The SentencePiece models are kept as they are; the tokenizer
carries the id table (nmt.tokenizer), through which pieces map to ids as Hugging Face's
MarianTokenizer maps them (unknown pieces to <unk>).

Weights are read with safetensors or `torch.load(weights_only=True)`; `transformers`
is never imported. A hub id (a PATH that is not a folder) is fetched with huggingface_hub.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from nmt.checkpoint import Checkpoint
from nmt.config import Config, DecodeConfig, ModelConfig
from nmt.errors import NmtError
from nmt.models import build_model
from nmt.tokenizer import BOS_ID, BOS_PIECE, EOS_PIECE, PAD_PIECE, UNK_PIECE, Tokenizer

FILES = ("config.json", "source.spm", "target.spm", "vocab.json")
WEIGHTS = ("model.safetensors", "pytorch_model.bin")
HUB_FILES = [*FILES, "generation_config.json", "target_vocab.json", "tokenizer_config.json", *WEIGHTS]
ACTIVATIONS = {"swish": "swish", "silu": "swish", "relu": "relu", "gelu": "gelu"}  # Hugging Face's -> nmt's
REFUSED = {"normalize_before": True, "normalize_embedding": True, "add_bias_logits": True,  # field: refused value
           "scale_embedding": False, "static_position_embeddings": False}
LANGUAGE = re.compile(r"[a-z]{2,3}")


@dataclass
class MarianFolder:
    """What a MarianMT folder says, read and checked."""

    folder: Path
    config: dict[str, Any]
    generation: dict[str, Any]
    weights: dict[str, Tensor]
    src_vocab: list[str]  # Marian's pieces in Marian's id order
    tgt_vocab: list[str]
    src_spm: bytes
    tgt_spm: bytes
    languages: tuple[str, str] | None


def import_marian(source: str | Path) -> Checkpoint:
    """The nmt checkpoint of a MarianMT folder or hub id (fp32 weights, config, tokenizers, decode defaults)."""
    marian = read_folder(locate(source), name=str(source))
    model = model_config(marian)
    src_table, tgt_table = nmt_table(marian.src_vocab), nmt_table(marian.tgt_vocab)
    try:
        state = nmt_state(marian, model)
    except (IndexError, RuntimeError):  # a table with fewer rows than the vocabulary, parts that do not concatenate
        raise NmtError(f"{marian.folder}: the weights do not fit the vocabulary and sizes config.json gives") from None
    built = build_model(model)  # the permuted weights must be exactly what an nmt model of this config holds
    expected = {name: tuple(value.shape) for name, value in built.state_dict().items()}
    if {name: tuple(value.shape) for name, value in state.items()} != expected:
        raise NmtError(f"{marian.folder}: the weights do not fit the model config.json describes")
    config = Config(model=model, decode=decode_defaults(marian.generation))
    return Checkpoint(config=config, model_state=state,
                      src_tokenizer=Tokenizer(marian.src_spm, vocabulary=src_table),
                      tgt_tokenizer=Tokenizer(marian.tgt_spm, vocabulary=tgt_table),
                      languages=marian.languages)


def locate(source: str | Path) -> Path:
    """A local folder as it is; anything else is a hub model id, downloaded (only the files an import reads)."""
    path = Path(source)
    if path.is_dir():
        return path
    if path.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)):
        raise NmtError(f"{source}: not a folder, nor a hub model id such as Helsinki-NLP/opus-mt-en-de")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise NmtError(f"{source}: not a folder; to fetch it from the hub install huggingface_hub") from None
    try:
        return Path(snapshot_download(str(source), allow_patterns=HUB_FILES))
    except Exception as exc:  # offline, unknown id, gated: each library error means "could not fetch it"
        raise NmtError(f"{source}: could not fetch it from the hub ({type(exc).__name__})") from None


def read_folder(folder: Path, name: str) -> MarianFolder:
    """Read every file of a MarianMT folder; one NmtError line names the first thing missing or unsupported."""
    for file in FILES:
        if not (folder / file).is_file():
            raise NmtError(f"{folder}: no {file}, so not a MarianMT model folder")
    config = read_json(folder / "config.json")
    check_config(folder / "config.json", config)
    generation = read_json(folder / "generation_config.json") if (folder / "generation_config.json").is_file() else {}
    separate = not config.get("share_encoder_decoder_embeddings", True)
    src_vocab = read_vocab(folder / "vocab.json", config, "vocab_size")
    tgt_vocab = (read_vocab(folder / "target_vocab.json", config, "decoder_vocab_size") if separate
                 else src_vocab)
    tokenizer_config = (read_json(folder / "tokenizer_config.json")
                        if (folder / "tokenizer_config.json").is_file() else {})
    return MarianFolder(folder, config, generation, read_weights(folder), src_vocab, tgt_vocab,
                        (folder / "source.spm").read_bytes(), (folder / "target.spm").read_bytes(),
                        languages_of(tokenizer_config, name))


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NmtError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise NmtError(f"{path}: expected a JSON object")
    return data


def check_config(path: Path, config: dict[str, Any]) -> None:
    """Refuse, naming the field, every MarianMT variant nmt's Transformer does not compute exactly."""
    if config.get("model_type") != "marian":
        raise NmtError(f"{path}: model_type {config.get('model_type')!r} is not supported (only 'marian')")
    activation = config.get("activation_function", "swish")
    if activation not in ACTIVATIONS:
        raise NmtError(f"{path}: activation_function {activation!r} is not supported "
                       f"(choose one of {', '.join(ACTIVATIONS)})")
    for field, refused in REFUSED.items():
        if config.get(field, not refused) == refused:
            raise NmtError(f"{path}: {field} = {json.dumps(refused)} is not supported")
    for encoder, decoder in (("encoder_attention_heads", "decoder_attention_heads"),
                             ("encoder_ffn_dim", "decoder_ffn_dim")):
        if config.get(encoder) != config.get(decoder):
            raise NmtError(f"{path}: {encoder} {config.get(encoder)} differs from {decoder} {config.get(decoder)}, "
                           "which nmt's Transformer does not support")
    pad, start = config.get("pad_token_id"), config.get("decoder_start_token_id", config.get("pad_token_id"))
    if start != pad:
        raise NmtError(f"{path}: decoder_start_token_id {start} is not the pad_token_id {pad}")


def read_vocab(path: Path, config: dict[str, Any], size_field: str) -> list[str]:
    """Marian's pieces in id order, checked against config.json (size, </s>, <pad>) and for >>xx<< tokens."""
    if not path.is_file():
        raise NmtError(f"{path.parent}: no {path.name}, which a model with separate vocabularies needs")
    vocab = read_json(path)
    pieces = sorted(vocab, key=lambda piece: vocab[piece])
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise NmtError(f"{path}: ids are not 0..{len(vocab) - 1}, one each")
    size = config.get(size_field) or config.get("vocab_size")
    if len(pieces) != size:
        raise NmtError(f"{path}: {len(pieces)} pieces, but config.json {size_field} is {size}")
    for piece, field in ((EOS_PIECE, "eos_token_id"), (PAD_PIECE, "pad_token_id")):
        if vocab.get(piece) != config.get(field):
            raise NmtError(f"{path}: {piece} has id {vocab.get(piece)}, but config.json {field} is "
                           f"{config.get(field)}")
    if UNK_PIECE not in vocab or BOS_PIECE in vocab:
        raise NmtError(f"{path}: expected {UNK_PIECE} and no {BOS_PIECE}, as Marian vocabularies have")
    if targets := [piece for piece in pieces if re.fullmatch(r">>.+<<", piece)]:
        raise NmtError(f"{path}: a multi-target model (language tokens such as {targets[0]}) is not supported")
    return pieces


def read_weights(folder: Path) -> dict[str, Tensor]:
    """The state dict in float32, keys without the `model.` prefix; damaged files are one line."""
    path = next((folder / name for name in WEIGHTS if (folder / name).is_file()), None)
    if path is None:
        raise NmtError(f"{folder}: no model.safetensors or pytorch_model.bin")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            weights = load_file(str(path))
        else:
            weights = torch.load(path, map_location="cpu", weights_only=True)
    except ImportError:
        raise NmtError(f"{path}: reading it needs safetensors: pip install 'nmt[marian]'") from None
    except Exception as exc:  # both readers fail in many ways on damaged bytes; all mean the same here
        raise NmtError(f"{path}: corrupt or truncated weights ({type(exc).__name__})") from None
    if not isinstance(weights, dict):
        raise NmtError(f"{path}: not a state dict")
    return {key.removeprefix("model."): value.float() for key, value in weights.items()}


def languages_of(tokenizer_config: dict[str, Any], name: str) -> tuple[str, str] | None:
    """Language codes from tokenizer_config.json (source_lang, target_lang), else from an opus-mt-xx-yy name."""
    pair = tokenizer_config.get("source_lang"), tokenizer_config.get("target_lang")
    if not all(isinstance(code, str) and LANGUAGE.fullmatch(code) for code in pair):
        found = re.search(r"opus-mt-([a-z]{2,3})-([a-z]{2,3})$", name.rstrip("/"))
        pair = found.groups() if found else (None, None)
    return (str(pair[0]), str(pair[1])) if pair[0] and pair[1] else None


def nmt_table(pieces: list[str]) -> list[str]:
    """nmt's id table: <pad>, <unk>, <s>, </s>, then Marian's other pieces in Marian's order."""
    return [PAD_PIECE, UNK_PIECE, BOS_PIECE, EOS_PIECE,
            *(piece for piece in pieces if piece not in (PAD_PIECE, UNK_PIECE, EOS_PIECE))]


def rows(pieces: list[str]) -> Tensor:
    """For each nmt id, the Marian id whose row it takes (<s> takes <pad>'s, the decoder's start)."""
    index = {piece: i for i, piece in enumerate(pieces)}
    table = nmt_table(pieces)
    return torch.tensor([index[PAD_PIECE] if piece == BOS_PIECE else index[piece] for piece in table])


def model_config(marian: MarianFolder) -> ModelConfig:
    c = marian.config
    separate = not c.get("share_encoder_decoder_embeddings", True)
    return ModelConfig(
        arch="transformer", src_vocab_size=len(marian.src_vocab) + 1, tgt_vocab_size=len(marian.tgt_vocab) + 1,
        joint_vocab=not separate, share_embeddings=not separate, tie_output=c.get("tie_word_embeddings", True),
        enc_layers=c["encoder_layers"], dec_layers=c["decoder_layers"], d_model=c["d_model"],
        heads=c["encoder_attention_heads"], ffn_dim=c["encoder_ffn_dim"], dropout=float(c.get("dropout", 0.1)),
        attention_dropout=float(c.get("attention_dropout", 0.0)),
        activation_dropout=float(c.get("activation_dropout", 0.0)),
        activation=ACTIVATIONS[c.get("activation_function", "swish")], norm="post", positions="sinusoidal",
        position_layout="concatenated", output_bias=True, max_positions=c["max_position_embeddings"],
    )


def decode_defaults(generation: dict[str, Any]) -> DecodeConfig:
    """generation_config.json's search as nmt's: its beam, and its length penalty (length ** alpha)."""
    return DecodeConfig(beam=int(generation.get("num_beams") or 1), length_penalty="average",
                        alpha=float(generation.get("length_penalty", 1.0)))


def nmt_state(marian: MarianFolder, model: ModelConfig) -> dict[str, Tensor]:
    """nmt's state dict: Hugging Face's tensors renamed, Q/K/V fused, vocabulary rows permuted."""
    weights, state = marian.weights, {}
    src_rows, tgt_rows = rows(marian.src_vocab), rows(marian.tgt_vocab)
    source = tensor(marian, "encoder.embed_tokens.weight", "shared.weight")
    state["embed.src.weight"] = source[src_rows]
    state["embed.tgt.weight"] = (state["embed.src.weight"] if model.share_embeddings  # one tensor, as nmt's are
                                 else tensor(marian, "decoder.embed_tokens.weight", "shared.weight")[tgt_rows])
    state["output.weight"] = (state["embed.tgt.weight"] if model.tie_output
                              else tensor(marian, "lm_head.weight")[tgt_rows])
    bias = weights.get("final_logits_bias", torch.zeros(1, len(marian.tgt_vocab))).reshape(-1)
    state["output.bias"] = bias[tgt_rows].index_fill(0, torch.tensor([BOS_ID]), float("-inf"))
    for i in range(model.enc_layers):
        hf, ours = f"encoder.layers.{i}.", f"encoder.{i}."
        state.update(attention(marian, hf + "self_attn.", ours + "attn.", fused=("qkv",)))
        state.update(feed_forward(marian, hf, ours))
        state.update(layer_norm(marian, hf + "self_attn_layer_norm", ours + "res_attn.norm"))
    for i in range(model.dec_layers):
        hf, ours = f"decoder.layers.{i}.", f"decoder.{i}."
        state.update(attention(marian, hf + "self_attn.", ours + "self_attn.", fused=("qkv",)))
        state.update(layer_norm(marian, hf + "self_attn_layer_norm", ours + "res_self.norm"))
        state.update(attention(marian, hf + "encoder_attn.", ours + "cross_attn.", fused=("q", "kv")))
        state.update(layer_norm(marian, hf + "encoder_attn_layer_norm", ours + "res_cross.norm"))
        state.update(feed_forward(marian, hf, ours))
    return state


def tensor(marian: MarianFolder, *names: str) -> Tensor:
    """The first of `names` the weights hold (tied tensors are saved under one of their names)."""
    for name in names:
        if name in marian.weights:
            return marian.weights[name]
    raise NmtError(f"{marian.folder}: the weights have no {names[0]}")


def attention(marian: MarianFolder, hf: str, ours: str, fused: tuple[str, ...]) -> dict[str, Tensor]:
    """q/k/v/out projections into nmt's fused ones: `qkv`, or `q` and `kv` (CrossAttention)."""
    parts = {"q": ["q_proj"], "kv": ["k_proj", "v_proj"], "qkv": ["q_proj", "k_proj", "v_proj"]}
    state = {}
    for kind in ("weight", "bias"):
        for name in fused:
            state[f"{ours}{name}.{kind}"] = torch.cat([tensor(marian, f"{hf}{p}.{kind}") for p in parts[name]])
        state[f"{ours}out.{kind}"] = tensor(marian, f"{hf}out_proj.{kind}")
    return state


def feed_forward(marian: MarianFolder, hf: str, ours: str) -> dict[str, Tensor]:
    state = {f"{ours}ffn.{index}.{kind}": tensor(marian, f"{hf}{name}.{kind}")
             for index, name in ((0, "fc1"), (3, "fc2")) for kind in ("weight", "bias")}
    return state | layer_norm(marian, hf + "final_layer_norm", ours + "res_ffn.norm")


def layer_norm(marian: MarianFolder, hf: str, ours: str) -> dict[str, Tensor]:
    return {f"{ours}.{kind}": tensor(marian, f"{hf}.{kind}") for kind in ("weight", "bias")}
