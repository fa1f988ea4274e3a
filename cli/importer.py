"""`nmt import`: a pretrained MarianMT (OPUS-MT) model as one nmt checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import err_console, handle_errors, summary_table
from nmt.errors import NmtError
from nmt.importers import import_marian


@handle_errors
def import_model(
    source: Annotated[str, typer.Argument(
        help="A folder in Hugging Face's MarianMT layout, or a hub model id such as Helsinki-NLP/opus-mt-en-de.",
        show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="The nmt checkpoint to write.")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing file.")] = False,
) -> None:
    """Import an OPUS-MT / MarianMT model: translate, fine-tune (nmt train --init-from), export or serve it."""
    if output.exists() and not overwrite:
        raise NmtError(f"{output}: already exists (--overwrite replaces it)")
    checkpoint = import_marian(source)
    checkpoint.save(output)
    model = checkpoint.config.model
    languages = checkpoint.languages
    err_console.print(summary_table("Imported model", [
        ("source", source), ("checkpoint", str(output)),
        ("model", f"Transformer {model.enc_layers}+{model.dec_layers} layers, d {model.d_model}, "
                  f"FFN {model.ffn_dim}, {model.heads} heads, {model.activation}"),
        ("vocabulary", f"{model.src_vocab_size:,}" + ("" if model.joint_vocab else f" / {model.tgt_vocab_size:,}")
         + (" (shared)" if model.joint_vocab else " (one per side)")),
        ("languages", f"{languages[0]} -> {languages[1]}" if languages else "unknown"),
        ("decoding", f"beam {checkpoint.config.decode.beam}, length penalty len ** {checkpoint.config.decode.alpha}"),
        ("fine-tune", f"nmt prepare --tokenizer-from {output} ...; nmt train --init-from {output} ..."),
    ]))
