"""The language pairs `nmt serve` serves: one per model, from `--pair` or the codes its checkpoint stores."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from nmt.checkpoint import load_checkpoint
from nmt.data.sources import LANGUAGE_CODE
from nmt.errors import NmtError

LANGUAGE_NAMES = dict(pair.split(":") for pair in (
    "ar:Arabic bg:Bulgarian ca:Catalan cs:Czech da:Danish de:German el:Greek en:English es:Spanish et:Estonian "
    "fa:Persian fi:Finnish fr:French ga:Irish he:Hebrew hi:Hindi hu:Hungarian id:Indonesian it:Italian ja:Japanese "
    "ko:Korean lt:Lithuanian lv:Latvian nl:Dutch no:Norwegian pl:Polish pt:Portuguese ro:Romanian ru:Russian "
    "sk:Slovak sl:Slovenian sv:Swedish th:Thai tr:Turkish uk:Ukrainian vi:Vietnamese zh:Chinese").split())



@dataclass(frozen=True)
class Pair:
    source: str
    target: str

    def __str__(self) -> str:
        return f"{self.source}-{self.target}"


def parse_pair(text: str) -> Pair:
    """'en-de' -> Pair('en', 'de')."""
    parts = text.split("-")
    if len(parts) != 2 or not all(LANGUAGE_CODE.fullmatch(part) for part in parts):
        raise NmtError(f"--pair must look like en-de (source-target language codes), got {text!r}")
    return Pair(parts[0], parts[1])


def stored_pair(path: Path) -> Pair | None:
    """The language codes `nmt prepare` stored, carried by the checkpoint (or the export's nmt.json)."""
    if path.is_dir():
        from nmt.export import ExportedModel  # only the manifest: ctranslate2 is not needed to read it

        languages = ExportedModel(path).languages
    else:
        languages = load_checkpoint(path).languages
    return Pair(*languages) if languages else None


def resolve_pairs(models: Sequence[Path], pairs: Sequence[str],
                  stored: Callable[[Path], Pair | None] = stored_pair) -> list[Pair]:
    """One pair per model: `--pair` in order, else the checkpoint's own codes; each pair served once."""
    if pairs and len(pairs) != len(models):
        raise NmtError(f"give one --pair per --model: {len(models)} model(s), {len(pairs)} pair(s)")
    found = [parse_pair(p) for p in pairs] if pairs else [stored(path) for path in models]
    for path, pair in zip(models, found, strict=True):
        if pair is None:
            raise NmtError(f"{path} stores no language codes; say which pair it serves with --pair src-tgt")
    resolved = [pair for pair in found if pair is not None]
    if len(set(resolved)) != len(resolved):
        raise NmtError(f"each language pair can be served by one model only, got {', '.join(map(str, resolved))}")
    return resolved
