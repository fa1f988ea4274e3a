"""`nmt prepare`: clean, encode and store parallel data for training, once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from cli.common import console, handle_errors, reporting, summary_table
from nmt.data import REASONS, CleanConfig, HubDataset, PairSource, Sources, TableFile, TextFiles, TokenizerTraining
from nmt.data import prepare as prepare_data
from nmt.data.prepare import checkpoint_tokenizers
from nmt.errors import NmtError
from nmt.tokenizer import MODEL_TYPES, NORMALIZATIONS, Tokenizer, parse_vocab_size

SOURCES = "Sources"
HUB = "Hugging Face datasets"
TOKENIZER = "Tokenizer"
CLEANING = "Cleaning"


def _split_source(name: str, src: Path | None, tgt: Path | None, table: Path | None, hub_split: str | None,
                  hub: dict[str, Any], fields: dict[str, str | None]) -> PairSource | None:
    """The one source a split is given by: two files, a table file, or a dataset split (or none)."""
    ways = [way for way, given in (("files", src or tgt), ("table", table), ("hub", hub_split)) if given]
    if len(ways) > 1:
        raise NmtError(f"give the {name} set one way: --{name}-src/--{name}-tgt, --{name} or --hf-{name}-split")
    if src or tgt:
        if not (src and tgt):
            raise NmtError(f"--{name}-src and --{name}-tgt go together")
        return TextFiles(src, tgt)
    if table:
        return TableFile(table, fields["src_field"] or fields["src_lang"], fields["tgt_field"] or fields["tgt_lang"])
    if hub_split:
        if not hub["name"]:
            raise NmtError(f"--hf-{name}-split needs --hf-dataset")
        return HubDataset(split=hub_split, **hub, **fields)
    return None


def _tokenizers(tokenizer: Path | None, src_tokenizer: Path | None, tgt_tokenizer: Path | None, train: bool,
                training: TokenizerTraining, normalization: str | None,
                tokenizer_from: Path | None) -> tuple[Tokenizer, Tokenizer] | TokenizerTraining:
    """The tokenizers given, read with `normalization` (default NFC; a checkpoint's come with theirs)."""
    ways = sum((tokenizer is not None, src_tokenizer is not None or tgt_tokenizer is not None, train,
                tokenizer_from is not None))
    if ways != 1:
        raise NmtError("choose the tokenizer one way: --tokenizer, --src-tokenizer with --tgt-tokenizer, "
                       "--train-tokenizer or --tokenizer-from")
    if train:
        return training
    if tokenizer_from is not None:
        return checkpoint_tokenizers(tokenizer_from, normalization)
    normalization = normalization or "NFC"
    if tokenizer is not None:
        joint = Tokenizer.load(tokenizer, normalization)
        return joint, joint
    if src_tokenizer is None or tgt_tokenizer is None:
        raise NmtError("--src-tokenizer and --tgt-tokenizer go together")
    return Tokenizer.load(src_tokenizer, normalization), Tokenizer.load(tgt_tokenizer, normalization)


@handle_errors
def prepare(
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="Output directory (refused if it exists, unless --overwrite).")],
    train_src: Annotated[Path | None, typer.Option(
        help="Training source text, one sentence per line (plain or .gz).", rich_help_panel=SOURCES)] = None,
    train_tgt: Annotated[Path | None, typer.Option(
        help="Training target text, aligned with --train-src.", rich_help_panel=SOURCES)] = None,
    train: Annotated[Path | None, typer.Option(
        help="Training pairs in one .tsv or .jsonl file (plain or .gz).", rich_help_panel=SOURCES)] = None,
    valid_src: Annotated[Path | None, typer.Option(help="Validation source text.", rich_help_panel=SOURCES)] = None,
    valid_tgt: Annotated[Path | None, typer.Option(help="Validation target text.", rich_help_panel=SOURCES)] = None,
    valid: Annotated[Path | None, typer.Option(
        help="Validation pairs in one .tsv or .jsonl file.", rich_help_panel=SOURCES)] = None,
    test_src: Annotated[Path | None, typer.Option(help="Test source text.", rich_help_panel=SOURCES)] = None,
    test_tgt: Annotated[Path | None, typer.Option(help="Test target text.", rich_help_panel=SOURCES)] = None,
    test: Annotated[Path | None, typer.Option(
        help="Test pairs in one .tsv or .jsonl file.", rich_help_panel=SOURCES)] = None,
    src_lang: Annotated[str | None, typer.Option(
        help="Source language code (en, pt_BR), stored with the data for `nmt serve` (default: the suffix of "
             "--train-src, as in train.en); also the key in a 'translation' dict and the default source field.",
        rich_help_panel=SOURCES)] = None,
    tgt_lang: Annotated[str | None, typer.Option(
        help="Target language code, as --src-lang.", rich_help_panel=SOURCES)] = None,
    src_field: Annotated[str | None, typer.Option(
        help="Source field: TSV column name (header) or number (no header, default 0); "
             "JSONL/dataset field, dotted for nesting (translation.en).", rich_help_panel=SOURCES)] = None,
    tgt_field: Annotated[str | None, typer.Option(
        help="Target field, as --src-field (TSV default column 1).", rich_help_panel=SOURCES)] = None,
    valid_size: Annotated[int, typer.Option(
        help="Carve this many random validation pairs out of the training source.", rich_help_panel=SOURCES)] = 0,
    test_size: Annotated[int, typer.Option(
        help="Carve this many random test pairs out of the training source.", rich_help_panel=SOURCES)] = 0,
    split_seed: Annotated[int, typer.Option(help="Seed for carving valid/test pairs.", rich_help_panel=SOURCES)] = 1,
    hf_dataset: Annotated[str | None, typer.Option(
        help="Hugging Face dataset name (hub or local path, or a loader such as "
             "json/csv/parquet with --hf-data-files).", rich_help_panel=HUB)] = None,
    hf_config: Annotated[str | None, typer.Option(
        help="Dataset configuration, e.g. de-en.", rich_help_panel=HUB)] = None,
    hf_data_files: Annotated[list[str] | None, typer.Option(
        help="Data files for a loader dataset (repeatable).", rich_help_panel=HUB)] = None,
    hf_train_split: Annotated[str, typer.Option(
        help="Dataset split for training (when no training files are given).", rich_help_panel=HUB)] = "train",
    hf_valid_split: Annotated[str | None, typer.Option(
        help="Dataset split for validation, e.g. validation.", rich_help_panel=HUB)] = None,
    hf_test_split: Annotated[str | None, typer.Option(
        help="Dataset split for testing, e.g. test.", rich_help_panel=HUB)] = None,
    streaming: Annotated[bool, typer.Option(
        "--streaming", help="Stream the dataset instead of downloading it whole (corpora larger than memory or disk).",
        rich_help_panel=HUB)] = False,
    hf_cache_dir: Annotated[Path | None, typer.Option(
        help="Cache directory for datasets (default: the datasets library's).", rich_help_panel=HUB)] = None,
    tokenizer: Annotated[Path | None, typer.Option(
        help="Joint SentencePiece model from `nmt tokenizer`.", rich_help_panel=TOKENIZER)] = None,
    src_tokenizer: Annotated[Path | None, typer.Option(
        help="Source-side model (with --tgt-tokenizer).", rich_help_panel=TOKENIZER)] = None,
    tgt_tokenizer: Annotated[Path | None, typer.Option(
        help="Target-side model (with --src-tokenizer).", rich_help_panel=TOKENIZER)] = None,
    train_tokenizer: Annotated[bool, typer.Option(
        "--train-tokenizer", help="Train a SentencePiece model on the cleaned training text instead.",
        rich_help_panel=TOKENIZER)] = False,
    vocab_size: Annotated[str, typer.Option(
        help="Vocabulary size for --train-tokenizer, or auto: chosen from the number of training pairs "
             "(5,000 at 5k pairs, +2,500 per doubling), the reason printed.", rich_help_panel=TOKENIZER)] = "auto",
    model_type: Annotated[str, typer.Option(
        help=f"Segmentation for --train-tokenizer: {' or '.join(MODEL_TYPES)}.", rich_help_panel=TOKENIZER)] = "bpe",
    tokenizer_from: Annotated[Path | None, typer.Option(
        help="A checkpoint (from nmt train or nmt import) whose tokenizers and normalisation encode the data, "
             "for nmt train --init-from it.", rich_help_panel=TOKENIZER)] = None,
    separate_vocab: Annotated[bool, typer.Option(
        "--separate-vocab", help="With --train-tokenizer: one model per side instead of a joint one.",
        rich_help_panel=TOKENIZER)] = False,
    normalization: Annotated[str | None, typer.Option(
        help="Unicode normalisation, stored with the data and reused at translation time: "
             f"{', '.join(NORMALIZATIONS)} (default: NFC, or the checkpoint's with --tokenizer-from).",
        show_default=False, rich_help_panel=CLEANING)] = None,
    max_len: Annotated[int, typer.Option(
        help="Drop training pairs with a side longer than this many subword tokens, BOS/EOS excluded (0 = no limit).",
        rich_help_panel=CLEANING)] = 250,
    max_ratio: Annotated[float, typer.Option(
        help="Drop training pairs whose longer side has more than this many times the "
             "tokens of the shorter (0 = no limit).", rich_help_panel=CLEANING)] = 3.0,
    dedup: Annotated[bool, typer.Option(
        help="Drop repeated training pairs and training pairs equal to a valid/test pair.",
        rich_help_panel=CLEANING)] = True,
    max_tokens: Annotated[int, typer.Option(
        help="Batch size in tokens for the padding estimate in the summary (as `train.max_tokens`).")] = 4096,
    threads: Annotated[int, typer.Option(help="Encoding threads (0 = all cores).")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing prepared directory.")] = False,
) -> None:
    """Clean, encode and store a parallel corpus as memory-mapped arrays for `nmt train`."""
    fields = {"src_lang": src_lang, "tgt_lang": tgt_lang, "src_field": src_field, "tgt_field": tgt_field}
    hub = {"name": hf_dataset, "config": hf_config, "data_files": hf_data_files, "streaming": streaming,
           "cache_dir": hf_cache_dir}
    tokenizers = _tokenizers(tokenizer, src_tokenizer, tgt_tokenizer, train_tokenizer,
                             TokenizerTraining(parse_vocab_size(vocab_size), model_type, separate_vocab),
                             normalization, tokenizer_from)
    if normalization is None:
        normalization = tokenizers[0].normalization if isinstance(tokenizers, tuple) else "NFC"
    clean = CleanConfig(normalization=normalization, max_len=max_len, max_ratio=max_ratio, dedup=dedup)
    if hf_dataset:
        import datasets
        import huggingface_hub

        datasets.disable_progress_bars()  # ours are drawn instead
        datasets.logging.set_verbosity_error()  # a failure is reported once, in our one line
        huggingface_hub.logging.set_verbosity_error()
    train_hub = hf_train_split if hf_dataset and not (train_src or train_tgt or train) else None
    train_source = _split_source("train", train_src, train_tgt, train, train_hub, hub, fields)
    if train_source is None:
        raise NmtError("no training data: give --train-src with --train-tgt, --train, or --hf-dataset")
    sources = Sources(
        train=train_source,
        valid=_split_source("valid", valid_src, valid_tgt, valid, hf_valid_split, hub, fields),
        test=_split_source("test", test_src, test_tgt, test, hf_test_split, hub, fields),
        carve={name: n for name, n in (("valid", valid_size), ("test", test_size)) if n},
        split_seed=split_seed,
        src_lang=src_lang,
        tgt_lang=tgt_lang,
    )
    with reporting() as reporter:
        data = prepare_data(out, sources, tokenizers, clean, overwrite=overwrite, max_tokens=max_tokens,
                            num_threads=threads, reporter=reporter)
    console.print(summary_table(f"Prepared data {out}", _summary_rows(data.meta)))


def _summary_rows(meta: dict[str, Any]) -> list[tuple[str, Any]]:
    train = meta["splits"]["train"]
    counts = train["counts"]
    rows: list[tuple[str, Any]] = [("training pairs read", counts["read"])]
    rows += [(f"  dropped: {reason.replace('_', ' ')}", counts[reason]) for reason in REASONS]
    rows += [
        ("training pairs kept", counts["kept"]),
        ("tokens src / tgt", f"{train['src']['tokens']:,} / {train['tgt']['tokens']:,}"),
        ("mean length src / tgt", f"{train['src']['mean']:.1f} / {train['tgt']['mean']:.1f}"),
        ("max length src / tgt", f"{train['src']['max']} / {train['tgt']['max']}"),
    ]
    for name in ("valid", "test"):
        if name in meta["splits"]:
            split = meta["splits"][name]
            rows.append((name, f"{split['examples']:,} pairs, "
                               f"{split['src']['tokens']:,} / {split['tgt']['tokens']:,} tokens"))
    info = meta["tokenizer"]
    kind = "joint" if info["joint"] else "one per side"
    sizes = (f"{info['src']['vocab_size']:,}" if info["joint"]
             else f"{info['src']['vocab_size']:,} / {info['tgt']['vocab_size']:,}")
    padding = meta["padding"]
    languages = meta.get("languages")
    rows += [
        ("languages", f"{languages['src']} -> {languages['tgt']}" if languages else "unknown (--src-lang)"),
        ("tokenizer", f"{kind}, {sizes} pieces{', trained here' if info['trained'] else ''}, {meta['normalization']}"),
        *([("vocabulary size", f"auto: {reason}")] if (reason := (info["trained"] or {}).get("vocab_reason")) else []),
        ("padding estimate", f"{padding['fraction']:.1%} at {padding['max_tokens']:,} tokens per batch "
                             f"({padding['batches']:,} batches)"),
        ("time", f"{meta['seconds']:.1f} s"),
    ]
    return rows
