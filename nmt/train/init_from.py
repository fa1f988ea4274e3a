"""A new run that starts from a checkpoint's weights (`train.init_from`): fine-tuning, domain adaptation.

What it takes from the checkpoint: the weights, the model config (the shape cannot change
under the weights; only the dropouts may be set anew), the decoding defaults (an imported
model's beam and length penalty) and the tokenizers, which the data must have been encoded
with (`nmt prepare --tokenizer-from`). What it does not take: the optimiser, the schedule,
the progress, the best score: all start afresh, unlike `--resume`, which continues one run.

A run of trained weights wants a smaller rate and a shorter warm-up than one from random
weights: a from-scratch peak rate undoes much of what the checkpoint knows in its first
hundred updates, and the 8%-of-the-budget warm-up sized for random weights spends a short
fine-tuning run mostly warming up. Where the run's config does not set them, they are
`FINETUNE_LR` and at most `FINETUNE_WARMUP` updates (a tenth of a shorter `max_updates`),
printed with the other automatic choices.
"""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path
from typing import TypeVar

from nmt.checkpoint import Checkpoint, load_checkpoint
from nmt.config import Config, DecodeConfig, ModelConfig
from nmt.data import PreparedData
from nmt.errors import NmtError
from nmt.train.sizing import Choice, apply

FINETUNE_LR = 1e-4  # a seventh of a from-scratch run's default peak (train.lr = 7e-4)
FINETUNE_WARMUP = 100
NEW_DROPOUTS = ("dropout", "attention_dropout", "activation_dropout")  # model options a fine-tuning run may change
OWN_OPTIONS = frozenset({"train.lr", "train.warmup"})  # what the fine-tuning defaults set instead of sizing
Options = TypeVar("Options", ModelConfig, DecodeConfig)


def start_from(config: Config, data: PreparedData, free: frozenset[str]) -> tuple[Checkpoint, list[Choice]]:
    """The checkpoint `train.init_from` names, checked against the data; `config` takes its model and decoding
    settings (where the run's own differ from the defaults, those win) and, among the `free` options, the
    fine-tuning defaults. Returns the checkpoint (its weights go into the new model) and the choices made."""
    path = Path(config.train.init_from)
    checkpoint = load_checkpoint(path)
    if checkpoint.src_tokenizer != data.src_tokenizer or checkpoint.tgt_tokenizer != data.tgt_tokenizer:
        raise NmtError(f"{data.path}: encoded with other tokenizers than {path} (train.init_from); "
                       f"prepare the data with: nmt prepare --tokenizer-from {path} ...")
    config.model = model_of(checkpoint.config.model, config.model, path)
    config.decode = with_changes(checkpoint.config.decode, config.decode, DecodeConfig())
    return checkpoint, apply(config, finetune_choices(config, path), free)


def model_of(stored: ModelConfig, given: ModelConfig, path: Path) -> ModelConfig:
    """The checkpoint's model config with the dropouts the run sets; any other model option set is refused."""
    default = ModelConfig()
    changed = [f.name for f in fields(ModelConfig) if getattr(given, f.name) != getattr(default, f.name)
               and f.name not in NEW_DROPOUTS and f.name not in ("src_vocab_size", "tgt_vocab_size", "joint_vocab")]
    if conflicts := [name for name in changed if getattr(given, name) != getattr(stored, name)]:
        raise NmtError(f"model.{conflicts[0]} comes from {path} (train.init_from): a new run from its weights "
                       "cannot change the model; only model.dropout, attention_dropout and activation_dropout can")
    return with_changes(stored, given, default, only=NEW_DROPOUTS)


def with_changes(stored: Options, given: Options, default: Options, only: tuple[str, ...] | None = None) -> Options:
    """`stored`, with each option (of `only`, if given) that `given` changed from `default`."""
    names = [f.name for f in fields(default) if only is None or f.name in only]
    return replace(stored, **{name: getattr(given, name) for name in names
                              if getattr(given, name) != getattr(default, name)})


def finetune_choices(config: Config, path: Path) -> list[Choice]:
    """A fine-tuning run's rate and warm-up (applied only where the run's config leaves them free)."""
    train = config.train
    warmup = min(FINETUNE_WARMUP, max(1, train.max_updates // 10)) if train.max_updates else FINETUNE_WARMUP
    why = f"fine-tuning {path}: its weights are trained already"
    return [Choice("train.lr", FINETUNE_LR, why),
            Choice("train.warmup", warmup, f"{why}; short" + (", a tenth of train.max_updates"
                                                              if warmup < FINETUNE_WARMUP else ""))]
