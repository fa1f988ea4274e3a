"""nmt checkpoint -> CTranslate2 folder, for every Transformer nmt trains.

The folder is what CTranslate2 loads (`model.bin`, `config.json`, the vocabularies) plus
what nmt needs to translate exactly as its own translator does: the SentencePiece models
(copied byte for byte), and `nmt.json` with the normalisation and the decoding defaults,
so the folder describes itself. The mapping onto `TransformerSpec` follows CTranslate2's
own fairseq and OpenNMT-py converters; the parts where nmt differs from their defaults:

- positions: nmt's table is passed as the model's position encodings (nmt's sinusoids
  interleave sin and cos, CTranslate2 would generate its own concatenated layout; imported
  Marian models use the concatenated one, passed the same way);
- swish (Marian's activation) and the output bias map as in CTranslate2's Marian converter;
- embeddings are scaled by sqrt(d_model), which is CTranslate2's `scale_embeddings`;
- the source ends with EOS and the target starts with BOS, exactly as `encode_source` and
  the search do; the vocabularies are the SentencePiece pieces in id order, so every
  id means the same token in both engines (<pad>, <unk>, <s>, </s> at 0-3).

`ctranslate2` is an optional extra, imported only here and in `nmt.engines`.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from nmt import __version__
from nmt.checkpoint import Checkpoint, load_checkpoint, stored_languages
from nmt.config import DecodeConfig, ModelConfig, from_dict, validate_model
from nmt.errors import NmtError
from nmt.id_table import read_table, vocabulary_file, write_table
from nmt.io import OutputFolder, atomic_dir, check_output_dir, read_json
from nmt.models.transformer import sinusoids
from nmt.search import check_options
from nmt.tokenizer import BOS_PIECE, EOS_PIECE, NORMALIZATIONS, UNK_PIECE, Tokenizer

FORMATS = ("ctranslate2",)
QUANTIZATIONS = ("none", "int8", "int16", "float16")
MANIFEST = "nmt.json"
MANIFEST_FORMAT = "nmt-ctranslate2"
MANIFEST_VERSION = 1
VOCABULARY_BYTES = 64 << 20  # CTranslate2's vocabulary files: about 20 bytes a piece
SPEC_NAME_BYTES = 64
LAYER_NORM_EPSILON = 1e-5  # torch.nn.LayerNorm's default, which every nmt LayerNorm uses
INSTALL_HINT = "CTranslate2 is not installed; install it with: pip install 'nmt[ct2]'"
TOKENIZER_FILES = ("spm.model", "src.model", "tgt.model")
WRITTEN = {"model.bin", "config.json", MANIFEST, *TOKENIZER_FILES, *map(vocabulary_file, TOKENIZER_FILES),
           *(f"{side}_vocabulary.{ext}" for side in ("shared", "source", "target") for ext in ("json", "txt"))}


def _is_manifest(path: Path) -> bool:
    try:
        manifest = read_json(path)
    except NmtError:
        return False
    return isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT


EXPORT_FOLDER = OutputFolder("nmt export", MANIFEST, WRITTEN.__contains__, _is_manifest)


def require_ctranslate2() -> ModuleType:
    """Import ctranslate2, or say in one line how to install it."""
    try:
        import ctranslate2
    except ImportError:
        raise NmtError(INSTALL_HINT) from None
    return ctranslate2


def export_checkpoint(checkpoint_path: Path, output: Path, *, format: str = "ctranslate2", quantize: str = "none",
                      overwrite: bool = False) -> Path:
    """Write the CTranslate2 folder of a Transformer checkpoint; the folder is renamed into place
    when complete (nmt.io.atomic_dir), so its files appear all at once or not at all."""
    if format not in FORMATS:
        raise NmtError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if quantize not in QUANTIZATIONS:
        raise NmtError(f"unknown quantization {quantize!r}; choose one of {', '.join(QUANTIZATIONS)}")
    checkpoint = load_checkpoint(checkpoint_path)
    if checkpoint.config.model.arch != "transformer":
        raise NmtError(f"{checkpoint_path}: an {checkpoint.config.model.arch.upper()} checkpoint; CTranslate2 has no "
                       "recurrent models, so only Transformers can be exported")
    check_output_dir(output, overwrite, kind=EXPORT_FOLDER, reading=[checkpoint_path])  # before the slow part
    ctranslate2 = require_ctranslate2()
    spec = transformer_spec(ctranslate2, checkpoint)
    spec.validate()
    spec.optimize(quantization=None if quantize == "none" else quantize)
    with atomic_dir(output, overwrite, kind=EXPORT_FOLDER, reading=[checkpoint_path]) as tmp:
        spec.save(str(tmp))
        files = write_tokenizers(tmp, checkpoint)
        manifest = manifest_of(checkpoint, files, quantize)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return output


def transformer_spec(ctranslate2: ModuleType, checkpoint: Checkpoint) -> Any:
    """The `TransformerSpec` holding the checkpoint's weights (float32 numpy arrays)."""
    specs = ctranslate2.specs
    config = checkpoint.config.model
    weights = {name: value.detach().float().cpu().numpy() for name, value in checkpoint.model_state.items()}
    activation = {"relu": specs.Activation.RELU, "gelu": specs.Activation.GELU,
                  "swish": specs.Activation.SWISH}[config.activation]
    spec = specs.TransformerSpec.from_config((config.enc_layers, config.dec_layers), config.heads,
                                             pre_norm=config.norm == "pre", activation=activation)
    positions = (weights["learned_positions.weight"] if config.positions == "learned"
                 else sinusoids(config.max_positions, config.d_model, config.position_layout).numpy())
    encoder, decoder = spec.encoder, spec.decoder
    encoder.embeddings[0].weight = weights["embed.src.weight"]
    decoder.embeddings.weight = weights["embed.tgt.weight"]
    for stack in (encoder, decoder):
        stack.scale_embeddings = True  # nmt reads embeddings through sqrt(d_model)
        stack.position_encodings.encodings = positions
    decoder.projection.weight = weights["output.weight"]
    if config.output_bias:  # -inf entries included: CTranslate2 then never produces those tokens either
        decoder.projection.bias = weights["output.bias"]
    for i, layer in enumerate(encoder.layer):
        prefix = f"encoder.{i}."
        set_attention(layer.self_attention, weights, prefix + "attn.", ["qkv"], prefix + "res_attn.norm")
        set_ffn(layer.ffn, weights, prefix)
    for i, layer in enumerate(decoder.layer):
        prefix = f"decoder.{i}."
        set_attention(layer.self_attention, weights, prefix + "self_attn.", ["qkv"], prefix + "res_self.norm")
        set_attention(layer.attention, weights, prefix + "cross_attn.", ["q", "kv"], prefix + "res_cross.norm")
        set_ffn(layer.ffn, weights, prefix)
    if config.norm == "pre":
        set_layer_norm(encoder.layer_norm, weights, "encoder_norm")
        set_layer_norm(decoder.layer_norm, weights, "decoder_norm")
    spec.config.unk_token, spec.config.bos_token, spec.config.eos_token = UNK_PIECE, BOS_PIECE, EOS_PIECE
    spec.config.decoder_start_token = BOS_PIECE  # nmt's decoder starts from BOS ...
    spec.config.add_source_eos = True  # ... and reads the source followed by EOS (encode_source)
    spec.config.layer_norm_epsilon = LAYER_NORM_EPSILON
    spec.register_source_vocabulary(pieces(checkpoint.src_tokenizer))
    spec.register_target_vocabulary(pieces(checkpoint.tgt_tokenizer))
    return spec


def set_attention(spec: Any, weights: dict[str, np.ndarray], prefix: str, projections: list[str], norm: str) -> None:
    """nmt's fused projections are CTranslate2's layout already: Q|K|V (self) or Q, then K|V (cross), then out."""
    for linear, name in zip(spec.linear, [*projections, "out"], strict=True):
        set_linear(linear, weights, prefix + name)
    set_layer_norm(spec.layer_norm, weights, norm)


def set_ffn(spec: Any, weights: dict[str, np.ndarray], prefix: str) -> None:
    set_linear(spec.linear_0, weights, prefix + "ffn.0")
    set_linear(spec.linear_1, weights, prefix + "ffn.3")
    set_layer_norm(spec.layer_norm, weights, prefix + "res_ffn.norm")


def set_linear(spec: Any, weights: dict[str, np.ndarray], name: str) -> None:
    spec.weight = weights[f"{name}.weight"]
    spec.bias = weights[f"{name}.bias"]


def set_layer_norm(spec: Any, weights: dict[str, np.ndarray], name: str) -> None:
    spec.gamma = weights[f"{name}.weight"]
    spec.beta = weights[f"{name}.bias"]


def pieces(tokenizer: Tokenizer) -> list[str]:
    """The vocabulary in id order, so a CTranslate2 token is the nmt id of the same position."""
    return [tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size)]


def write_tokenizers(folder: Path, checkpoint: Checkpoint) -> dict[str, str]:
    """Copy the SentencePiece models (one file when the vocabulary is joint); their names by side."""
    joint = checkpoint.src_tokenizer == checkpoint.tgt_tokenizer
    names = {"src": "spm.model", "tgt": "spm.model"} if joint else {"src": "src.model", "tgt": "tgt.model"}
    for side, tokenizer in (("src", checkpoint.src_tokenizer), ("tgt", checkpoint.tgt_tokenizer)):
        (folder / names[side]).write_bytes(tokenizer.model_bytes)
        if tokenizer.vocabulary is not None:  # an imported model's id table, beside its SentencePiece model
            write_table(folder / vocabulary_file(names[side]), tokenizer.vocabulary)
    return names


def manifest_of(checkpoint: Checkpoint, tokenizers: dict[str, str], quantize: str) -> dict[str, Any]:
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "nmt_version": __version__,
        "engine": "ctranslate2",
        "quantization": quantize,
        "normalization": checkpoint.src_tokenizer.normalization,
        "languages": list(checkpoint.languages) if checkpoint.languages else None,
        "tokenizers": tokenizers,
        "max_positions": checkpoint.config.model.max_positions,
        "decode": asdict(checkpoint.config.decode),
        "model": asdict(checkpoint.config.model),
    }


class ExportedModel:
    """What `nmt.json` describes, checked once with its types and ranges: the tokenizers (whose pieces must be
    CTranslate2's vocabulary, in order), the decoding defaults, the model and its length limit, the languages."""

    def __init__(self, folder: Path) -> None:
        folder = Path(folder)
        path = folder / MANIFEST
        if not folder.is_dir():
            raise NmtError(f"{folder}: not a folder; CTranslate2 models are folders written by nmt export")
        if not path.is_file():
            raise NmtError(f"{folder}: no {MANIFEST}, so not a folder written by nmt export")
        manifest = read_json(path)
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            raise NmtError(f"{path}: not an nmt export manifest")
        if manifest.get("version") != MANIFEST_VERSION:
            raise NmtError(f"{path}: export format version {manifest.get('version')} is not supported by nmt "
                           f"{__version__} (expects {MANIFEST_VERSION}); export the checkpoint again")
        try:
            names = _tokenizer_names(manifest["tokenizers"])
            normalization = _choice("normalization", manifest["normalization"], NORMALIZATIONS)
            self.max_positions: int = _whole("max_positions", manifest["max_positions"], least=2)
            self.decode: DecodeConfig = from_dict({"decode": manifest["decode"]}).decode
            check_options(self.decode)
            self.model: ModelConfig = from_dict({"model": manifest["model"]}).model
            validate_model(self.model)
            self.languages = stored_languages(manifest.get("languages"))
        except KeyError as exc:
            raise NmtError(f"{path}: damaged manifest (no {exc})") from None
        except NmtError as exc:
            raise NmtError(f"{path}: {exc}") from None
        self.src_tokenizer = exported_tokenizer(folder, names["src"], normalization)
        self.tgt_tokenizer = exported_tokenizer(folder, names["tgt"], normalization)
        self.folder = folder
        for side, tokenizer in (("source", self.src_tokenizer), ("target", self.tgt_tokenizer)):
            check_vocabulary(folder, side, names["src" if side == "source" else "tgt"], pieces(tokenizer))


def _tokenizer_names(stored: Any) -> dict[str, str]:
    """The tokenizer file of each side: plain names of files in the folder."""
    if not (isinstance(stored, dict) and all(isinstance(stored.get(side), str) for side in ("src", "tgt"))):
        raise NmtError(f"tokenizers must name a file per side, as {{\"src\": \"spm.model\", ...}}, got {stored!r}")
    for name in (stored["src"], stored["tgt"]):
        if Path(name).name != name or name.startswith("."):
            raise NmtError(f"tokenizers must be file names in the folder, got {name!r}")
    return {"src": stored["src"], "tgt": stored["tgt"]}


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise NmtError(f"{key} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _whole(key: str, value: Any, least: int) -> int:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= least):
        raise NmtError(f"{key} must be a whole number of at least {least}, got {value!r}")
    return value


def check_vocabulary(folder: Path, side: str, tokenizer: str, expected: list[str]) -> None:
    """CTranslate2's vocabulary of one side is the tokenizer's pieces in id order; a tokenizer swapped for
    another would translate into the wrong words with exit 0."""
    names = ("shared_vocabulary.json", f"{side}_vocabulary.json")
    path = next((folder / name for name in names if (folder / name).is_file()), None)
    if path is None:
        raise NmtError(f"{folder}: no {side} vocabulary ({' or '.join(names)}); export the checkpoint again")
    found = read_json(path, max_bytes=VOCABULARY_BYTES)
    if found == expected:
        return
    if isinstance(found, list) and len(found) == len(expected):
        index = next(i for i, (a, b) in enumerate(zip(found, expected, strict=True)) if a != b)
        where = f"piece {index} is {expected[index]!r} against {found[index]!r}"
    else:
        where = f"{len(expected)} pieces against {len(found) if isinstance(found, list) else 'no list'}"
    raise NmtError(f"{folder}: {tokenizer} does not match CTranslate2's {path.name} ({where}); "
                   "the files do not belong together: export the checkpoint again")


def damaged_model_file(path: Path) -> bool:
    """True when `path` does not begin as CTranslate2 writes model.bin (a small version number, then the spec's
    name, such as TransformerSpec): damaged, not from a later CTranslate2."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(6 + SPEC_NAME_BYTES)
    except OSError:
        return False  # CTranslate2's own message says what is wrong
    if len(head) < 6:
        return True
    version, length = struct.unpack("<IH", head[:6])
    name = head[6:5 + length]
    return not (0 < version < 1000 and 1 < length <= SPEC_NAME_BYTES and name.isascii()
                and name.decode("ascii").isidentifier() and head[5 + length:6 + length] == b"\0")


def exported_tokenizer(folder: Path, name: str, normalization: str) -> Tokenizer:
    """A tokenizer of an export folder, with its id table where `write_tokenizers` wrote one."""
    table = folder / vocabulary_file(name)
    return Tokenizer.load(folder / name, normalization, read_table(table) if table.is_file() else None)
