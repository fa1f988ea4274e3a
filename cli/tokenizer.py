"""`nmt tokenizer`: train a SentencePiece model, joint or one per side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import console, handle_errors, reporting, summary_table
from nmt.errors import NmtError
from nmt.tokenizer import MODEL_TYPES, NORMALIZATIONS, TrainingSummary, parse_vocab_size, train_sentencepiece


@handle_errors
def tokenizer(
    inputs: Annotated[list[Path], typer.Argument(
        help="Text files to train on (plain or .gz), e.g. train.en train.de.", show_default=False)],
    prefix: Annotated[Path, typer.Option(
        "--prefix", "-o", help="Output prefix: writes PREFIX.model and PREFIX.vocab.")],
    vocab_size: Annotated[str, typer.Option(
        help="Vocabulary size, special tokens included; auto: chosen from the sentences per input file "
             "(pairs, with one file per side: 5,000 at 5k, +2,500 per doubling), the reason printed.")] = "auto",
    model_type: Annotated[str, typer.Option(help=f"Segmentation algorithm: {' or '.join(MODEL_TYPES)}.")] = "bpe",
    character_coverage: Annotated[float, typer.Option(
        help="Share of characters covered; 1.0 for alphabetic scripts, 0.9995 for CJK.")] = 1.0,
    separate: Annotated[bool, typer.Option(
        "--separate", help="One model per side instead of one joint model: the first half of INPUTS is the source, "
                           "the second half the target; writes PREFIX.src.model and PREFIX.tgt.model.")] = False,
    sample: Annotated[int, typer.Option(
        help="Train on a seeded random sample of this many sentences (0 = all), for large corpora.")] = 0,
    symbols: Annotated[list[str] | None, typer.Option(
        "--symbol", help="A user-defined symbol never split (repeatable), e.g. a language tag <2de>.")] = None,
    normalization: Annotated[str, typer.Option(
        help=f"Unicode normalisation applied before training and encoding: {', '.join(NORMALIZATIONS)}.")] = "NFC",
    byte_fallback: Annotated[bool, typer.Option(
        help="Spell unseen characters as UTF-8 bytes instead of <unk>.")] = True,
    seed: Annotated[int, typer.Option(help="Seed for sentence sampling.")] = 1,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing PREFIX.model.")] = False,
) -> None:
    """Train a SentencePiece tokenizer (BPE or unigram), joint or one per side."""
    size = parse_vocab_size(vocab_size)
    if separate and len(inputs) % 2:
        raise NmtError("--separate needs an even number of inputs: source files first, then as many target files")
    groups = [(prefix, inputs)]
    if separate:
        half = len(inputs) // 2
        groups = [(Path(f"{prefix}.src"), inputs[:half]), (Path(f"{prefix}.tgt"), inputs[half:])]
    summaries: list[TrainingSummary] = []
    with reporting() as reporter:
        for out_prefix, files in groups:
            summaries.append(
                train_sentencepiece(
                    files,
                    out_prefix,
                    vocab_size=size,
                    model_type=model_type,
                    character_coverage=character_coverage,
                    sample_size=sample,
                    user_defined_symbols=symbols or (),
                    normalization=normalization,
                    byte_fallback=byte_fallback,
                    seed=seed,
                    overwrite=overwrite,
                    reporter=reporter,
                )
            )
    for summary in summaries:
        console.print(
            summary_table(
                f"SentencePiece model {summary.model}",
                [
                    ("inputs", ", ".join(str(p) for p in summary.inputs)),
                    ("model type", summary.model_type),
                    ("vocabulary size", f"auto: {summary.vocab_reason}" if summary.vocab_reason
                     else summary.vocab_size),
                    ("character coverage", f"{summary.character_coverage:g}"),
                    ("sentences read", summary.sentences_read),
                    ("sentences used", summary.sentences_used),
                    ("time", f"{summary.seconds:.1f} s"),
                    ("files", f"{summary.model}, {summary.vocab}"),
                ],
            )
        )
