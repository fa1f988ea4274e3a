"""One self-contained checkpoint file: weights, resolved config, tokenizers, training state.

`nmt translate -m model.pt` needs nothing else. Files load with
`torch.load(weights_only=True)`, so opening a checkpoint never runs code from it,
and are written to a temporary name and renamed, so a crash never leaves a
truncated file under the real name.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from nmt import __version__
from nmt.config import Config, from_dict, to_dict
from nmt.data.sources import language_code
from nmt.errors import NmtError
from nmt.io import atomic_path
from nmt.tokenizer import Tokenizer

FORMAT = "nmt-checkpoint"
ZIP_MAGIC = b"PK\x03\x04"
FORMAT_VERSION = 2  # 2: RNN embeddings are read through a sqrt(dim) scale; format-1 Transformers are unchanged


@dataclass
class Checkpoint:
    """What a checkpoint holds; `train_state` is None in an inference-only export."""

    config: Config
    model_state: dict[str, torch.Tensor]
    src_tokenizer: Tokenizer
    tgt_tokenizer: Tokenizer
    train_state: dict[str, Any] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    languages: tuple[str, str] | None = None  # source and target codes from `nmt prepare`, where it knew them

    def to_bytes(self) -> bytes:
        """Serialise once; the trainer writes the same bytes to several files."""
        joint = self.src_tokenizer == self.tgt_tokenizer
        tables = (self.src_tokenizer.vocabulary, self.tgt_tokenizer.vocabulary)
        payload = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "nmt_version": __version__,
            "config": to_dict(self.config),
            "model": self.model_state,
            "tokenizers": {
                "src": self.src_tokenizer.model_bytes,
                "tgt": None if joint else self.tgt_tokenizer.model_bytes,
                "normalization": self.src_tokenizer.normalization,
                # imported models' id tables (nmt.tokenizer); absent from every other checkpoint
                **({"vocabularies": [list(t) if t else None for t in tables]} if any(tables) else {}),
            },
            "train_state": self.train_state,
            "metrics": self.metrics,
            "languages": list(self.languages) if self.languages else None,
        }
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        return buffer.getvalue()

    def save(self, path: Path) -> None:
        write_bytes_atomic(Path(path), self.to_bytes())



def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint, turning every way a file can be wrong into one NmtError line."""
    path = Path(path)
    if path.is_dir():
        raise NmtError(_directory_message(path))
    if not path.is_file():
        raise NmtError(f"{path}: no such checkpoint")
    if not is_checkpoint_file(path):
        raise NmtError(f"{path}: not an nmt checkpoint (not a file written by nmt train or nmt average)")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch.load fails in many ways on damaged bytes; all mean the same here
        raise NmtError(f"{path}: corrupt or truncated checkpoint ({_first_words(exc)})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise NmtError(f"{path}: not an nmt checkpoint")
    version = payload.get("version")
    if version not in (1, FORMAT_VERSION):
        raise NmtError(
            f"{path}: checkpoint format version {version} is not supported by nmt "
            f"{__version__} (expects {FORMAT_VERSION})"
        )
    if version == 1 and payload.get("config", {}).get("model", {}).get("arch") == "rnn":
        raise NmtError(
            f"{path}: an RNN checkpoint of format 1, from before RNN embeddings were scaled; "
            f"nmt {__version__} would translate it wrongly, so retrain it"
        )
    try:
        tokenizers = payload["tokenizers"]
        src_table, tgt_table = tokenizers.get("vocabularies") or (None, None)
        src = Tokenizer(tokenizers["src"], tokenizers["normalization"], src_table)
        tgt = (src if tokenizers["tgt"] is None
               else Tokenizer(tokenizers["tgt"], tokenizers["normalization"], tgt_table))
        return Checkpoint(
            config=from_dict(payload["config"]),
            model_state=payload["model"],
            src_tokenizer=src,
            tgt_tokenizer=tgt,
            train_state=payload.get("train_state"),
            metrics=payload.get("metrics") or {},
            languages=stored_languages(payload.get("languages")),
        )
    except KeyError as exc:
        raise NmtError(f"{path}: incomplete checkpoint (no {exc})") from None
    except NmtError as exc:
        raise NmtError(f"{path}: {exc}") from None


def average_checkpoints(paths: list[Path]) -> Checkpoint:
    """Average the parameters of several checkpoints of one run (Vaswani et al. 2017).

    The result carries the config and tokenizers of the last file and no training state.
    """
    if not paths:
        raise NmtError("no checkpoints to average")
    checkpoints = [load_checkpoint(p) for p in paths]
    last = checkpoints[-1]
    for path, ckpt in zip(paths, checkpoints, strict=True):
        if (
            ckpt.config.model != last.config.model
            or ckpt.src_tokenizer != last.src_tokenizer
            or ckpt.tgt_tokenizer != last.tgt_tokenizer
            or ckpt.model_state.keys() != last.model_state.keys()
            or any(ckpt.model_state[k].shape != v.shape for k, v in last.model_state.items())
        ):
            raise NmtError(
                f"{path}: model or tokenizer differs from {paths[-1]}; only checkpoints of one model can be averaged"
            )
    averaged: dict[str, torch.Tensor] = {}
    for key, value in last.model_state.items():
        if value.is_floating_point():
            total = torch.stack([c.model_state[key].double() for c in checkpoints]).mean(0)
            averaged[key] = total.to(value.dtype)
        else:
            averaged[key] = value.clone()
    return replace(last, model_state=averaged, train_state=None, metrics={})


def is_checkpoint_file(path: Path) -> bool:
    """A regular file that begins as torch.save's zip archives do (checked before anything reads it as text)."""
    if not Path(path).is_file():
        return False
    with open(path, "rb") as handle:
        return handle.read(4) == ZIP_MAGIC


def _directory_message(path: Path) -> str:
    """What a folder given as a checkpoint is, and what to give instead."""
    from nmt.export import MANIFEST  # imported here: export is built on this module

    if (path / MANIFEST).is_file():
        return (f"{path}: a CTranslate2 export folder (from nmt export), not a checkpoint: translate it with "
                f"--engine ctranslate2; the nmt engine, average and attention need the checkpoint it came from")
    return (f"{path}: a directory, not a checkpoint file (a training run keeps {path / 'best.pt'} and update_*.pt; "
            f"nmt average {path} --last N averages the last N of those)")


def stored_languages(stored: Any) -> tuple[str, str] | None:
    """Stored [source, target] codes (a checkpoint's or an export's), checked as --pair's are;
    None in files from before they were stored."""
    if stored is None:
        return None
    if not (isinstance(stored, (list, tuple)) and len(stored) == 2 and all(isinstance(c, str) for c in stored)):
        raise NmtError(f"languages must be [source, target] language codes, as [\"en\", \"de\"], got {stored!r}")
    return language_code(stored[0], "the source language"), language_code(stored[1], "the target language")


def _first_words(exc: Exception) -> str:
    """torch's message, without terminal colour codes, cut at a word: one readable clause."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return first if len(first) <= 100 else first[:100].rsplit(" ", 1)[0] + " ..."
