"""`nmt eval`: sacreBLEU scores of a hypothesis file (or stdin, or a model's translations) against references."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from cli.common import console, handle_errors, reporting
from cli.translate import DecodingOptions, results_with_warnings, with_decoding_options
from nmt.errors import NmtError
from nmt.evaluate import (
    AR_TRIALS,
    BOOTSTRAP_SAMPLES,
    DEFAULT_TOKENIZER,
    MAX_RESAMPLES,
    METRICS,
    SEED,
    TOKENIZERS,
    Comparison,
    MetricScore,
    SentenceScore,
    check_aligned,
    check_tokenizer,
    compare,
    corpus_scores,
    moses_tokenize,
    parse_metrics,
    read_stream,
    read_text,
    sentence_scores,
    worst,
)
from nmt.io import atomic_path

STDIN = "<stdin>"


def _read_hypotheses(hyp: Path | None) -> list[str]:
    if hyp is not None:
        return read_text(hyp)
    if sys.stdin.isatty():
        raise NmtError("no --hyp given and stdin is a terminal: pass --hyp FILE or pipe hypotheses in")
    return read_stream(sys.stdin.buffer, STDIN)


def _check_hypothesis_source(hyp: Path | None, model: Path | None, src: Path | None, hyp_out: Path | None) -> None:
    """Hypotheses come from --hyp (or stdin), or from translating --src with --model: never both."""
    if model is None:
        if src is not None or hyp_out is not None:
            raise NmtError("--src and --hyp-out need --model")
        return
    if hyp is not None:
        raise NmtError("--hyp and --model exclude each other: score a file, or translate --src with a model")
    if src is None:
        raise NmtError("--model needs --src: the source sentences to translate")


def _translate(model: Path, src: Path, hyp_out: Path | None, decoding: DecodingOptions,
               named_refs: list[tuple[str, list[str]]]) -> list[str]:
    """The best translation of every line of `src` (also written to `hyp_out` when given)."""
    sources = read_text(src)
    check_aligned([(str(src), sources), *named_refs])  # before the long part, not after
    translator = decoding.translator(model)
    hyps: list[str] = []
    with reporting() as reporter:
        advance = reporter.task("translating", len(sources), "sentences")
        for result in results_with_warnings(translator.translate_lines(sources)):
            hyps.append(result.best.text)
            advance(1)
    if hyp_out is not None:
        with atomic_path(hyp_out) as tmp:
            tmp.write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
    return hyps


def _scores_table(scores: dict[str, MetricScore]) -> Table:
    table = Table(title="Corpus scores", title_justify="left")
    table.add_column("metric", style="bold")
    table.add_column("score", justify="right")
    table.add_column("details")
    for s in scores.values():
        table.add_row(s.name, f"{s.score:.2f}", Text(s.details))
    return table


def _comparison_table(comparisons: dict[str, Comparison], hyp_name: str, baseline_name: str) -> Table:
    table = Table(title="Paired bootstrap and approximate randomisation (AR) against the baseline",
                  title_justify="left")
    for column in ("metric", "system", "score", "mean ± 95% CI", "p bootstrap", "p AR"):
        table.add_column(column, justify="left" if column in ("metric", "system") else "right")
    for c in comparisons.values():
        table.add_row(c.name, Text(f"baseline {baseline_name}"), f"{c.baseline.score:.2f}",
                      f"{c.baseline.mean:.2f} ± {c.baseline.ci:.2f}", "", "")
        table.add_row("", Text(hyp_name), f"{c.system.score:.2f}", f"{c.system.mean:.2f} ± {c.system.ci:.2f}",
                      f"{c.p_bootstrap:.4f}", f"{c.p_ar:.4f}")
    return table


def _sentences_table(sentences: list[SentenceScore], metrics: tuple[str, ...], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("line", justify="right")
    for name in metrics:
        table.add_column(name, justify="right")
    table.add_column("hypothesis")
    table.add_column("reference")
    for s in sentences:
        table.add_row(str(s.line), *(f"{s.scores[m]:.2f}" for m in metrics), Text(s.hypothesis), Text(s.references[0]))
    return table


def _json_payload(
    hyp_name: str,
    refs: list[Path],
    lines: int,
    scores: dict[str, MetricScore],
    comparisons: dict[str, Comparison] | None,
    baseline: Path | None,
    sentences: list[SentenceScore] | None,
) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "hyp": hyp_name,
        "refs": [str(r) for r in refs],
        "lines": lines,
        "scores": {
            key: {"name": s.name, "score": s.score, "signature": s.signature, "details": s.details}
            for key, s in scores.items()
        },
    }
    if comparisons is not None:
        payload["comparison"] = {
            "baseline": str(baseline),
            "metrics": {
                key: {
                    "name": c.name,
                    "signature": c.signature,
                    "baseline": vars(c.baseline),
                    "system": vars(c.system),
                    "p_bootstrap": c.p_bootstrap,
                    "p_ar": c.p_ar,
                }
                for key, c in comparisons.items()
            },
        }
    if sentences is not None:
        payload["sentences"] = [
            {"line": s.line, "scores": s.scores, "hyp": s.hypothesis, "refs": list(s.references)} for s in sentences
        ]
    return payload


@handle_errors
@with_decoding_options
def evaluate(
    refs: Annotated[list[Path], typer.Option(
        "--ref", "-r", help="Reference file, one sentence per line (repeat for several references).",
        show_default=False)],
    hyp: Annotated[Path | None, typer.Option(
        "--hyp", help="Hypotheses (detokenised), one per line; read from stdin when absent.",
        show_default=False)] = None,
    metrics: Annotated[str, typer.Option("--metrics", help=f"Comma-separated metrics: {', '.join(METRICS)}.")] = "bleu",
    tokenize: Annotated[str, typer.Option(
        help=f"BLEU tokenizer: {', '.join(TOKENIZERS)} (ja-mecab/ko-mecab "
             "need sacrebleu's extras).")] = DEFAULT_TOKENIZER,
    lowercase: Annotated[bool, typer.Option(
        "--lowercase", help="Case-insensitive BLEU and chrF (TER is case-insensitive anyway, "
                            "as in sacreBLEU).")] = False,
    moses: Annotated[str | None, typer.Option(
        "--moses", help="Moses-tokenise hypotheses and references for this language and score BLEU on those tokens "
                        "(tok:none): comparable with papers that report multi-bleu.perl on tokenised text. "
                        "Needs nmt[moses].", show_default=False)] = None,
    baseline: Annotated[Path | None, typer.Option(
        help="Baseline hypotheses: run paired bootstrap and approximate randomisation against them.",
        show_default=False)] = None,
    bootstrap_samples: Annotated[int, typer.Option(
        help=f"Bootstrap resamples for confidence intervals and the bootstrap p-value "
             f"(at most {MAX_RESAMPLES:,}).")] = BOOTSTRAP_SAMPLES,
    ar_trials: Annotated[int, typer.Option(
        help=f"Approximate randomisation trials (at most {MAX_RESAMPLES:,}).")] = AR_TRIALS,
    seed: Annotated[int, typer.Option(help="Seed of the resampling, so p-values are reproducible.")] = SEED,
    sentence: Annotated[bool, typer.Option(
        "--sentence", help="Also score every line (BLEU with effective order).")] = False,
    worst_n: Annotated[int, typer.Option(
        "--worst", help="Show only the N worst lines by the first metric (implies --sentence).",
        show_default=False)] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of tables.")] = False,
    model: Annotated[Path | None, typer.Option(
        "--model", "-m", help="Translate --src with this checkpoint and score the result "
                              "(decoding options as in nmt translate).", show_default=False)] = None,
    src: Annotated[Path | None, typer.Option(
        "--src", "-s", help="With --model: the source sentences, one per line.", show_default=False)] = None,
    hyp_out: Annotated[Path | None, typer.Option(
        "--hyp-out", help="With --model: also write the hypotheses to this file.", show_default=False)] = None,
    *,
    decoding: DecodingOptions,
) -> None:
    """Score translations with sacreBLEU (BLEU, chrF, chrF++, TER); compare with a baseline.

    With --model, translate --src first and score that, in one go.
    """
    names = parse_metrics(metrics)
    check_tokenizer(tokenize)
    if worst_n < 0:
        raise NmtError(f"--worst must be 1 or more, got {worst_n}")
    _check_hypothesis_source(hyp, model, src, hyp_out)
    references = [read_text(r) for r in refs]
    named_refs = [(str(r), lines) for r, lines in zip(refs, references, strict=True)]
    if model is not None and src is not None:
        hyps, hyp_name = _translate(model, src, hyp_out, decoding, named_refs), str(hyp_out or model)
    else:
        hyps, hyp_name = _read_hypotheses(hyp), str(hyp) if hyp is not None else STDIN
    baseline_hyps = read_text(baseline) if baseline is not None else None
    named = [(hyp_name, hyps), *named_refs]
    check_aligned(named + ([(str(baseline), baseline_hyps)] if baseline_hyps is not None else []))
    if moses is not None:
        hyps = moses_tokenize(hyps, moses)
        references = [moses_tokenize(lines, moses) for lines in references]
        baseline_hyps = moses_tokenize(baseline_hyps, moses) if baseline_hyps is not None else None
        tokenize = "none"
    options = {"metrics": names, "tokenize": tokenize, "lowercase": lowercase}

    comparisons = sentences = None
    with reporting() as reporter:
        scores = corpus_scores(hyps, references, reporter=reporter, **options)
        if baseline_hyps is not None:
            comparisons = compare(
                hyps, baseline_hyps, references, bootstrap_samples=bootstrap_samples, ar_trials=ar_trials, seed=seed,
                reporter=reporter, **options
            )
        if sentence or worst_n:
            sentences = sentence_scores(hyps, references, reporter=reporter, **options)
            if worst_n:
                sentences = worst(sentences, names[0], worst_n)

    if as_json:
        payload = _json_payload(hyp_name, refs, len(hyps), scores, comparisons, baseline, sentences)
        typer.echo(json.dumps(payload, ensure_ascii=False, indent=2))
        return
    console.print(_scores_table(scores))
    for s in scores.values():
        console.print(str(s), markup=False, highlight=False, soft_wrap=True)
    if comparisons is not None:
        console.print(_comparison_table(comparisons, hyp_name, str(baseline)))
        for c in comparisons.values():
            console.print(f"{c.name}|{c.signature}", markup=False, highlight=False, soft_wrap=True)
    if sentences is not None:
        title = f"{len(sentences)} worst lines by {names[0]}" if worst_n else "Sentence scores"
        console.print(_sentences_table(sentences, names, title))
