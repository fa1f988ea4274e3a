"""`nmt train`: train a Transformer or a recurrent model on data from `nmt prepare`."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from cli.common import console, err_console, fail, handle_errors, human, summary_table
from nmt.config import Config, defaults_for, load_config, merge, parse_overrides, to_toml
from nmt.train import Trainer, latest_checkpoint
from nmt.checkpoint import load_checkpoint


class RichMonitor:
    """Shows training as a progress bar with loss, perplexity, rate and tokens/s; validations as lines."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]} ppl {task.fields[ppl]} lr {task.fields[lr]} {task.fields[speed]} tok/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=err_console,
            disable=not err_console.is_terminal and not os.environ.get("NMT_PROGRESS"),
        )
        self.task: Any = None

    def started(self, info: dict[str, Any]) -> None:
        err_console.print(to_toml(info["config"]), highlight=False, markup=False)
        err_console.print(
            f"{info['parameters']:,} parameters on {info['device']} ({info['threads']} threads, "
            f"{info['world_size']} process(es)); precision {info['precision']}; {info['train_examples']:,} training pairs, "
            f"{info['batches_per_epoch']:,} batches per epoch",
            highlight=False,
        )
        cfg = info["config"].train
        total = cfg.max_updates or (
            math.ceil(info["batches_per_epoch"] / cfg.accum_steps) * cfg.max_epochs if cfg.max_epochs else None
        )
        self.progress.start()
        self.task = self.progress.add_task(
            "train", total=total, completed=info["resumed_at"], epoch="-", loss="-", ppl="-", lr="-", speed="-"
        )

    def logged(self, record: dict[str, Any]) -> None:
        self.progress.update(
            self.task,
            completed=record["update"],
            epoch=record["epoch"],
            loss=f"{record['loss']:.3f}",
            ppl=f"{record['ppl']:.2f}",
            lr=f"{record['lr']:.2e}",
            speed=human(record["tokens_per_s"]),
        )
        if not self.progress.live.is_started or self.progress.disable:
            err_console.print(
                f"update {record['update']} epoch {record['epoch']} loss {record['loss']:.3f} ppl {record['ppl']:.2f} "
                f"lr {record['lr']:.2e} {human(record['tokens_per_s'])} tok/s",
                highlight=False,
            )

    def validated(self, record: dict[str, Any]) -> None:
        scores = "".join(f" {k} {record[k]:.2f}" for k in ("bleu", "chrf") if k in record)
        mark = " *" if record.get("improved") else ""
        self.progress.console.print(
            f"valid @ update {record['update']}: loss {record['loss']:.3f} ppl {record['ppl']:.2f}{scores}{mark}",
            highlight=False,
        )

    def message(self, text: str) -> None:
        self.progress.console.print(text, highlight=False, markup=False)

    def stop(self) -> None:
        self.progress.stop()


def resolve_config(config_file: Path | None, model: str | None, overrides: list[str], resume_from: Path | None) -> Config:
    """Defaults, the model family's defaults and the config file (or a resumed run's stored config), then --set overrides."""
    config = Config()
    if resume_from is not None:
        config = load_checkpoint(resume_from).config
    else:
        if model is not None:
            merge(config, defaults_for(model))
        if config_file is not None:
            merge(config, load_config(config_file))
    merge(config, parse_overrides(overrides))
    return config


@handle_errors
def train(
    config_file: Annotated[Path | None, typer.Option("--config", "-c", help="TOML config with [model], [train] and [decode] tables.")] = None,
    data: Annotated[Path | None, typer.Option(help="Prepared data directory (from `nmt prepare`); sets train.data.")] = None,
    run_dir: Annotated[Path | None, typer.Option(help="Where checkpoints and metrics go; sets train.run_dir.")] = None,
    model: Annotated[str | None, typer.Option(help="Start from the defaults of transformer, lstm, gru or rnn.")] = None,
    overrides: Annotated[list[str] | None, typer.Option("--set", "-s", help="Override any option: section.key=value, e.g. train.lr=0.001 (repeatable).")] = None,
    max_updates: Annotated[int | None, typer.Option(help="Stop after this many updates; sets train.max_updates.")] = None,
    max_minutes: Annotated[float | None, typer.Option(help="Stop after this much training time; sets train.max_minutes.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N or mps; sets train.device.")] = None,
    precision: Annotated[str | None, typer.Option(help="auto, fp32, bf16 or fp16; sets train.precision.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --run-dir (or train.run_dir) from its latest checkpoint, exactly.")] = False,
    reset: Annotated[list[str] | None, typer.Option("--reset", help="With --resume: start afresh the optimizer, the scheduler's plateau state or the best score (repeatable).")] = None,
) -> None:
    """Train a Transformer or LSTM/GRU/RNN model; resumable, with validation BLEU and checkpoints."""
    sets = list(overrides or [])
    for name, value in (("data", data), ("run_dir", run_dir), ("max_updates", max_updates),
                        ("max_minutes", max_minutes), ("device", device), ("precision", precision)):
        if value is not None:
            sets.append(f"train.{name}={_literal(value)}")
    resume_from = None
    if resume and (config_file is not None or model is not None):
        raise fail("--resume continues a run with its stored config: drop --config/--model (use --set for limits)")
    if resume:
        directory = run_dir or (Path(resolve_config(config_file, model, sets, None).train.run_dir))
        resume_from = latest_checkpoint(directory)
        if resume_from is None:
            raise fail(f"{directory}: no checkpoint to resume from")
    elif reset:
        raise fail("--reset only makes sense with --resume")
    config = resolve_config(config_file, model, sets, resume_from)
    if not config.train.data:
        raise fail("no training data: pass --data DIR (a directory written by `nmt prepare`)")
    if not resume and latest_checkpoint(Path(config.train.run_dir)) is not None:
        raise fail(f"{config.train.run_dir} already holds checkpoints: use --resume to continue or another --run-dir")
    monitor = RichMonitor()
    try:
        trainer = Trainer(config, monitor=monitor, resume=resume, reset=tuple(reset or ()))
        result = trainer.train()
    finally:
        monitor.stop()
    if not trainer.dist.is_main:
        return
    rows: list[tuple[str, Any]] = [
        ("stopped because", result.stop_reason.replace("_", " ")),
        ("updates", result.updates),
        ("epochs finished", result.epochs_finished),
        ("target tokens", result.target_tokens),
        ("time", f"{result.seconds / 60:.1f} min"),
        ("target tokens/s", f"{result.target_tokens / max(result.seconds, 1e-9):,.0f}"),
    ]
    if result.last_validation:
        for key in ("loss", "ppl", "bleu", "chrf"):
            if key in result.last_validation:
                rows.append((f"last valid {key}", f"{result.last_validation[key]:.2f}"))
    if result.best is not None:
        rows.append((f"best valid {config.train.best_metric}", f"{result.best:.2f}"))
    rows.append(("last checkpoint", str(result.last_checkpoint)))
    if result.best_checkpoint:
        rows.append(("best checkpoint", str(result.best_checkpoint)))
    console.print(summary_table("Training", rows))
    if result.stop_reason == "interrupted":
        raise typer.Exit(130)


def _literal(value: object) -> str:
    """A CLI value as a TOML literal for parse_overrides."""
    if isinstance(value, (Path, str)):
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)
