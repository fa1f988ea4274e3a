"""BLEU per CPU-minute: test BLEU of today's defaults and of the automatic ones, by corpus, size and time budget.

    python recipes/bench/quality.py [--pairs de,fr,cs] [--sizes full,10k,3k] [--minutes 10,20,30,60]
        [--variants today,auto] [--arch transformer,lstm] [--shared-data DIR] [--work DIR] [--dry-run]

A cell is one architecture, language pair (Multi30k English to German, French or Czech,
from --shared-data, default the shared/data folder beside the repository), training size
(all 29k pairs, or a seeded subsample of 10k or 3k; 3k is part of 10k; valid and test
unchanged), budget in minutes and variant:
- today: the shipped recipes/multi30k/{transformer,lstm}.toml on a joint 8k BPE, as
  recipes/multi30k/run.sh trains them;
- auto: what a user gets with nothing chosen: `nmt prepare --train-tokenizer` without a size,
  `nmt train --data D --run-dir R --max-minutes M` (with `--model lstm` for the LSTM).
Every step runs the `nmt` command as a user would, one cell at a time. Test2016 is translated
once, with the run's final.pt (the checkpoint and length penalty chosen on valid) where training
wrote one, else best.pt, and scored with sacreBLEU (detokenised, cased; signatures kept) and chrF.
The fp32 matrix-product ceiling is timed before and after each cell: this machine's speed drifts.

Resumable: each data variant is prepared once and reused; a finished cell leaves
WORK/results/CELL.json and is skipped; an interrupted training continues with `nmt train --resume`.
The table and WORK/quality.json cover every selected cell finished so far, each with the machine
it ran on. Logs of each cell's commands: WORK/cells/CELL/*.log.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import machine, matmul_gflops, print_table, write_json
from nmt.checkpoint import load_checkpoint
from nmt.io import atomic_path
from nmt.train.run_directory import BEST, latest_checkpoint

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes" / "multi30k"
PAIRS = ("de", "fr", "cs")
SIZES = ("full", "10k", "3k")
VARIANTS = ("today", "auto")
ARCHS = ("transformer", "lstm")
TODAY_VOCAB = 8000  # as recipes/multi30k/run.sh
SEED = 1
FINAL = "final.pt"
COLUMNS = ["arch", "pair", "size", "minutes", "variant", "vocab", "updates", "bleu", "chrf", "wall_min", "gflops",
           "checkpoint"]


@dataclass(frozen=True)
class Cell:
    arch: str
    pair: str
    size: str
    minutes: float
    variant: str

    @property
    def name(self) -> str:
        return f"{self.arch}-{self.pair}-{self.size}-{self.minutes:g}min-{self.variant}"

    @property
    def data_name(self) -> str:
        """The prepared data this cell trains on, shared by every cell of the same corpus and vocabulary."""
        return f"{self.pair}-{self.size}-{TODAY_VOCAB if self.variant == 'today' else 'auto'}"


def size_pairs(size: str) -> int | None:
    """`full` -> None (all pairs), `10k` -> 10000, `2500` -> 2500."""
    if size == "full":
        return None
    number = float(size[:-1]) * 1000 if size.lower().endswith("k") else float(size)
    if number < 1 or number != int(number):
        raise ValueError(f"not a training size: {size!r} (full, 10k, 3k or a number of pairs)")
    return int(number)


def cells(archs: list[str], pairs: list[str], sizes: list[str], minutes: list[float],
          variants: list[str]) -> list[Cell]:
    """Every selected cell; the variants of one setting run back to back, so they see the same machine."""
    return [Cell(arch, pair, size, budget, variant)
            for arch, pair, size, budget, variant in itertools.product(archs, pairs, sizes, minutes, variants)]


def subsample_indices(total: int, pairs: int, seed: int = SEED) -> list[int]:
    """A seeded sample of `pairs` line numbers in corpus order; a smaller sample is part of a larger one."""
    if pairs > total:
        raise ValueError(f"cannot take {pairs:,} training pairs out of {total:,}")
    order = list(range(total))
    random.Random(seed).shuffle(order)
    return sorted(order[:pairs])


class Bench:
    """Where the corpora, prepared data, runs and results of one work directory live, and how each is made."""

    def __init__(self, shared: Path, work: Path) -> None:
        self.shared, self.work = shared, work
        self.nmt = _nmt_command()

    def corpus(self, pair: str) -> Path:
        return self.shared / f"multi30k-en-{pair}"

    def result_path(self, cell: Cell) -> Path:
        return self.work / "results" / f"{cell.name}.json"

    def cell_dir(self, cell: Cell) -> Path:
        return self.work / "cells" / cell.name

    def status(self, cell: Cell) -> str:
        run = self.cell_dir(cell) / "run"
        if self.result_path(cell).is_file():
            return "done"
        if (self.cell_dir(cell) / "trained").is_file():
            return "trained: test to translate"
        return "to resume" if latest_checkpoint(run) else "to run"

    def train_files(self, pair: str, size: str) -> tuple[Path, Path]:
        """The training text of a size: the corpus's own files, or a subsample written once."""
        corpus = self.corpus(pair)
        src, tgt = corpus / "train.en", corpus / f"train.{pair}"
        pairs = size_pairs(size)
        if pairs is None:
            return src, tgt
        out = self.work / "corpora" / f"en-{pair}-{size}"
        sampled = out / src.name, out / tgt.name
        if not all(p.is_file() for p in sampled):
            lines = [p.read_text(encoding="utf-8").splitlines(keepends=True) for p in (src, tgt)]
            keep = subsample_indices(len(lines[0]), pairs)
            out.mkdir(parents=True, exist_ok=True)
            for text, path in zip(lines, sampled, strict=True):
                with atomic_path(path) as tmp:
                    tmp.write_text("".join(text[i] for i in keep), encoding="utf-8")
        return sampled

    def data(self, cell: Cell) -> Path:
        """`nmt prepare` once per corpus, size and vocabulary (today's 8k, or auto)."""
        out = self.work / "data" / cell.data_name
        if (out / "meta.json").is_file():
            return out
        corpus, (src, tgt) = self.corpus(cell.pair), self.train_files(cell.pair, cell.size)
        vocab = ["--vocab-size", str(TODAY_VOCAB)] if cell.variant == "today" else []
        self.run(["prepare", "-o", str(out), "--train-src", str(src), "--train-tgt", str(tgt),
                  "--valid-src", str(corpus / "valid.en"), "--valid-tgt", str(corpus / f"valid.{cell.pair}"),
                  "--test-src", str(corpus / "test2016.en"), "--test-tgt", str(corpus / f"test2016.{cell.pair}"),
                  "--train-tokenizer", *vocab], self.work / "data" / f"{cell.data_name}.log")
        return out

    def train(self, cell: Cell, data: Path) -> Path:
        """Train the cell's run (or resume it), unless it finished before; returns the run directory."""
        directory = self.cell_dir(cell)
        run, done = directory / "run", directory / "trained"
        if done.is_file():
            return run
        budget = ["--max-minutes", f"{cell.minutes:g}"]
        if latest_checkpoint(run):
            command = ["train", "--run-dir", str(run), "--resume", *budget]
        else:
            shutil.rmtree(run, ignore_errors=True)  # stopped before its first checkpoint: nothing to keep
            config = ["--config", str(RECIPES / f"{cell.arch}.toml")] if cell.variant == "today" else (
                ["--model", cell.arch] if cell.arch != "transformer" else [])
            command = ["train", *config, "--data", str(data), "--run-dir", str(run), *budget]
        self.run(command, directory / "train.log")
        done.write_text("")
        return run

    def test(self, cell: Cell, run: Path) -> dict[str, Any]:
        """Translate test2016 once with the chosen checkpoint, then score it."""
        directory, corpus = self.cell_dir(cell), self.corpus(cell.pair)
        checkpoint = next((p for p in (run / FINAL, run / BEST) if p.is_file()), None) or latest_checkpoint(run)
        hypotheses = directory / "test.hyp"
        if not hypotheses.is_file():
            started = time.perf_counter()
            self.run(["translate", "-m", str(checkpoint), "-i", str(corpus / "test2016.en"), "-o", str(hypotheses)],
                     directory / "translate.log")
            (directory / "translate.seconds").write_text(f"{time.perf_counter() - started:.1f}\n")
        scores = json.loads(self.run(["eval", "--hyp", str(hypotheses), "--ref", str(corpus / f"test2016.{cell.pair}"),
                                      "--metrics", "bleu,chrf", "--json"], directory / "eval.log"))["scores"]
        return {"checkpoint": checkpoint.name, "bleu": scores["bleu"]["score"], "chrf": scores["chrf"]["score"],
                "signatures": {name: score["signature"] for name, score in scores.items()},
                "translate_s": float((directory / "translate.seconds").read_text())}

    def run(self, args: list[str], log: Path) -> str:
        """One `nmt` command, its stderr appended to `log`; its stdout returned. A failure stops the bench."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a", encoding="utf-8") as handle:
            handle.write(f"$ nmt {' '.join(args)}\n")
            handle.flush()
            result = subprocess.run([*self.nmt, *args], stdout=subprocess.PIPE, stderr=handle, text=True)
            handle.write(result.stdout)
        if result.returncode in (130, 143):
            raise SystemExit(f"interrupted during nmt {args[0]}; run again to resume")
        if result.returncode:
            tail = "".join(log.read_text(encoding="utf-8").splitlines(keepends=True)[-15:])
            raise SystemExit(f"nmt {args[0]} failed (exit {result.returncode}); the end of {log}:\n{tail}")
        return result.stdout


def run_cell(bench: Bench, cell: Cell) -> dict[str, Any]:
    """Prepare (once), train (or resume), translate and score one cell; its row is saved as it finishes."""
    print(f"== {cell.name}: {bench.status(cell)} (logs in {bench.cell_dir(cell)})", flush=True)
    data = bench.data(cell)
    before = matmul_gflops()
    run = bench.train(cell, data)
    after = matmul_gflops()
    progress = load_checkpoint(latest_checkpoint(run)).train_state["progress"]
    meta = json.loads((data / "meta.json").read_text(encoding="utf-8"))
    row = {**vars(cell), "name": cell.name, "vocab": meta["tokenizer"]["src"]["vocab_size"],
           "train_pairs": meta["splits"]["train"]["examples"], "updates": progress["update"],
           "epochs": progress["epoch"] - 1, "valid_best": progress.get("best"),
           "wall_min": progress["elapsed"] / 60, "validation_min": progress["validation_seconds"] / 60,
           **bench.test(cell, run), "gflops_before": before, "gflops_after": after,
           "gflops": f"{before:.0f}->{after:.0f}", "machine": machine(), "run_dir": str(run)}
    write_json(bench.result_path(cell), row)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared-data", type=Path, default=ROOT.parent / "shared" / "data",
                        help="folder holding multi30k-en-{de,fr,cs} (default: shared/data beside the repository)")
    parser.add_argument("--work", type=Path, default=ROOT / "work" / "bench" / "quality")
    parser.add_argument("--pairs", default=",".join(PAIRS), help="target languages: de, fr, cs")
    parser.add_argument("--sizes", default=",".join(SIZES), help="full, or training pairs such as 10k, 3k")
    parser.add_argument("--minutes", default="10,20,30,60", help="training budgets")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="today, auto")
    parser.add_argument("--arch", default="transformer", help="transformer, lstm")
    parser.add_argument("--dry-run", action="store_true", help="list the selected cells and their state, run nothing")
    args = parser.parse_args()
    selected = _selection(parser, args)
    present = [p for p in dict.fromkeys(c.pair for c in selected) if (args.shared_data / f"multi30k-en-{p}").is_dir()]
    if not present:
        print(f"no Multi30k corpora in {args.shared_data}: nothing to do")
        return
    bench = Bench(args.shared_data, args.work)
    for pair in sorted({c.pair for c in selected} - set(present)):
        print(f"skipped: {bench.corpus(pair)} is absent")
    selected = [c for c in selected if c.pair in present]
    if args.dry_run:
        for cell in selected:
            print(f"{cell.name:40} {bench.status(cell)}")
        return
    for cell in selected:
        if not bench.result_path(cell).is_file():
            run_cell(bench, cell)
    rows = [json.loads(bench.result_path(c).read_text()) for c in selected if bench.result_path(c).is_file()]
    processors = ", ".join(sorted({row["machine"]["processor"] for row in rows}))
    print_table(f"BLEU per CPU-minute ({processors})", rows, COLUMNS)
    write_json(args.work / "quality.json", {"machine": machine(), "results": rows})


def _selection(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[Cell]:
    """The cells the flags select; an unknown value is a usage error."""
    lists = {name: [v.strip() for v in getattr(args, name).split(",") if v.strip()]
             for name in ("arch", "pairs", "sizes", "minutes", "variants")}
    for name, known in (("arch", ARCHS), ("pairs", PAIRS), ("variants", VARIANTS)):
        if unknown := [v for v in lists[name] if v not in known]:
            parser.error(f"--{name}: unknown {', '.join(unknown)} (choose from {', '.join(known)})")
    try:
        for size in lists["sizes"]:
            size_pairs(size)
        minutes = [float(m) for m in lists["minutes"]]
    except ValueError as exc:
        parser.error(str(exc))
    if any(m <= 0 for m in minutes):
        parser.error("--minutes: budgets must be positive")
    return cells(lists["arch"], lists["pairs"], lists["sizes"], minutes, lists["variants"])


def _nmt_command() -> list[str]:
    """The `nmt` console script beside this Python, else on PATH, else the module."""
    beside = Path(sys.executable).with_name("nmt")
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("nmt")
    return [found] if found else [sys.executable, "-m", "cli.main"]


if __name__ == "__main__":
    main()
