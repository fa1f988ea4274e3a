"""`nmt attention`: cross-attention heatmaps of translations (PNG per sentence and one HTML page)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from cli.common import console, handle_errors, reporting, summary_table
from cli.translate import build_translator, warn
from nmt.attention import attention_maps
from nmt.errors import NmtError
from nmt.io import LineStream, check_output_dir, read_lines
from nmt.plot import ATTENTION_FOLDER, figure_class, write_attention


def _read_inputs(input: Path | None) -> list[str]:
    if input is not None:
        return list(read_lines(input))
    if sys.stdin.isatty():
        raise NmtError("no --input given and stdin is a terminal: pass --input FILE or pipe sentences in")
    return list(LineStream(sys.stdin.buffer, name="stdin"))


@handle_errors
def attention(
    model: Annotated[Path, typer.Option("--model", "-m", help="Checkpoint file (from nmt train or nmt average).")],
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="Directory to write: index.html and line_N.png "
                               "(refused if it exists, unless --overwrite).")],
    input: Annotated[Path | None, typer.Option(
        "--input", "-i", help="Sentences, one per line; default: standard input.")] = None,
    heads: Annotated[bool, typer.Option(
        "--heads", help="Also draw each attention head (Transformer), not only their average per layer.")] = False,
    png: Annotated[bool, typer.Option(
        "--png/--no-png", help="Draw a PNG per sentence (needs matplotlib) besides the HTML page.")] = True,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier attention directory.")] = False,
    beam: Annotated[int | None, typer.Option(help="Beam size; 1 is greedy search.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    threads: Annotated[int, typer.Option(help="CPU threads (0 = all cores).")] = 0,
) -> None:
    """Translate sentences and draw which source pieces each output piece attended to."""
    if png:
        try:
            figure_class()
        except NmtError as exc:
            raise NmtError(f"{exc} (or --no-png for the HTML page alone)") from None
    check_output_dir(output, overwrite, kind=ATTENTION_FOLDER,  # before the translation, not after it
                     reading=[model] if input is None else [model, input])
    texts = _read_inputs(input)
    translator = build_translator(model, threads, beam=beam, device=device, precision="fp32")
    if heads and translator.checkpoint.config.model.arch != "transformer":
        raise NmtError("--heads needs a Transformer: an RNN model has a single attention")
    with reporting() as reporter:
        maps = attention_maps(translator, texts, heads=heads, reporter=reporter)
        files = write_attention(maps, output, png=png, overwrite=overwrite, reporter=reporter)
    for amap in maps:
        if amap.warning:
            warn(amap.warning)
    layers = maps[0].weights.size(0) if maps else 0
    console.print(summary_table("Attention", [
        ("sentences", len(maps)), ("layers", layers), ("heads", "each, and averaged" if heads else "averaged"),
        ("page", str(files[0])), ("pictures", f"{len(files) - 1} PNG in {output}" if png else "none (--no-png)"),
    ]))
