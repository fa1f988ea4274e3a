"""`nmt export`: a Transformer checkpoint as a CTranslate2 folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import err_console, handle_errors, summary_table
from nmt.export import QUANTIZATIONS, export_checkpoint


@handle_errors
def export(
    checkpoint: Annotated[Path, typer.Argument(
        help="Transformer checkpoint (from nmt train or nmt average).", show_default=False)],
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="Folder to write (refused if it exists, unless --overwrite).")],
    format: Annotated[str, typer.Option(
        "--format", help="ctranslate2: CTranslate2's folder, with the tokenizers and nmt.json.")] = "ctranslate2",
    quantize: Annotated[str, typer.Option(
        help=f"Weights stored as {', '.join(QUANTIZATIONS)} (CTranslate2 can compute in another type).")] = "none",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier export.")] = False,
) -> None:
    """Export a Transformer for CTranslate2; translate with it: nmt translate --engine ctranslate2 -m FOLDER."""
    folder = export_checkpoint(checkpoint, output, format=format, quantize=quantize, overwrite=overwrite)
    size = sum(path.stat().st_size for path in folder.iterdir())
    err_console.print(summary_table("Export", [
        ("checkpoint", str(checkpoint)), ("folder", str(folder)), ("format", format),
        ("weights", "float32" if quantize == "none" else quantize), ("size", f"{size / 2**20:.1f} MiB"),
        ("translate", f"nmt translate --engine ctranslate2 -m {folder}"),
    ]))
