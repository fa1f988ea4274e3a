"""The final selection: final.pt, selection.json, which valid sentences it reads, determinism, skips.

Runs of two updates on the toy data: what they translate is noise, so no test asserts a score;
where a decision must be tested, the scores are scripted.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import nmt.train.selection as selection_module
from cli.main import app
from cli.train import _summary
from nmt.checkpoint import load_checkpoint
from nmt.config import Config, merge, parse_overrides
from nmt.data import PreparedData, Sources, TextFiles, prepare, source_ids
from nmt.distributed import Distributed
from nmt.evaluate import MetricScore
from nmt.tokenizer import Tokenizer
from nmt.train import Trainer, select_final
from nmt.train.selection import Sentences, candidates, select_after_training, selection_sentences
from nmt.translate import Translator
from tests.conftest import TINY_TRANSFORMER, make_parallel
from tests.test_train import RecordingMonitor

SELECT = ["train.select_final=true", "train.select_max_sentences=6", "train.max_updates=2", "train.valid_every=1",
          "train.valid_max_sentences=4", "decode.max_len_a=0.5", "decode.max_len_b=4"]  # short outputs: fast
LSTM = ["model.arch=rnn", "model.embed_dim=32", "model.hidden_size=32", "model.enc_layers=1", "model.dec_layers=1"]
GRID = (0.6, 1.0, 1.4)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """What train.threads=1 sets in the CLI: these tiny models only wait on a second thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Recorder(RecordingMonitor):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def message(self, text: str) -> None:
        self.messages.append(text)


def config_for(data: Path, run: Path, *extra: str) -> Config:
    config = Config()
    merge(config, parse_overrides([*TINY_TRANSFORMER, *SELECT, f'train.data="{data}"', f'train.run_dir="{run}"',
                                   *extra]))
    return config


def scripted_bleu(monkeypatch: pytest.MonkeyPatch, values: list[float]) -> None:
    """Replace the selection's scorer: the k-th (candidate, alpha) pair scores values[k]."""
    calls = iter(values)
    monkeypatch.setattr(selection_module, "corpus_scores",
                        lambda hyps, refs, metrics: {"bleu": MetricScore("bleu", "BLEU", next(calls), "sig")})


@pytest.mark.parametrize("model", ["transformer", "lstm"])
def test_final_pt_holds_the_chosen_weights_and_alpha(toy_data: Path, tmp_path: Path, model: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    scripted_bleu(monkeypatch, [1.0, 2.0, 3.0, 3.0, 9.0, 9.0])  # average of last 2 with alpha 1.0 (first of equals)
    monitor, run = Recorder(), tmp_path / "run"
    result = Trainer(config_for(toy_data, run, *(LSTM if model == "lstm" else [])), monitor=monitor).train()
    chosen = result.selection.chosen
    assert (chosen.candidate, chosen.alpha, chosen.bleu) == ("average of last 2", 1.0, 9.0)
    final = load_checkpoint(run / "final.pt")
    assert final.config.decode.alpha == 1.0 and final.train_state is None
    assert Translator.from_checkpoint(run / "final.pt", device="cpu", precision="fp32").decode.alpha == 1.0
    averaged = candidates(run, 5)[1].load().model_state
    assert all(torch.equal(final.model_state[k], averaged[k]) for k in averaged)
    assert ["final selection", 2 * 3 * 6, "sentences", 36] in monitor.tasks
    assert monitor.messages[-1] == f"final selection: average of last 2, alpha 1.0 (valid BLEU 9.00) -> {run}/final.pt"
    record = json.loads((run / "selection.json").read_text())
    assert [(s["candidate"], s["alpha"], s["bleu"]) for s in record["scores"]] == [
        ("best", 0.6, 1.0), ("best", 1.0, 2.0), ("best", 1.4, 3.0),
        ("average of last 2", 0.6, 3.0), ("average of last 2", 1.0, 9.0), ("average of last 2", 1.4, 9.0)]
    assert record["chosen"] == {"candidate": "average of last 2", "alpha": 1.0, "bleu": 9.0}
    assert record["candidates"] == {"best": ["best.pt"],
                                    "average of last 2": ["update_00000001.pt", "update_00000002.pt"]}
    rows = dict(_summary(result, "bleu"))
    assert rows["final checkpoint"] == f"{run}/final.pt: average of last 2, alpha 1.0"
    assert rows["valid BLEU"].splitlines()[4] == "  9.00  average of last 2, alpha 1.0  (chosen)"


def test_choosing_is_deterministic_and_lists_every_candidate(toy_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = Trainer(config_for(toy_data, run, "decode.alpha=0.8")).train().selection
    final = load_checkpoint(run / "final.pt").model_state
    again = select_final(run)  # on its own: config and data from the run's checkpoints
    assert (again.chosen, again.scores, again.sentences) == (first.chosen, first.scores, first.sentences)
    assert [(s.candidate, s.alpha) for s in first.scores] == [
        (name, alpha) for name in ("best", "average of last 2") for alpha in (0.6, 0.8, 1.0, 1.4)]
    assert max(first.scores, key=lambda s: s.bleu) == first.chosen
    assert all(torch.equal(final[k], v) for k, v in load_checkpoint(run / "final.pt").model_state.items())
    record = json.loads((run / "selection.json").read_text())
    assert len(record["scores"]) == 8 and record["chosen"]["alpha"] == first.chosen.alpha
    assert record["sentences"]["held_out"] is False  # 40 valid sentences: too few to hold out 200


def test_the_averaged_candidate_equals_nmt_average(toy_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    Trainer(config_for(toy_data, run, "train.max_updates=3", "train.select_final=false")).train()
    result = CliRunner().invoke(app, ["average", str(run), "--last", "5", "-o", str(tmp_path / "avg.pt")])
    assert result.exit_code == 0, result.output
    expected = load_checkpoint(tmp_path / "avg.pt").model_state
    found = candidates(run, 5)
    assert [c.name for c in found] == ["best", "average of last 3"]
    averaged = found[1].load().model_state
    assert averaged.keys() == expected.keys()
    assert all(torch.equal(averaged[k], expected[k]) for k in expected)


@pytest.mark.parametrize(("size", "config", "expected"), [
    (1014, [], (500, 1000, True)),  # Multi30k's valid: the 514 after the first 500, capped at 500
    (700, [], (500, 700, True)),
    (699, [], (0, 500, False)),  # only 199 after them
    (1014, ["train.valid_max_sentences=0"], (0, 500, False)),  # training decoded all of valid
    (1014, ["train.best_metric=loss"], (0, 500, False)),  # best.pt chosen on the loss of all of valid
    (1014, ["train.select_max_sentences=0"], (500, 1014, True)),
])
def test_which_valid_sentences_the_selection_decodes(size: int, config: list[str],
                                                     expected: tuple[int, int, bool]) -> None:
    sentences = selection_sentences(size, merge(Config(), parse_overrides(config)))
    assert (sentences.first, sentences.stop, sentences.held_out) == expected


def test_it_reads_only_the_valid_sentences_after_trainings(joint_spm: Path, corpus_dir: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A valid set with 200 sentences after training's 10: the selection decodes and scores only those
    (its cap: 6), and never opens the data's test split (removed from disk before it runs)."""
    files = {}
    for split, n, seed in (("valid", 210 + 6, 5), ("test", 30, 6)):
        src, tgt = make_parallel(n, seed)
        for side, lines in (("en", src), ("de", tgt)):
            files[split, side] = tmp_path / f"{split}.{side}"
            files[split, side].write_text("\n".join(lines) + "\n", encoding="utf-8")
    tokenizer = Tokenizer.load(joint_spm)
    data = tmp_path / "data"
    prepare(data, Sources(train=TextFiles(corpus_dir / "train.en", corpus_dir / "train.de"),
                          valid=TextFiles(files["valid", "en"], files["valid", "de"]),
                          test=TextFiles(files["test", "en"], files["test", "de"])), (tokenizer, tokenizer))
    run = tmp_path / "run"
    Trainer(config_for(data, run, "train.valid_max_sentences=10", "train.select_final=false")).train()
    for path in (data / "test").iterdir():
        path.unlink()
    opened, decoded, scored = [], [], []
    split = PreparedData.split
    monkeypatch.setattr(PreparedData, "split", lambda self, name: opened.append(name) or split(self, name))
    translate_ids = selection_module.translate_ids
    monkeypatch.setattr(selection_module, "translate_ids",
                        lambda model, sources, *rest: decoded.extend(sources) or translate_ids(model, sources, *rest))
    corpus_scores = selection_module.corpus_scores
    monkeypatch.setattr(selection_module, "corpus_scores",
                        lambda hyps, refs, metrics: scored.append(refs) or corpus_scores(hyps, refs, metrics))
    chosen = select_final(run)
    assert opened == ["valid"]
    assert chosen.sentences == Sentences(10, 16, True, "after the first 10, which chose best.pt; capped at "
                                                       "train.select_max_sentences=6")
    valid = PreparedData.open(data).split("valid")
    expected = [source_ids(valid[i][0]) for i in range(10, 16)]
    assert len(decoded) == 2 * 3 * 6 and sorted(decoded) == sorted(expected * 6)
    assert scored == [valid.references()[10:16]] * 6


def test_without_valid_data_or_checkpoints_it_says_so_in_one_line(joint_spm: Path, corpus_dir: Path,
                                                                 tmp_path: Path) -> None:
    tokenizer = Tokenizer.load(joint_spm)
    data = tmp_path / "data"
    prepare(data, Sources(train=TextFiles(corpus_dir / "train.en", corpus_dir / "train.de")), (tokenizer, tokenizer))
    monitor, run = Recorder(), tmp_path / "run"
    config = config_for(data, run, "train.max_updates=1", "train.valid_bleu=false", "train.best_metric=loss")
    result = Trainer(config, monitor=monitor).train()
    assert result.selection is None and not (run / "final.pt").exists()
    selecting = [m for m in monitor.messages if m.startswith("final selection")]
    assert selecting == [f"final selection skipped: {data} has no valid split to choose on"]
    empty = Recorder()
    assert select_final(tmp_path / "empty", monitor=empty) is None
    assert empty.messages == [f"final selection skipped: no checkpoints in {tmp_path / 'empty'}"]
    stopped = Recorder()
    cpu = torch.device("cpu")
    assert select_after_training(config, PreparedData.open(data), "interrupted", Distributed(), cpu, None,
                                 stopped) is None
    assert stopped.messages == ["final selection skipped: training was interrupted; resuming the run ends with it"]
    assert select_after_training(config, PreparedData.open(data), "max_updates", Distributed(rank=1, world_size=2),
                                 cpu, None, stopped) is None  # only rank 0 selects
    assert len(stopped.messages) == 1
