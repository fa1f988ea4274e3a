"""An imported tokenizer's id table as a file beside its SentencePiece model (nmt.tokenizer says why it exists).

Data folders (`nmt prepare`) and export folders (`nmt export`) store each SentencePiece
model as a file; an imported model's id table goes next to it as a JSON list of pieces.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from nmt.errors import NmtError


def vocabulary_file(model_file: str) -> str:
    """Where an imported tokenizer's id table goes beside its SentencePiece model (spm.model -> spm.vocab.json)."""
    return f"{Path(model_file).stem}.vocab.json"


def write_table(path: Path, vocabulary: Sequence[str]) -> None:
    """An id table as a file: a JSON list of pieces, in id order."""
    Path(path).write_text(json.dumps(list(vocabulary), ensure_ascii=False), encoding="utf-8")


def read_table(path: Path) -> list[str]:
    """An id table written by `write_table`."""
    try:
        table = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NmtError(f"{path}: no such id table") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NmtError(f"{path}: damaged id table ({exc})") from None
    if not isinstance(table, list) or not all(isinstance(piece, str) for piece in table):
        raise NmtError(f"{path}: an id table must be a JSON list of pieces")
    return table
