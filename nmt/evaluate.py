"""sacreBLEU metrics: corpus and sentence scores with signatures, and paired significance tests.

Scores are computed on detokenised hypotheses against raw references, as
sacreBLEU intends, and every score carries its signature so the number can be
reproduced. Hypotheses come in as a list of strings, wherever they came from
(a file, stdin, a Translator), so the trainer and the command line share this
module.

The paired tests replay sacreBLEU's own (`sacrebleu.significance`: same
sufficient statistics, same seeded draws, same confidence intervals) with one
change: resampled differences *equal* to the observed one count against
significance. sacreBLEU, following multeval, counts only strictly larger ones,
so a system compared with itself gets the smallest p-value possible, 1/(n+1),
instead of 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
from sacrebleu.metrics import BLEU, CHRF, TER
from sacrebleu.metrics.base import Metric
from sacrebleu.significance import estimate_ci

from nmt.errors import NmtError
from nmt.io import decode_line, read_lines
from nmt.progress import SILENT, Reporter

METRICS = ("bleu", "chrf", "chrf++", "ter")
LOWER_IS_BETTER = frozenset({"ter"})
TOKENIZERS: tuple[str, ...] = tuple(BLEU.TOKENIZERS)
DEFAULT_TOKENIZER: str = BLEU.TOKENIZER_DEFAULT
BOOTSTRAP_SAMPLES, AR_TRIALS, SEED = 1000, 10000, 12345
MAX_RESAMPLES = 100_000  # either test draws (this x lines) numbers at once: 10**9 samples once asked for 373 GiB
_TIE = 1e-9  # scores within this of the observed difference count as equal to it

References = Sequence[str] | Sequence[Sequence[str]]


@dataclass(frozen=True)
class MetricScore:
    """One corpus-level score; `metric` is the option name (bleu), `name` sacreBLEU's (BLEU)."""

    metric: str
    name: str
    score: float
    signature: str
    details: str = ""  # BLEU's n-gram precisions, brevity penalty and lengths

    def __str__(self) -> str:
        """sacreBLEU's citable line: `BLEU|nrefs:1|...|version:2.6.0 = 35.12 ...`."""
        return f"{self.name}|{self.signature} = {self.score:.2f} {self.details}".rstrip()


@dataclass(frozen=True)
class SentenceScore:
    """Every requested metric for one line (1-based), with its texts for display."""

    line: int
    scores: dict[str, float]
    hypothesis: str
    references: tuple[str, ...]


@dataclass(frozen=True)
class Estimate:
    """A system's score on the test set and its bootstrap mean ± 95% half-interval."""

    score: float
    mean: float
    ci: float


@dataclass(frozen=True)
class Comparison:
    """Baseline against system for one metric: both estimates and two p-values of the difference."""

    metric: str
    name: str
    signature: str
    baseline: Estimate
    system: Estimate
    p_bootstrap: float
    p_ar: float


def parse_metrics(spec: str | Sequence[str]) -> tuple[str, ...]:
    """'bleu,chrf' or ['bleu', 'chrf'] -> ('bleu', 'chrf'); unknown names are a user error."""
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    names = tuple(dict.fromkeys(p.strip().lower() for p in parts if p.strip()))
    if not names:
        raise NmtError(f"no metric given; choose from {', '.join(METRICS)}")
    for name in names:
        if name not in METRICS:
            raise NmtError(f"unknown metric {name!r}; choose from {', '.join(METRICS)}")
    return names


def check_tokenizer(tokenize: str) -> str:
    if tokenize not in TOKENIZERS:
        raise NmtError(f"unknown tokenizer {tokenize!r}; choose from {', '.join(TOKENIZERS)}")
    return tokenize


def make_metric(name: str, tokenize: str = DEFAULT_TOKENIZER, lowercase: bool = False,
                sentence_level: bool = False) -> Metric:
    """A sacreBLEU metric object; `tokenize` applies to BLEU only, `lowercase` to BLEU and chrF.

    TER keeps sacreBLEU's default (case-insensitive, its own tokenizer), as the
    sacrebleu command does. Sentence-level BLEU uses effective order, as
    sacreBLEU recommends, so short sentences are not zeroed by a missing 4-gram.
    """
    if name == "bleu":
        check_tokenizer(tokenize)
        try:
            # tokenize="none" scores text tokenised on purpose (e.g. --moses): no "forgot to detokenize" warning
            return BLEU(tokenize=tokenize, lowercase=lowercase, effective_order=sentence_level,
                        force=tokenize == "none")
        except (RuntimeError, ImportError, OSError, AssertionError) as exc:
            # ja-mecab / ko-mecab need extras; the spm family downloads a model.
            raise NmtError(f"tokenizer {tokenize!r} is unavailable: {' '.join(str(exc).split())}") from None
    if name in ("chrf", "chrf++"):
        return CHRF(word_order=2 if name == "chrf++" else 0, lowercase=lowercase)
    if name == "ter":
        return TER()
    raise NmtError(f"unknown metric {name!r}; choose from {', '.join(METRICS)}")


def _streams(refs: References) -> list[list[str]]:
    """One reference stream (list[str]) or several (list[list[str]]) -> sacreBLEU's list of streams."""
    if not refs:
        raise NmtError("no references given")
    if isinstance(refs[0], str):
        return [list(refs)]  # type: ignore[arg-type]
    return [list(stream) for stream in refs]


def _check_inputs(hyps: Sequence[str], streams: list[list[str]]) -> None:
    if not hyps:
        raise NmtError("no hypotheses to score")
    for k, stream in enumerate(streams, start=1):
        if len(stream) != len(hyps):
            raise NmtError(f"{len(hyps)} hypotheses but reference {k} has {len(stream)} lines")


def _details(score: object) -> str:
    return getattr(score, "_verbose", "")


def corpus_scores(
    hyps: Sequence[str],
    refs: References,
    metrics: str | Sequence[str] = ("bleu", "chrf"),
    tokenize: str = DEFAULT_TOKENIZER,
    lowercase: bool = False,
    reporter: Reporter = SILENT,
) -> dict[str, MetricScore]:
    """Corpus-level scores keyed by metric option name, e.g. `scores["bleu"].score`.

    `refs` is one reference list aligned with `hyps`, or a list of such lists
    (several references per sentence). This is what validation during training calls.
    """
    names = parse_metrics(metrics)
    streams = _streams(refs)
    _check_inputs(hyps, streams)
    advance = reporter.task("scoring", len(names), "metrics")
    results: dict[str, MetricScore] = {}
    for name in names:
        metric = make_metric(name, tokenize, lowercase)
        score = metric.corpus_score(list(hyps), streams)
        results[name] = MetricScore(name, score.name, float(score.score), metric.get_signature().format(),
                                    _details(score))
        advance(1)
    return results


def sentence_scores(
    hyps: Sequence[str],
    refs: References,
    metrics: str | Sequence[str] = ("bleu",),
    tokenize: str = DEFAULT_TOKENIZER,
    lowercase: bool = False,
    reporter: Reporter = SILENT,
) -> list[SentenceScore]:
    """Per-line scores, to find the translations that went wrong (BLEU with effective order)."""
    names = parse_metrics(metrics)
    streams = _streams(refs)
    _check_inputs(hyps, streams)
    scorers = {name: make_metric(name, tokenize, lowercase, sentence_level=True) for name in names}
    advance = reporter.task("sentence scores", len(hyps), "lines")
    results = []
    for index, hyp in enumerate(hyps):
        line_refs = tuple(stream[index] for stream in streams)
        scores = {name: float(metric.sentence_score(hyp, list(line_refs)).score) for name, metric in scorers.items()}
        results.append(SentenceScore(index + 1, scores, hyp, line_refs))
        advance(1)
    return results


def worst(sentences: Sequence[SentenceScore], metric: str, n: int) -> list[SentenceScore]:
    """The `n` worst lines by `metric` (lowest BLEU/chrF, highest TER); ties keep file order."""
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    return sorted(sentences, key=lambda s: sign * s.scores[metric])[:n]


def _p_value(samples: np.ndarray, observed: float) -> float:
    """Share of resampled statistics at least as large as the observed one (+1 smoothing)."""
    count = int(np.sum(samples >= observed - _TIE))
    return (count + 1) / (len(samples) + 1)


def _scores(metric: Metric, summed: np.ndarray) -> np.ndarray:
    """Scores for rows of summed sufficient statistics: (n, D) -> (n,)."""
    return np.array([metric._compute_score_from_stats(row).score for row in summed])


def _paired_tests(
    metric: Metric, bl_stats: np.ndarray, sys_stats: np.ndarray, observed: float, bootstrap_samples: int,
    ar_trials: int, seed: int,
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Paired bootstrap (Koehn 2004) and approximate randomisation (Riezler & Maxwell 2005).

    bl_stats, sys_stats: (N, D) per-sentence statistics; the draws are sacreBLEU 2.x's.
    Returns both systems' bootstrap scores (S,) and the two p-values.
    """
    n = len(bl_stats)
    idxs = np.random.default_rng(seed).choice(n, size=(bootstrap_samples, n), replace=True)  # (S, N)
    bl_boot = _scores(metric, np.stack([bl_stats[row].sum(0) for row in idxs]))  # (S,)
    sys_boot = _scores(metric, np.stack([sys_stats[row].sum(0) for row in idxs]))  # (S,)
    diffs = np.abs(sys_boot - bl_boot)
    p_bootstrap = _p_value(diffs - diffs.mean(), observed)  # the null: differences centred on 0

    swap = np.random.default_rng(seed).integers(2, size=(ar_trials, n), dtype=bool)  # (T, N)
    keep = ~swap
    shuffled_a = _scores(metric, swap @ bl_stats + keep @ sys_stats)  # (T,)
    shuffled_b = _scores(metric, keep @ bl_stats + swap @ sys_stats)  # (T,)
    p_ar = _p_value(np.abs(shuffled_a - shuffled_b), observed)
    return bl_boot, sys_boot, p_bootstrap, p_ar


def _estimate(score: float, boot: np.ndarray) -> Estimate:
    mean, ci = estimate_ci(boot)
    return Estimate(float(score), float(mean), float(ci))


def compare(
    hyps: Sequence[str],
    baseline: Sequence[str],
    refs: References,
    metrics: str | Sequence[str] = ("bleu",),
    tokenize: str = DEFAULT_TOKENIZER,
    lowercase: bool = False,
    bootstrap_samples: int = BOOTSTRAP_SAMPLES,
    ar_trials: int = AR_TRIALS,
    seed: int = SEED,
    reporter: Reporter = SILENT,
) -> dict[str, Comparison]:
    """Is `hyps` different from `baseline`? Both tests per metric, with a fixed seed."""
    names = parse_metrics(metrics)
    streams = _streams(refs)
    _check_inputs(hyps, streams)
    if len(baseline) != len(hyps):
        raise NmtError(f"{len(hyps)} hypotheses but the baseline has {len(baseline)} lines")
    for option, value in (("--bootstrap-samples", bootstrap_samples), ("--ar-trials", ar_trials)):
        if not 1 <= value <= MAX_RESAMPLES:
            raise NmtError(f"{option} must be between 1 and {MAX_RESAMPLES:,}, got {value}")
    if seed < 0:
        raise NmtError(f"seed must be 0 or more, got {seed}")
    advance = reporter.task("significance tests", len(names), "metrics")
    results: dict[str, Comparison] = {}
    for name in names:
        metric = make_metric(name, tokenize, lowercase)
        bl_stats = np.array(metric._extract_corpus_statistics(list(baseline), streams), dtype=np.float64)  # (N, D)
        sys_stats = np.array(metric._extract_corpus_statistics(list(hyps), streams), dtype=np.float64)  # (N, D)
        bl_score = metric._compute_score_from_stats(bl_stats.sum(0))
        sys_score = metric._compute_score_from_stats(sys_stats.sum(0))
        observed = abs(sys_score.score - bl_score.score)
        bl_boot, sys_boot, p_bs, p_ar = _paired_tests(metric, bl_stats, sys_stats, observed, bootstrap_samples,
                                                      ar_trials, seed)
        signature = metric.get_signature()
        for key, value in (("bs", bootstrap_samples), ("ar", ar_trials), ("seed", seed)):
            signature.update(key, value)
        results[name] = Comparison(
            name, sys_score.name, signature.format(), _estimate(bl_score.score, bl_boot),
            _estimate(sys_score.score, sys_boot), p_bs, p_ar,
        )
        advance(1)
    return results


def moses_tokenize(lines: Sequence[str], lang: str) -> list[str]:
    """Moses-tokenise lines, as the Multi30k papers do before multi-bleu.perl (needs the moses extra)."""
    try:
        from sacremoses import MosesTokenizer
    except ImportError:
        raise NmtError("--moses needs sacremoses: pip install 'nmt[moses]'") from None
    tokenizer = MosesTokenizer(lang=lang)
    return [tokenizer.tokenize(line, escape=False, return_str=True) for line in lines]


def read_stream(stream: IO[bytes], name: str = "<stdin>") -> list[str]:
    """Lines of a binary stream (stdin) as strict UTF-8, naming the line of bad bytes."""
    lines = []
    for number, raw in enumerate(stream, start=1):
        lines.append(decode_line(raw, number, name).rstrip("\r\n"))
    if not lines:
        raise NmtError(f"{name}: no hypotheses (empty input)")
    return lines


def read_text(path: Path) -> list[str]:
    """All lines of a strict UTF-8 file; missing, empty or undecodable files are one-line errors."""
    return list(read_lines(path))


def check_aligned(named: Sequence[tuple[str, Sequence[str]]]) -> None:
    """Require every text to have as many lines as the first; the message names both files and counts."""
    first_name, first = named[0]
    for name, lines in named[1:]:
        if len(lines) != len(first):
            raise NmtError(f"line counts differ: {first_name} has {len(first)} lines, {name} has {len(lines)}")
