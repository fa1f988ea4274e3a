"""recipes/bench/quality.py without training: the seeded subsample, the cell list and what a rerun skips."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes" / "bench"))
import quality


def test_subsample_is_seeded_sorted_and_nested() -> None:
    ten = quality.subsample_indices(1_000, 100)
    assert ten == quality.subsample_indices(1_000, 100) == sorted(set(ten)) and len(ten) == 100
    assert set(quality.subsample_indices(1_000, 30)) <= set(ten)  # 3k is part of 10k
    assert ten != quality.subsample_indices(1_000, 100, seed=2)
    with pytest.raises(ValueError, match="cannot take 2,000 training pairs out of 1,000"):
        quality.subsample_indices(1_000, 2_000)


def test_sizes_and_cell_order() -> None:
    assert [quality.size_pairs(s) for s in ("full", "10k", "3k", "2.5k", "700")] == [None, 10_000, 3_000, 2_500, 700]
    with pytest.raises(ValueError, match="not a training size"):
        quality.size_pairs("1.2345k")
    names = [c.name for c in quality.cells(["transformer"], ["de", "fr"], ["10k"], [20, 2.5], ["today", "auto"])]
    assert names[:3] == ["transformer-de-10k-20min-today", "transformer-de-10k-20min-auto",
                         "transformer-de-10k-2.5min-today"] and len(names) == 8
    today, auto = quality.cells(["lstm"], ["cs"], ["full"], [10], ["today", "auto"])
    assert (today.data_name, auto.data_name) == ("cs-full-8000", "cs-full-auto")


def corpus(shared: Path, pair: str = "de", lines: int = 50) -> Path:
    folder = shared / f"multi30k-en-{pair}"
    folder.mkdir(parents=True)
    for split in ("train", "valid", "test2016"):
        for lang in ("en", pair):
            (folder / f"{split}.{lang}").write_text("".join(f"{lang} {split} {i}\n" for i in range(lines)))
    return folder


def test_subsampled_training_text_keeps_pairs_aligned(tmp_path: Path) -> None:
    corpus(tmp_path / "shared")
    bench = quality.Bench(tmp_path / "shared", tmp_path / "work")
    src, tgt = bench.train_files("de", "0.02k")
    en, de = src.read_text().splitlines(), tgt.read_text().splitlines()
    assert len(en) == 20 and [line.split()[-1] for line in en] == [line.split()[-1] for line in de]
    assert [int(line.split()[-1]) for line in en] == quality.subsample_indices(50, 20)
    assert bench.train_files("de", "full")[0] == tmp_path / "shared" / "multi30k-en-de" / "train.en"


def run_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> list[str]:
    monkeypatch.setattr(sys, "argv", ["quality.py", *args])
    quality.main()
    return capsys.readouterr().out.splitlines()


def test_dry_run_lists_cells_and_what_is_finished(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    shared, work = tmp_path / "shared", tmp_path / "work"
    assert run_main(monkeypatch, capsys, "--shared-data", str(shared)) == [f"no Multi30k corpora in {shared}: "
                                                                           "nothing to do"]
    corpus(shared)
    finished = work / "results" / "transformer-de-3k-10min-today.json"
    finished.parent.mkdir(parents=True)
    finished.write_text(json.dumps({}))
    lines = run_main(monkeypatch, capsys, "--shared-data", str(shared), "--work", str(work), "--pairs", "de,fr",
                     "--sizes", "3k", "--minutes", "10", "--dry-run")
    assert lines[0] == f"skipped: {shared / 'multi30k-en-fr'} is absent"
    assert [line.split() for line in lines[1:]] == [["transformer-de-3k-10min-today", "done"],
                                                    ["transformer-de-3k-10min-auto", "to", "run"]]
    assert not (work / "data").exists() and not (work / "corpora").exists()
    with pytest.raises(SystemExit):
        run_main(monkeypatch, capsys, "--variants", "tomorrow", "--dry-run")
