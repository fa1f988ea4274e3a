"""What one decoding step costs: operators dispatched (deterministic) and, if asked, milliseconds.

    python recipes/bench/step_profile.py --model work/quickstart/transformer/averaged.pt   # counts only
    python recipes/bench/step_profile.py --model ... --time                               # and ms per step
    python recipes/bench/step_profile.py --model ... --time --ctranslate2   # and raw CTranslate2's, same batches

At d_model 256 a step is bound by per-operator overhead, not arithmetic, so the number of aten operators a
step dispatches is the measure that does not drift with the machine's load. Every sentence is made to run
exactly `steps` steps (min_len = max_len), and a step's cost is the difference between a search of
2 x `steps` and one of `steps` steps, divided by `steps`: encoding and the final sort cancel out. Operators
are split into those of the model's `step` (the decoder) and the rest (the search's bookkeeping, state
reordering included). With `--ctranslate2` the checkpoint is exported and raw CTranslate2's
`translate_batch` is timed the same way on the same batches (min = max decoding length, 2 threads): where the
two differ per step, and not in how many steps they take.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from common import print_table
from nmt.config import DecodeConfig
from nmt.device import tune_cpu
from nmt.export import ExportedModel, export_checkpoint, pieces
from nmt.search import search
from nmt.translate import Translator

BATCHES = (1, 16, 128)
SEARCHES = {"greedy": {"beam": 1}, "beam 5": {"beam": 5}}


class OperatorCounter(TorchDispatchMode):
    """Counts aten operators, split by whether the model's `step` is running."""

    def __init__(self) -> None:
        super().__init__()
        self.inside_step = False
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.counts["model" if self.inside_step else "search"] += 1
        return func(*args, **(kwargs or {}))


class CountedModel:
    """The model interface, marking the counter while `step` runs."""

    def __init__(self, model: torch.nn.Module, counter: OperatorCounter) -> None:
        self.model, self.counter, self.max_positions = model, counter, model.max_positions

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor) -> Any:
        return self.model.encode(src, src_mask)

    def init_state(self, memory: Any, src_mask: torch.Tensor, **options: bool) -> Any:
        return self.model.init_state(memory, src_mask, **options)

    def step(self, tokens: torch.Tensor, state: Any) -> Any:
        self.counter.inside_step = True
        try:
            return self.model.step(tokens, state)
        finally:
            self.counter.inside_step = False

    def reorder_state(self, state: Any, rows: torch.Tensor, sentences: torch.Tensor | None = None) -> Any:
        return self.model.reorder_state(state, rows, sentences)


def fixed_length(decode: DecodeConfig, steps: int, **options: Any) -> DecodeConfig:
    """The run's options with every output exactly `steps` tokens long."""
    return replace(decode, max_len_a=0.0, max_len_b=steps, min_len=steps, nbest=1, early_stop=False, **options)


def synthetic_batch(sentences: int, length: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    src = torch.randint(4, vocab, (sentences, length), generator=torch.Generator().manual_seed(sentences))
    return src, torch.ones(src.shape, dtype=torch.bool)


def operators_per_step(model: torch.nn.Module, src: torch.Tensor, mask: torch.Tensor, decode: DecodeConfig,
                       steps: int) -> dict[str, float]:
    """Operators one step dispatches, in the model and in the search."""
    counts = []
    for total in (steps, 2 * steps):
        counter = OperatorCounter()
        with counter:
            search(CountedModel(model, counter), src, mask, fixed_length(decode, total))
        counts.append(counter.counts)
    return {part: (counts[1][part] - counts[0][part]) / steps for part in ("model", "search")}


def best_ms_per_step(run: Callable[[int], object], steps: int, repeats: int = 3) -> float:
    """Milliseconds per step of `run(total)`, a search whose outputs are all `total` tokens long: the
    difference between 2 x `steps` and `steps`, each the best of `repeats` after an untimed one."""
    best = []
    for total in (steps, 2 * steps):
        run(total)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run(total)
            times.append(time.perf_counter() - start)
        best.append(min(times))
    return 1000 * (best[1] - best[0]) / steps


def ms_per_step(model: torch.nn.Module, src: torch.Tensor, mask: torch.Tensor, decode: DecodeConfig,
                steps: int) -> float:
    """nmt's milliseconds per step."""
    return best_ms_per_step(lambda total: search(model, src, mask, fixed_length(decode, total)), steps)


def ctranslate2_ms_per_step(engine: Any, tokens: list[list[str]], beam: int, steps: int) -> float:
    """Raw CTranslate2's milliseconds per step on the same sentences."""
    def run(total: int) -> object:
        return engine.translate_batch(tokens, beam_size=beam, max_batch_size=len(tokens), min_decoding_length=total,
                                      max_decoding_length=total, max_input_length=0)

    return best_ms_per_step(run, steps)


def profile(model: torch.nn.Module, vocab: int, decode: DecodeConfig, timed: bool, steps: int = 12,
            source_length: int = 16, ctranslate2: tuple[Any, list[str]] | None = None) -> list[dict[str, Any]]:
    """One row per search and batch size (sentences; beam 5 searches five rows per sentence); `ctranslate2`,
    an engine and the source pieces by id, adds its time per step."""
    rows = []
    for name, options in SEARCHES.items():
        for sentences in BATCHES:
            src, mask = synthetic_batch(sentences, source_length, vocab)
            run = replace(decode, **options)
            with torch.inference_mode():
                ops = operators_per_step(model, src, mask, run, steps)
                row: dict[str, Any] = {"search": name, "sentences": sentences, "ops/step": ops["model"] + ops["search"],
                                       "model ops": ops["model"], "search ops": ops["search"]}
                if timed:
                    row["ms/step"] = ms_per_step(model, src, mask, run, steps)
                if timed and ctranslate2:
                    engine, src_pieces = ctranslate2
                    tokens = [[src_pieces[i] for i in sentence] for sentence in src.tolist()]
                    row["CTranslate2 ms/step"] = ctranslate2_ms_per_step(engine, tokens, run.beam, steps)
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--time", action="store_true", help="also time the steps (load-sensitive)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--ctranslate2", action="store_true", help="with --time: raw CTranslate2 beside nmt")
    args = parser.parse_args()
    threads = tune_cpu(args.threads)
    translator = Translator.from_checkpoint(args.model, device="cpu", precision="fp32")
    with tempfile.TemporaryDirectory() as tmp:
        engine = None
        if args.ctranslate2:
            import ctranslate2

            folder = export_checkpoint(args.model, Path(tmp) / "ct2")
            engine = (ctranslate2.Translator(str(folder), device="cpu", compute_type="float32", intra_threads=threads),
                      pieces(ExportedModel(folder).src_tokenizer))
        rows = profile(translator.model, translator.checkpoint.config.model.src_vocab_size, translator.decode,
                       args.time, ctranslate2=engine)
    columns = ["search", "sentences", "ops/step", "model ops", "search ops"] + (["ms/step"] if args.time else [])
    columns += ["CTranslate2 ms/step"] if args.time and args.ctranslate2 else []
    print_table("One decoding step (12-step difference, source length 16)", rows, columns)


if __name__ == "__main__":
    main()
