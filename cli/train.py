"""`nmt train`: train a Transformer or a recurrent model on data from `nmt prepare`."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from cli.common import console, err_console, handle_errors, human, summary_table
from nmt.config import resolve, to_toml
from nmt.device import tune_cpu
from nmt.progress import Advance
from nmt.train import Selection, Trainer, TrainResult
from nmt.train.sizing import free_options

SIGNAL_EXIT_CODES = {"interrupted": 130, "terminated": 143}  # 128 + SIGINT, 128 + SIGTERM, as shells report them


class RichMonitor:
    """Shows training as a progress bar with loss, perplexity, rate and tokens/s, validation decoding as a
    second bar while it runs, and validations as lines."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=err_console,
            disable=not err_console.is_terminal and not os.environ.get("NMT_PROGRESS"),
        )
        self.train_task: Any = None

    def started(self, info: dict[str, Any]) -> None:
        err_console.print(to_toml(info["config"]), highlight=False, markup=False)
        err_console.print(
            f"{info['parameters']:,} parameters on {info['device']} ({info['threads']} threads, "
            f"{info['world_size']} process(es)); precision {info['precision']}; "
            f"{info['train_examples']:,} training pairs, {info['batches_per_epoch']:,} batches per epoch",
            highlight=False,
        )
        cfg = info["config"].train
        total = cfg.max_updates or (
            math.ceil(info["batches_per_epoch"] / cfg.accum_steps) * cfg.max_epochs if cfg.max_epochs else None
        )
        self.progress.start()
        self.train_task = self.progress.add_task("epoch -", total=total, completed=info["resumed_at"], stats="loss -")

    def logged(self, record: dict[str, Any]) -> None:
        stats = (f"loss {record['loss']:.3f} ppl {record['ppl']:.2f} lr {record['lr']:.2e} "
                 f"{human(record['tokens_per_s'])} tok/s")
        self.progress.update(self.train_task, completed=record["update"], description=f"epoch {record['epoch']}",
                             stats=stats)
        if not self.progress.live.is_started or self.progress.disable:
            err_console.print(f"update {record['update']} epoch {record['epoch']} {stats}", highlight=False)

    def validated(self, record: dict[str, Any]) -> None:
        scores = "".join(f" {k} {record[k]:.2f}" for k in ("bleu", "chrf") if k in record)
        mark = " *" if record.get("improved") else ""
        self.progress.console.print(
            f"valid @ update {record['update']}: loss {record['loss']:.3f} ppl {record['ppl']:.2f}{scores}{mark}",
            highlight=False,
        )

    def message(self, text: str) -> None:
        self.progress.console.print(text, highlight=False, markup=False)

    def task(self, description: str, total: float | None = None, unit: str = "lines") -> Advance:
        """Validation decoding: a second bar that goes away when done (one line where no bar is drawn)."""
        if self.progress.disable:
            err_console.print(f"{description}: {total:,.0f} {unit}", highlight=False)
        task_id = self.progress.add_task(description, total=total, stats=unit)
        left = total

        def advance(amount: float) -> None:
            nonlocal left
            self.progress.advance(task_id, amount)
            left = None if left is None else left - amount
            if left is not None and left <= 0:
                self.progress.remove_task(task_id)

        return advance

    def stop(self) -> None:
        self.progress.stop()


@handle_errors
def train(
    config_file: Annotated[Path | None, typer.Option(
        "--config", "-c", help="TOML config with [model], [train] and [decode] tables.")] = None,
    data: Annotated[Path | None, typer.Option(
        help="Prepared data directory (from `nmt prepare`); sets train.data.")] = None,
    run_dir: Annotated[Path | None, typer.Option(help="Where checkpoints and metrics go; sets train.run_dir.")] = None,
    model: Annotated[str | None, typer.Option(help="Start from the defaults of transformer, lstm, gru or rnn.")] = None,
    overrides: Annotated[list[str] | None, typer.Option(
        "--set", "-s", help="Override any option: section.key=value, e.g. train.lr=0.001 (repeatable).")] = None,
    max_updates: Annotated[int | None, typer.Option(
        help="Stop after this many updates (0: no limit); sets train.max_updates.")] = None,
    max_minutes: Annotated[float | None, typer.Option(
        help="Stop after this many minutes, validation included (0: no limit); sets train.max_minutes.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N or mps; sets train.device.")] = None,
    precision: Annotated[str | None, typer.Option(help="auto, fp32, bf16 or fp16; sets train.precision.")] = None,
    init_from: Annotated[Path | None, typer.Option(
        help="Start a new run from this checkpoint's weights, model, decoding defaults and tokenizers (nmt's own, "
             "or from nmt import), with a fresh optimizer and schedule: fine-tuning; the data must come from nmt "
             "prepare --tokenizer-from it. Unless set, the rate is 1e-4 and the warm-up short (printed); "
             "sets train.init_from.")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue the run in --run-dir (or train.run_dir) from its latest checkpoint, exactly.",
    )] = False,
    reset: Annotated[list[str] | None, typer.Option(
        "--reset", help="With --resume: start afresh the optimizer, the scheduler's plateau state or the best score "
        "(repeatable).")] = None,
) -> None:
    """Train a Transformer or LSTM/GRU/RNN model; resumable, with validation BLEU and checkpoints.

    A Transformer's sizes, regularisation, warm-up and validation interval that no option sets are chosen
    from the corpus and the budget (printed at start); a bounded run's learning rate decays to its end.
    """
    sets = list(overrides or [])
    for name, value in (("data", data), ("run_dir", run_dir), ("init_from", init_from), ("max_updates", max_updates),
                        ("max_minutes", max_minutes), ("device", device), ("precision", precision)):
        if value is not None:
            sets.append(f"train.{name}={_literal(value)}")
    config = resolve(config_file, model, sets, resume=resume)
    tune_cpu(config.train.threads, processes=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    monitor = RichMonitor()
    try:
        trainer = Trainer(config, monitor=monitor, resume=resume, reset=tuple(reset or ()),
                          choose=free_options(config_file, model, sets))
        result = trainer.train()
    finally:
        monitor.stop()
    trainer.dist.close()
    if not trainer.dist.is_main:
        return
    console.print(summary_table("Training", _summary(result, config.train.best_metric)))
    if result.stop_reason in SIGNAL_EXIT_CODES:
        raise typer.Exit(SIGNAL_EXIT_CODES[result.stop_reason])


def _summary(result: TrainResult, best_metric: str) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = [
        ("stopped because", result.stop_reason.replace("_", " ")),
        ("updates", result.updates),
        ("epochs finished", result.epochs_finished),
        ("target tokens", result.target_tokens),
        ("time", f"{_duration(result.seconds)} ({_duration(result.validation_seconds)} of it validating)"),
        ("target tokens/s", f"{result.tokens_per_second:,.0f} (training time only)"),
    ]
    if result.last_validation:
        for key in ("loss", "ppl", "bleu", "chrf"):
            if key in result.last_validation:
                rows.append((f"last valid {key}", f"{result.last_validation[key]:.2f}"))
    if result.best is not None:
        rows.append((f"best valid {best_metric}", f"{result.best:.2f}"))
    rows.append(("last checkpoint", str(result.last_checkpoint)))
    if result.best_checkpoint:
        rows.append(("best checkpoint", str(result.best_checkpoint)))
    if result.selection:
        rows.extend(_selection_rows(result.selection))
    return rows


def _selection_rows(selection: Selection) -> list[tuple[str, Any]]:
    """What the final selection chose, on which sentences, and every candidate's valid BLEU."""
    chosen = selection.chosen
    scores = "\n".join(f"{s.bleu:6.2f}  {s.candidate}, alpha {s.alpha}{'  (chosen)' if s == chosen else ''}"
                       for s in selection.scores)
    return [
        ("final checkpoint", f"{selection.final_path}: {chosen.candidate}, alpha {chosen.alpha}"),
        ("chosen on", f"{selection.sentences.describe()}, beam {selection.beam}"),
        ("valid BLEU", scores),
    ]


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _literal(value: object) -> str:
    """A CLI value as a TOML literal for parse_overrides."""
    if isinstance(value, (Path, str)):
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)
