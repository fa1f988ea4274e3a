"""Every option of a model, a training run and a decoding run, as dataclasses.

A config file (TOML) has one table per dataclass: [model], [train], [decode].
`resolve` builds a run's config with the precedence `nmt train` uses (defaults, model
family, file or resumed checkpoint, `section.key=value` overrides), `validate` checks
every training option once, and `to_dict` gives the resolved form stored in checkpoints.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from nmt.errors import NmtError
from nmt.precision import PRECISIONS

OPTIMIZERS = ("adam", "adamw")
SCHEDULERS = ("auto", "linear", "cosine", "wsd", "inverse_sqrt", "noam", "plateau", "constant")
BUDGETED_SCHEDULERS = ("linear", "cosine", "wsd")  # decay to train.min_lr exactly when the run's budget ends
HIGHER_IS_BETTER = {"bleu": True, "chrf": True, "loss": False, "ppl": False}  # the metrics train.best_metric may name
MAX_ALPHA = 10.0  # the largest length penalty exponent accepted anywhere (CLI, config, server): lp stays finite
MODEL_SIZES = ("enc_layers", "dec_layers", "d_model", "heads", "ffn_dim", "max_positions", "embed_dim", "hidden_size")
DROPOUTS = ("dropout", "attention_dropout", "activation_dropout")


@dataclass
class ModelConfig:
    """Architecture options. Vocabulary sizes are filled in from the tokenizer(s)."""

    arch: str = "transformer"  # "transformer" or "rnn"
    src_vocab_size: int = 0
    tgt_vocab_size: int = 0
    joint_vocab: bool = False  # source and target share one tokenizer
    share_embeddings: bool = True  # one embedding table for source and target (needs joint_vocab)
    tie_output: bool = True  # output projection shares the target embedding matrix
    enc_layers: int = 3
    dec_layers: int = 3
    dropout: float = 0.1
    # Transformer
    d_model: int = 256
    heads: int = 4
    ffn_dim: int = 1024
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    activation: str = "relu"  # "relu", "gelu" or "swish" (SiLU, as Marian / OPUS-MT models)
    norm: str = "pre"  # "pre" (LayerNorm before each sub-layer) or "post" (as the 2017 paper)
    positions: str = "sinusoidal"  # "sinusoidal" or "learned"
    # sinusoids "interleaved" (sin on even, cos on odd channels) or "concatenated" (all sines, then all cosines:
    # Marian / Hugging Face's layout, computed in float64 as they do)
    position_layout: str = "interleaved"
    output_bias: bool = False  # a bias on the output logits (Marian's); a -inf entry is a token never produced
    max_positions: int = 1024  # longest source or target, in tokens, including BOS/EOS
    # Recurrent (arch = "rnn")
    cell: str = "lstm"  # "lstm", "gru" or "rnn"
    embed_dim: int = 256
    hidden_size: int = 512
    attention: str = "general"  # "dot", "general" (Luong) or "bahdanau" (additive)
    input_feeding: bool = True
    bridge: bool = True  # learned projection of the encoder's final state to the decoder's initial state


@dataclass
class DecodeConfig:
    """Search options shared by `nmt translate`, `nmt eval -m` and validation during training."""

    beam: int = 5
    alpha: float = 0.6  # length penalty exponent; 0 disables it
    length_penalty: str = "gnmt"  # "gnmt": ((5 + len) / 6) ** alpha, "average": len ** alpha
    nbest: int = 1
    max_len_a: float = 1.5  # output length limit per sentence: a * src_len + b
    max_len_b: int = 10
    min_len: int = 0
    ban_unk: bool = False
    early_stop: bool = False  # stop a sentence once `beam` hypotheses finished (faster, inexact)
    sampling: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


@dataclass
class TrainConfig:
    """Training-loop options."""

    data: str = ""  # directory written by `nmt prepare`
    # a checkpoint (nmt's own, or from `nmt import`) whose weights, model, decoding defaults and tokenizers a new run
    # starts from, with a fresh optimiser, schedule and progress (nmt.train.init_from); "" = random weights
    init_from: str = ""
    run_dir: str = "runs/default"  # checkpoints, metrics.jsonl and the resolved config go here
    seed: int = 1
    device: str = "auto"  # "auto" (CUDA, then MPS, then CPU), "cpu", "cuda", "cuda:1", "mps"
    threads: int = 0  # CPU threads for torch, 0 = all cores: `nmt train` applies it (the API: nmt.device.tune_cpu)
    precision: str = "auto"  # "auto", "fp32", "bf16" or "fp16" (fp16 on CUDA only, with loss scaling)
    deterministic: bool = False  # deterministic kernels (CUDA: for bitwise resume, at some speed); the CPU always is
    # torch.compile the model's forward and backward, with dynamic shapes and batch widths rounded up to a multiple
    # of 8, so that it compiles a few times, not once per batch; off: on CPU it measured slower (README)
    compile: bool = False
    max_tokens: int = 4096  # padded tokens per batch and per process (see TokenBatchSampler)
    accum_steps: int = 1  # batches accumulated into one update
    max_updates: int = 0  # stop after this many updates; 0 = no limit
    max_epochs: int = 0  # stop after this many epochs; 0 = no limit
    max_minutes: float = 0.0  # stop after this much wall-clock time; 0 = no limit
    optimizer: str = "adamw"  # "adam" or "adamw"
    lr: float = 7e-4  # peak learning rate (for "noam": a multiplier of d_model**-0.5)
    adam_betas: tuple[float, float] = (0.9, 0.98)
    adam_eps: float = 1e-9
    weight_decay: float = 0.0  # applied to weight matrices only, never to biases, norms or embeddings
    clip_norm: float = 1.0  # gradient norm clipping; 0 = off
    label_smoothing: float = 0.1
    src_token_dropout: float = 0.0  # replace each source token by <unk> with this probability (word dropout)
    tgt_token_dropout: float = 0.0  # the same for the decoder's input tokens (the targets scored are kept)
    # "auto": for a bounded run (max_updates, max_epochs or max_minutes) the budget-aware default (nmt.optim),
    # else inverse_sqrt; "linear", "cosine", "wsd" (down to min_lr when the budget ends), "inverse_sqrt", "noam",
    # "plateau" or "constant"
    scheduler: str = "auto"
    warmup: int = 4000  # linear warm-up updates
    decay_fraction: float = 0.2  # wsd: the last share of the budget spent cooling down
    plateau_factor: float = 0.5  # plateau: multiply the rate by this when validation stops improving
    plateau_patience: int = 2  # plateau: validations without improvement before decaying
    min_lr: float = 1e-6  # plateau: never decay below this; linear, cosine, wsd: the rate when the budget ends
    valid_every: int = 1000  # validate every N updates and at the end; 0 = at each epoch end instead
    valid_bleu: bool = True  # also decode the validation set (greedy) for BLEU and chrF
    # BLEU/chrF decode only the first N validation sentences (0 = all; the loss always uses the whole set),
    # greedy with outputs of at most 1.2 * source length + 10 tokens: validation costs a bounded share of training
    valid_max_sentences: int = 500
    best_metric: str = "bleu"  # "bleu", "chrf", "loss" or "ppl": what "best" means
    keep_last: int = 5  # update checkpoints kept besides best.pt
    # at the end, choose best.pt or the average of the last keep_last checkpoints, and the length penalty alpha,
    # by beam-search BLEU on valid (after the valid_max_sentences that chose best.pt, where 200 or more are left),
    # and write final.pt with that alpha as its decode default, and selection.json (nmt.train.selection)
    select_final: bool = True
    select_max_sentences: int = 500  # the final selection decodes at most this many valid sentences (0 = all)
    patience: int = 0  # early stopping after N validations without improvement; 0 = off
    log_every: int = 50  # updates between training log lines


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)


# What differs for the recurrent baseline: Luong/Bahdanau-style training, not Transformer warm-up.
RNN_DEFAULTS: dict[str, dict[str, Any]] = {
    "model": {"arch": "rnn", "dropout": 0.3, "enc_layers": 2, "dec_layers": 2},
    "train": {"lr": 1e-3, "warmup": 0, "clip_norm": 1.0},
}
ARCH_ALIASES = {"transformer": ("transformer", None), "lstm": ("rnn", "lstm"), "gru": ("rnn", "gru"),
                "rnn": ("rnn", "rnn")}


def defaults_for(model: str) -> dict[str, dict[str, Any]]:
    """Overrides that make a good starting point for `--model transformer|lstm|gru|rnn`."""
    if model not in ARCH_ALIASES:
        raise NmtError(f"unknown model {model!r}; choose one of {', '.join(ARCH_ALIASES)}")
    arch, cell = ARCH_ALIASES[model]
    if arch == "transformer":
        return {}
    return {"model": {**RNN_DEFAULTS["model"], "cell": cell}, "train": dict(RNN_DEFAULTS["train"])}


def to_dict(config: Config) -> dict[str, dict[str, Any]]:
    """The resolved config as plain data (stored in checkpoints, printed at start)."""
    return asdict(config)


def from_dict(data: dict[str, Any]) -> Config:
    """Build a Config from nested plain data, rejecting unknown sections and keys."""
    config = Config()
    merge(config, data)
    return config


def merge(config: Config, data: dict[str, Any]) -> Config:
    """Apply nested {section: {key: value}} onto `config` in place, with type checks."""
    for section, values in data.items():
        target = getattr(config, section, None) if section in _SECTIONS else None
        if target is None:
            raise NmtError(f"unknown config section [{section}]; expected one of {', '.join(_SECTIONS)}")
        if not isinstance(values, dict):
            raise NmtError(f"config section [{section}] must be a table")
        known = {f.name: f for f in fields(target)}
        for key, value in values.items():
            if key not in known:
                raise NmtError(f"unknown option {section}.{key}")
            setattr(target, key, _coerce(f"{section}.{key}", getattr(target, key), value))
    return config


def load_config(path: Path) -> dict[str, Any]:
    """Read a TOML config file into nested plain data."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NmtError(f"{path}: no such config file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise NmtError(f"{path}: invalid TOML ({exc})") from None


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """Turn ["train.lr=0.001", "model.norm=post"] into nested data; values are TOML literals or bare strings."""
    data: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise NmtError(f"override {item!r} must look like section.key=value, e.g. train.lr=0.001")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        data.setdefault(section, {})[name] = value
    return data


_SECTIONS = tuple(f.name for f in fields(Config))


def _coerce(name: str, current: Any, value: Any) -> Any:
    """Check `value` against the type of the default it replaces (ints are accepted for floats)."""
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(current, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(current, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(current, tuple):
        if isinstance(value, (list, tuple)) and len(value) == len(current):
            return tuple(_coerce(name, c, v) for c, v in zip(current, value, strict=True))
    elif isinstance(current, str):
        if isinstance(value, str):
            return value
    raise NmtError(f"option {name} expects {type(current).__name__}, got {value!r}")


def to_toml(config: Config) -> str:
    """Render the resolved config as TOML (for printing and for the run directory)."""
    lines: list[str] = []
    for section, values in to_dict(config).items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def resolve(config_file: Path | None = None, model: str | None = None, overrides: Sequence[str] = (),
            resume: bool = False) -> Config:
    """A run's config as `nmt train` builds it, so the API and the CLI agree.

    Defaults, then the model family's defaults (`model`), then the TOML file, then the
    `section.key=value` overrides. A resumed run starts from the config stored in the latest
    checkpoint of its run directory instead (a file or a family would change the model under
    it), so only overrides apply.
    """
    sets = parse_overrides(list(overrides))
    if resume:
        if config_file is not None or model is not None:
            raise NmtError("a resumed run continues with its stored config: "
                           "drop --config/--model (use --set for limits)")
        config = _stored_config(Path(merge(Config(), sets).train.run_dir))
    else:
        config = Config()
        if model is not None:
            merge(config, defaults_for(model))
        if config_file is not None:
            merge(config, load_config(config_file))
    return merge(config, sets)


def explicit_options(config_file: Path | None = None, model: str | None = None,
                     overrides: Sequence[str] = ()) -> set[str]:
    """The "section.key" options a run's config sets on purpose (the model family's defaults, the file, the
    overrides): what automatic choices must leave alone."""
    sources = [defaults_for(model) if model is not None else {}, load_config(config_file) if config_file else {},
               parse_overrides(list(overrides))]
    return {f"{section}.{key}" for data in sources for section, values in data.items()
            if isinstance(values, dict) for key in values}


def _stored_config(run_dir: Path) -> Config:
    """The config in the latest checkpoint of `run_dir`."""
    from nmt.checkpoint import load_checkpoint  # imported here: checkpoints are built on this module
    from nmt.train.run_directory import latest_checkpoint

    path = latest_checkpoint(run_dir)
    if path is None:
        raise NmtError(f"{run_dir}: no checkpoint to resume from")
    return load_checkpoint(path).config


def validate(config: Config, sized: Collection[str] = ()) -> None:
    """Check every training option once, before any work; one NmtError line names the first bad one.
    `sized`: options ("section.key") the run will still choose, checked once chosen, not now."""
    train = config.train
    if not train.data:
        raise NmtError("no training data: set train.data (nmt train --data DIR) "
                       "to a directory written by `nmt prepare`")
    _check_choice("train.optimizer", train.optimizer, OPTIMIZERS)
    _check_choice("train.scheduler", train.scheduler, SCHEDULERS)
    _check_choice("train.best_metric", train.best_metric, tuple(HIGHER_IS_BETTER))
    _check_choice("train.precision", train.precision, PRECISIONS)
    for name in ("accum_steps", "max_tokens", "log_every", "keep_last"):
        _check_at_least(f"train.{name}", getattr(train, name), 1)
    for name in ("max_updates", "max_epochs", "max_minutes", "threads", "warmup", "valid_every", "valid_max_sentences",
                 "select_max_sentences", "patience", "plateau_patience", "clip_norm", "weight_decay", "min_lr"):
        _check_at_least(f"train.{name}", getattr(train, name), 0)
    if not (train.lr > 0 and math.isfinite(train.lr)):
        raise NmtError(f"train.lr must be a positive number, got {train.lr}")
    for name in ("label_smoothing", "src_token_dropout", "tgt_token_dropout"):
        if not 0 <= getattr(train, name) < 1:
            raise NmtError(f"train.{name} must be in [0, 1), got {getattr(train, name)}")
    if not 0 < train.plateau_factor <= 1:
        raise NmtError(f"train.plateau_factor must be in (0, 1], got {train.plateau_factor}")
    if train.best_metric in ("bleu", "chrf") and not train.valid_bleu:
        raise NmtError(f"best_metric {train.best_metric} needs train.valid_bleu = true")
    if train.scheduler in ("inverse_sqrt", "noam") and train.warmup <= 0:
        raise NmtError(f"scheduler {train.scheduler} needs train.warmup > 0")
    if train.scheduler in BUDGETED_SCHEDULERS:
        if not (train.max_updates or train.max_epochs or train.max_minutes):
            raise NmtError(f"scheduler {train.scheduler} decays to the end of the run's budget: set train.max_updates, "
                           "max_epochs or max_minutes")
        only_updates = train.max_updates and not (train.max_epochs or train.max_minutes)
        if only_updates and "train.warmup" not in sized and train.max_updates <= train.warmup:
            raise NmtError(f"scheduler {train.scheduler} needs train.max_updates (where the decay ends) "
                           "above train.warmup")
    if not 0 < train.decay_fraction <= 1:
        raise NmtError(f"train.decay_fraction must be in (0, 1], got {train.decay_fraction}")
    if not all(0 <= beta < 1 for beta in train.adam_betas):
        raise NmtError(f"train.adam_betas must each be in [0, 1), got {list(train.adam_betas)}")
    if not (train.adam_eps > 0 and math.isfinite(train.adam_eps)):
        raise NmtError(f"train.adam_eps must be a positive number, got {train.adam_eps}")
    if not math.isfinite(train.weight_decay):
        raise NmtError(f"train.weight_decay must be a finite number, got {train.weight_decay}")
    validate_model(config.model)
    validate_decode(config.decode)


def validate_model(model: ModelConfig) -> None:
    """Sizes and dropouts of either architecture (the models check their own choices of layout when built)."""
    for name in MODEL_SIZES:
        _check_at_least(f"model.{name}", getattr(model, name), 2 if name == "max_positions" else 1)
    if model.d_model % model.heads:
        raise NmtError(f"model.d_model {model.d_model} is not divisible by model.heads {model.heads}")
    for name in DROPOUTS:
        if not 0 <= getattr(model, name) < 1:  # NaN too
            raise NmtError(f"model.{name} must be in [0, 1), got {getattr(model, name)}")


def validate_decode(decode: DecodeConfig) -> None:
    """The decoding defaults every checkpoint of the run will carry: checked before training, not after."""
    from nmt.decode_options import check_options  # imported here: it is built on this module

    try:
        check_options(decode)
    except NmtError as exc:
        raise NmtError(f"[decode] {exc}") from None


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise NmtError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")


def _check_at_least(name: str, value: float, least: int) -> None:
    if not value >= least:  # NaN too
        raise NmtError(f"{name} must be at least {least}, got {value}")
