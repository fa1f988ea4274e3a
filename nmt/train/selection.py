"""The model to use: at the end of training, choose the weights and the length penalty on valid, write final.pt.

The candidates are best.pt (the best validation during training) and the average of the last
`train.keep_last` update checkpoints (Vaswani et al. 2017; about +1 BLEU in fairseq's
reproductions). Each is decoded with the run's beam for every length penalty alpha of a small
grid (the run's own alpha included; beam 1 has no use for one), and the pair with the highest
valid BLEU wins; a tie goes to the earlier pair (best.pt first, smaller alpha first). final.pt is
an inference checkpoint of the chosen weights with the chosen alpha as its decode default, so
`nmt translate -m final.pt` uses it; selection.json keeps every candidate's score.

Which sentences: training's validation BLEU, which chose best.pt and drives early stopping,
decodes only the first `train.valid_max_sentences` of valid. Choosing again on those sentences
would reward best.pt for the noise it was picked on, so the selection decodes the sentences after
them when at least MIN_HELD_OUT are left; otherwise (a small valid set, BLEU on all of valid, or
best.pt chosen on the loss of the whole set) it decodes valid from its start and says that the
sentences overlap. Test data is never read.

What bounds the cost: at most `train.select_max_sentences` sentences, each decoded with beam
search once per candidate and alpha (2 x 3 passes by default), with translation's length limits.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from nmt.checkpoint import Checkpoint, average_checkpoints, load_checkpoint
from nmt.config import Config, DecodeConfig
from nmt.data import EncodedSplit, PreparedData, source_ids
from nmt.device import autocast, resolve_device
from nmt.distributed import Distributed
from nmt.evaluate import corpus_scores
from nmt.io import atomic_path
from nmt.models import build_model
from nmt.train.monitor import Monitor, SilentMonitor
from nmt.train.run_directory import RunDirectory, last_checkpoints
from nmt.train.validator import BATCHES_PER_STEP, length_chunks
from nmt.translate import BATCH_TOKENS, one_line, translate_ids

ALPHAS = (0.6, 1.0, 1.4)  # the length penalty grid, besides the run's own decode.alpha
MIN_HELD_OUT = 200  # fewer valid sentences after training's BLEU ones than this: use valid from its start
SIGNALLED = ("interrupted", "terminated")


@dataclass(frozen=True)
class Candidate:
    """Weights the selection may choose: one checkpoint file, or the average of several."""

    name: str  # "best" or "average of last N"
    paths: tuple[Path, ...]

    def load(self) -> Checkpoint:
        """The candidate's weights, exactly as `nmt average` writes them when there are several files."""
        return load_checkpoint(self.paths[0]) if len(self.paths) == 1 else average_checkpoints(list(self.paths))


@dataclass(frozen=True)
class Score:
    candidate: str
    alpha: float
    bleu: float


@dataclass(frozen=True)
class Sentences:
    """The valid sentences decoded: [first, stop), and whether they are apart from training's BLEU ones."""

    first: int
    stop: int
    held_out: bool
    reason: str

    def describe(self) -> str:
        return f"valid sentences {self.first + 1}-{self.stop} ({self.reason})"


@dataclass
class Selection:
    """What the selection chose, on which sentences, and every candidate's valid BLEU."""

    chosen: Score
    scores: list[Score]
    candidates: list[Candidate]
    sentences: Sentences
    beam: int
    signature: str
    final_path: Path

    def as_record(self) -> dict[str, Any]:
        """selection.json: plain data, file names relative to the run directory."""
        return {
            "chosen": asdict(self.chosen),
            "scores": [asdict(score) for score in self.scores],
            "candidates": {c.name: [p.name for p in c.paths] for c in self.candidates},
            "sentences": asdict(self.sentences),
            "beam": self.beam,
            "metric": "bleu",
            "signature": self.signature,
            "final": self.final_path.name,
        }


def candidates(run_dir: Path, keep_last: int) -> list[Candidate]:
    """best.pt and the average of the last `keep_last` update checkpoints (where there are two or more);
    the latest update checkpoint alone when there is neither."""
    run = RunDirectory(run_dir)
    found = [Candidate("best", (run.best_path,))] if run.best_path.is_file() else []
    last = last_checkpoints(run.path, keep_last)
    if len(last) >= 2:
        found.append(Candidate(f"average of last {len(last)}", tuple(last)))
    elif not found and last:
        found.append(Candidate("last", tuple(last)))
    return found


def selection_sentences(valid_size: int, config: Config, min_held_out: int = MIN_HELD_OUT) -> Sentences:
    """The valid sentences to choose on (see the module docstring for why)."""
    train = config.train
    trained_on = train.valid_max_sentences
    if train.best_metric not in ("bleu", "chrf"):
        first, held, reason = 0, False, f"best.pt was chosen on the {train.best_metric} of all of valid"
    elif trained_on and valid_size - trained_on >= min_held_out:
        first, held, reason = trained_on, True, f"after the first {trained_on}, which chose best.pt"
    elif trained_on:
        first, held = 0, False
        reason = (f"overlapping the first {trained_on}, which chose best.pt: only {max(valid_size - trained_on, 0)} "
                  f"after them, fewer than {min_held_out}")
    else:
        first, held, reason = 0, False, "overlapping the ones that chose best.pt: training decoded all of valid"
    cap = train.select_max_sentences
    stop = min(valid_size, first + cap) if cap else valid_size
    if stop < valid_size:
        reason += f"; capped at train.select_max_sentences={cap}"
    return Sentences(first, stop, held, reason)


def alpha_grid(decode: DecodeConfig) -> tuple[float, ...]:
    """The alphas tried: the grid and the run's own, ascending; only the run's own for greedy search."""
    return (decode.alpha,) if decode.beam == 1 else tuple(sorted({*ALPHAS, decode.alpha}))


def select_after_training(config: Config, data: PreparedData, stop_reason: str, dist: Distributed,
                          device: torch.device, amp_dtype: torch.dtype | None,
                          monitor: Monitor) -> Selection | None:
    """What the Trainer calls at the end of `train()`: rank 0 selects when `train.select_final` is on."""
    if not (config.train.select_final and dist.is_main):
        return None
    if stop_reason in SIGNALLED:
        monitor.message(f"final selection skipped: training was {stop_reason}; resuming the run ends with it")
        return None
    return select_final(Path(config.train.run_dir), data, config=config, device=device, amp_dtype=amp_dtype,
                        monitor=monitor)


def select_final(run_dir: Path, data: PreparedData | None = None, *, config: Config | None = None,
                 device: torch.device | str = "cpu", amp_dtype: torch.dtype | None = None,
                 monitor: Monitor | None = None) -> Selection | None:
    """Choose and write RUN_DIR/final.pt and selection.json; None (and one message line) where there is
    nothing to choose from or nothing to choose on. On its own (an existing run directory), the run's
    config comes from its latest checkpoint and the data from that config's train.data."""
    monitor = monitor or SilentMonitor()
    run = RunDirectory(Path(run_dir))
    config = config or _stored_config(run)
    found = candidates(run.path, config.train.keep_last) if config is not None else []
    if config is None or not found:
        monitor.message(f"final selection skipped: no checkpoints in {run.path}")
        return None
    data = data or PreparedData.open(Path(config.train.data))
    if not data.has_split("valid"):
        monitor.message(f"final selection skipped: {data.path} has no valid split to choose on")
        return None
    with run.lock():
        return _select(run, found, data.split("valid"), config, resolve_device(device) if isinstance(device, str)
                       else device, amp_dtype, monitor)


def _select(run: RunDirectory, found: list[Candidate], valid: EncodedSplit, config: Config, device: torch.device,
            amp_dtype: torch.dtype | None, monitor: Monitor) -> Selection:
    """Decode every candidate with every alpha, write the winner."""
    sentences = selection_sentences(len(valid), config)
    sources = [source_ids(valid[i][0]) for i in range(sentences.first, sentences.stop)]
    references = valid.references()[sentences.first:sentences.stop]
    alphas = alpha_grid(config.decode)
    monitor.message(f"final selection: {', '.join(c.name for c in found)} x alpha {', '.join(map(str, alphas))}, "
                    f"beam {config.decode.beam}, on {sentences.describe()}")
    advance = monitor.task("final selection", total=len(found) * len(alphas) * len(sources), unit="sentences")
    scores, signature, loaded = [], "", {}
    for candidate in found:
        loaded[candidate.name] = checkpoint = candidate.load()
        model = _model(checkpoint, device)
        for alpha in alphas:
            decode = replace(config.decode, alpha=alpha, nbest=1, sampling=False)
            hypotheses = _decode(model, checkpoint, sources, decode, device, amp_dtype, advance)
            bleu = corpus_scores(hypotheses, references, metrics=("bleu",))["bleu"]
            scores.append(Score(candidate.name, alpha, bleu.score))
            signature = bleu.signature
    chosen = max(scores, key=lambda score: score.bleu)  # max keeps the first of equals
    selection = Selection(chosen, scores, found, sentences, config.decode.beam, signature, run.final_path)
    _write(run, selection, loaded[chosen.candidate])
    monitor.message(f"final selection: {chosen.candidate}, alpha {chosen.alpha} (valid BLEU {chosen.bleu:.2f}) "
                    f"-> {run.final_path}")
    return selection


def _model(checkpoint: Checkpoint, device: torch.device) -> torch.nn.Module:
    model = build_model(checkpoint.config.model)
    model.load_state_dict(checkpoint.model_state)
    return model.to(device).eval()


@torch.inference_mode()
def _decode(model: torch.nn.Module, checkpoint: Checkpoint, sources: Sequence[Sequence[int]], decode: DecodeConfig,
            device: torch.device, amp_dtype: torch.dtype | None, advance: Any) -> list[str]:
    """Beam-search translations of `sources` in order, as `nmt translate` writes them; a few batches at a time
    for progress (a sentence translates the same in any batch)."""
    translated: list[str] = [""] * len(sources)
    for chunk in length_chunks(sources, BATCH_TOKENS * BATCHES_PER_STEP // max(decode.beam, 1)):
        with autocast(device, amp_dtype):
            results = translate_ids(model, [sources[i] for i in chunk], decode, BATCH_TOKENS, device)
        for index, found in zip(chunk, results, strict=True):
            translated[index] = one_line(checkpoint.tgt_tokenizer.decode(found[0].tokens))
        advance(len(chunk))
    return translated


def _write(run: RunDirectory, selection: Selection, checkpoint: Checkpoint) -> None:
    """final.pt (inference only: no training state; the chosen alpha as its decode default), then selection.json."""
    config = copy.deepcopy(checkpoint.config)
    config.decode.alpha = selection.chosen.alpha
    final = replace(checkpoint, config=config, train_state=None, metrics={"valid_bleu": selection.chosen.bleu})
    final.save(run.final_path)
    with atomic_path(run.selection_path) as tmp:
        tmp.write_text(json.dumps(selection.as_record(), indent=1) + "\n", encoding="utf-8")


def _stored_config(run: RunDirectory) -> Config | None:
    """The config of a run's latest update checkpoint (or best.pt): what it trained and rotated with."""
    path = run.latest() or (run.best_path if run.best_path.is_file() else None)
    return load_checkpoint(path).config if path is not None else None
