"""A Transformer run sized to its data and its budget: the options `nmt train` chooses when none is given.

Two measurements decide. The corpus size (training pairs) sets the model's shape, since a small corpus
overfits a wide network and needs a narrow feed-forward layer and more regularisation (Araabi & Monz
2020, "Optimizing Transformer for Low-Resource NMT": +up to 7 BLEU over default settings on 5k-160k
pairs). The number of epochs the budget allows (measured seconds per update x budget / corpus tokens)
sets the regularisation: a run that sees each sentence a few times underfits and wants little dropout
(on Multi30k, 1,185 updates: dropout 0.1 beat 0.3 by 4.2 valid BLEU), one that sees it fifty times
overfits and wants dropout 0.3, label smoothing 0.2 and word dropout. Warm-up and validation interval
are shares of the expected number of updates, so a 10-minute run is not all warm-up.

Every choice is printed with its reason; an option set in the config file or by `--set` is never
touched (the caller passes only the options it may choose).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nmt.config import Config, explicit_options

# The options sizing may choose, as "section.key".
SIZED_OPTIONS = (
    "model.d_model", "model.enc_layers", "model.dec_layers", "model.heads", "model.ffn_dim", "model.dropout",
    "model.attention_dropout", "model.activation_dropout", "train.label_smoothing", "train.src_token_dropout",
    "train.tgt_token_dropout", "train.lr", "train.max_tokens", "train.warmup", "train.valid_every",
    "train.weight_decay",
)

# Shape by training pairs: (fewer than this many pairs, the shape). Narrow FFN and fewer heads for small corpora.
SHAPES: tuple[tuple[float, dict[str, Any]], ...] = (
    (12_000, {"d_model": 256, "enc_layers": 3, "dec_layers": 3, "heads": 4, "ffn_dim": 512}),
    (60_000, {"d_model": 256, "enc_layers": 3, "dec_layers": 3, "heads": 4, "ffn_dim": 1024}),
    (300_000, {"d_model": 384, "enc_layers": 4, "dec_layers": 4, "heads": 6, "ffn_dim": 1536}),
    (float("inf"), {"d_model": 512, "enc_layers": 6, "dec_layers": 6, "heads": 8, "ffn_dim": 2048}),
)

# Batch by training pairs: (fewer than this many pairs, target tokens per batch, peak rate). The first row is the
# d_model 256 shapes': 1,024-token batches at 1.4e-3 beat 2,048 at 2e-3 in the final selection's valid BLEU at the
# same target tokens and the same wall time on a CPU, by 0.8 and 1.4 on a 10k-pair corpus (two seeds) and by 1.1
# on 29k pairs (one seed). The wider shapes of larger corpora take 1e-3; they are not measured with small batches.
BATCHES: tuple[tuple[float, int, float], ...] = (
    (60_000, 1024, 1.4e-3), (100_000, 2048, 1e-3), (float("inf"), 4096, 1e-3),
)

# Regularisation by epochs the budget allows: (at most this many epochs, the settings).
REGULARISATION: tuple[tuple[float, dict[str, float]], ...] = (
    (12, {"dropout": 0.1, "attention_dropout": 0.1, "activation_dropout": 0.1, "label_smoothing": 0.1,
          "token_dropout": 0.0}),
    (40, {"dropout": 0.2, "attention_dropout": 0.1, "activation_dropout": 0.1, "label_smoothing": 0.1,
          "token_dropout": 0.05}),
    (float("inf"), {"dropout": 0.3, "attention_dropout": 0.1, "activation_dropout": 0.1, "label_smoothing": 0.2,
                    "token_dropout": 0.1}),
)
WARMUP_SHARE, WARMUP_RANGE = 0.08, (100, 4000)  # warm-up: 8% of the expected updates
VALIDATIONS = 8  # validations (and checkpoints, for averaging) per run
VALID_EVERY_RANGE = (100, 2000)
VALIDATION_OVERHEAD = 1.15  # wall time per update, validation and collation included, over the timed update


def free_options(config_file: Path | None = None, model: str | None = None,
                 overrides: Sequence[str] = ()) -> frozenset[str]:
    """The options `nmt train` sizes for a run resolved from these sources: those none of them sets."""
    return frozenset(SIZED_OPTIONS) - explicit_options(config_file, model, overrides)


@dataclass(frozen=True)
class Choice:
    option: str  # "section.key"
    value: Any
    reason: str


def choose_shape(config: Config, pairs: int, free: Collection[str]) -> list[Choice]:
    """Set the model's shape, the batch size and the peak rate from the corpus size (before the model is built)."""
    shape = next(values for limit, values in SHAPES if pairs < limit)
    why = f"{pairs:,} training pairs"
    choices = [Choice(f"model.{key}", value, why) for key, value in shape.items()]
    max_tokens, rate = next((tokens, rate) for limit, tokens, rate in BATCHES if pairs < limit)
    choices.append(Choice("train.max_tokens", max_tokens, f"{why}: small batches give more updates per minute"
                          if max_tokens < 4096 else why))
    choices.append(Choice("train.lr", rate, f"d_model {shape['d_model']}, {max_tokens:,}-token batches"))
    choices.append(Choice("train.weight_decay", 1e-4, "matrices only; as the Multi30k recipe"))
    return apply(config, choices, free)


def choose_schedule_and_regularisation(config: Config, pairs: int, free: Collection[str], updates_per_epoch: int,
                                       seconds_per_update: Callable[[], float]) -> list[Choice]:
    """Set warm-up, validation interval and regularisation from the updates and epochs the budget allows.

    `seconds_per_update` times one update of the built model; it is called only for a time budget.
    """
    updates, how = expected_updates(config, updates_per_epoch, seconds_per_update)
    if updates is None:
        return []
    epochs = updates / max(updates_per_epoch, 1)
    why = f"about {updates:,} updates ({how}): {epochs:.1f} epochs of {pairs:,} pairs"
    settings = next(values for limit, values in REGULARISATION if epochs <= limit)
    choices = [Choice(f"model.{key}", settings[key], why)
               for key in ("dropout", "attention_dropout", "activation_dropout")]
    choices.append(Choice("train.label_smoothing", settings["label_smoothing"], why))
    for side in ("src", "tgt"):
        choices.append(Choice(f"train.{side}_token_dropout", settings["token_dropout"], why))
    choices.append(warmup_choice(updates))
    low, high = VALID_EVERY_RANGE
    choices.append(Choice("train.valid_every", int(min(high, max(low, round(updates / VALIDATIONS, -1)))),
                          f"{VALIDATIONS} validations and checkpoints in about {updates:,} updates"))
    return apply(config, choices, free)


def warmup_choice(updates: int) -> Choice:
    """8% of the expected updates within WARMUP_RANGE, but never past half the budget: a run of 100 updates
    that warmed up for 100 would never reach its peak rate, nor decay from it."""
    low, high = WARMUP_RANGE
    share = min(high, max(low, round(updates * WARMUP_SHARE)))
    if share <= updates // 2:
        return Choice("train.warmup", share, f"{WARMUP_SHARE:.0%} of about {updates:,} updates")
    return Choice("train.warmup", max(1, updates // 2), f"half of about {updates:,} updates")


def expected_updates(config: Config, updates_per_epoch: int,
                     seconds_per_update: Callable[[], float]) -> tuple[int | None, str]:
    """The updates the run will make before its nearest limit; None for an unbounded run."""
    train, estimates = config.train, []
    if train.max_updates:
        estimates.append((train.max_updates, "train.max_updates"))
    if train.max_epochs:
        estimates.append((train.max_epochs * updates_per_epoch, "train.max_epochs"))
    if train.max_minutes:
        seconds = seconds_per_update() * VALIDATION_OVERHEAD
        estimates.append((max(1, round(train.max_minutes * 60 / seconds)),
                          f"{train.max_minutes:g} minutes at {seconds:.2f} s per update, measured"))
    return min(estimates, default=(None, "unbounded"))


def apply(config: Config, choices: list[Choice], free: Collection[str]) -> list[Choice]:
    """Set each choice whose option is free (not given explicitly); return those applied."""
    applied = [choice for choice in choices if choice.option in free]
    for choice in applied:
        section, key = choice.option.split(".")
        setattr(getattr(config, section), key, choice.value)
    return applied
