"""precision = "auto": chosen by measurement on CPUs with native bf16, with the timings injected here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import nmt.precision
from nmt.errors import NmtError
from nmt.models import build_model
from nmt.precision import Precision, cached_measurement, choose_precision, matrix_shapes, measure_matmul_gflops
from tests.copy_model import copy_config

CPU = torch.device("cpu")


def timings(fp32: float, bf16: float):
    calls: list[list[tuple[int, int, int]]] = []

    def measure(shapes):
        calls.append(list(shapes))
        return {"fp32": fp32, "bf16": bf16}

    return measure, calls


@pytest.mark.parametrize(("fp32", "bf16", "chosen", "reason"), [
    (300.0, 150.0, "fp32", "bf16 measured 0.50x fp32 on this CPU"),  # the Xeon where bf16 ran at half speed
    (150.0, 300.0, "bf16", "bf16 measured 2.00x fp32 on this CPU"),  # the Zen 4 where it ran at twice
    (200.0, 220.0, "fp32", "bf16 measured 1.10x fp32 on this CPU"),  # too close to pay for autocast's casts
])
def test_auto_on_a_native_bf16_cpu_picks_the_faster(fp32: float, bf16: float, chosen: str, reason: str) -> None:
    measure, calls = timings(fp32, bf16)
    choice = choose_precision("auto", CPU, [(8, 4, 2)], native_bf16=True, measure=measure)
    assert choice == Precision(chosen, reason, {"fp32": fp32, "bf16": bf16})
    assert choice.dtype == (torch.bfloat16 if chosen == "bf16" else None)
    assert calls == [[(8, 4, 2)]]  # the model's own shapes were timed
    assert choice.describe() == f"{chosen} ({reason})"
    assert choice.as_record() == {"precision": chosen, "precision_reason": reason, "fp32_gflops": fp32,
                                  "bf16_gflops": bf16}


def test_auto_without_native_bf16_and_explicit_choices_measure_nothing() -> None:
    measure, calls = timings(1.0, 100.0)
    assert (choose_precision("auto", CPU, native_bf16=False, measure=measure)
            == Precision("fp32", "no native bf16 on this CPU"))
    assert (choose_precision("bf16", CPU, native_bf16=False, measure=measure)
            == Precision("bf16", "as asked"))  # still forced
    assert choose_precision("fp32", CPU, native_bf16=True, measure=measure) == Precision("fp32", "as asked")
    assert calls == []
    with pytest.raises(NmtError, match="fp16 needs a GPU"):
        choose_precision("fp16", CPU)
    with pytest.raises(NmtError, match="unknown precision 'fp8'; choose one of auto, fp32, bf16, fp16"):
        choose_precision("fp8", CPU)


def test_matrix_shapes_are_the_models_weight_matrices_without_embeddings() -> None:
    config = copy_config(vocab_size=10, max_positions=4)
    shapes = matrix_shapes(build_model(config), rows=7)
    width = config.d_model
    assert shapes == sorted({(7, width, width), (7, width, 3 * width), (7, width, 2 * width), (7, width, 4),
                             (7, 4, width), (7, width, 10)})


def test_measurement_is_cached_per_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NMT_CACHE_DIR", str(tmp_path))
    measured: list[object] = []
    monkeypatch.setattr(nmt.precision, "measure_matmul_gflops",
                        lambda shapes: measured.append(shapes) or {"fp32": 2.0, "bf16": 1.0})
    assert cached_measurement([(4, 4, 4)]) == {"fp32": 2.0, "bf16": 1.0}
    assert cached_measurement([(4, 4, 4)]) == {"fp32": 2.0, "bf16": 1.0}
    assert len(measured) == 1  # the second run read the cache
    cached_measurement([(8, 8, 8)])  # other shapes: measured again
    assert len(measured) == 2 and len(json.loads((tmp_path / "precision.json").read_text())) == 2
    (tmp_path / "precision.json").write_text("{oops")  # a damaged cache is measured again, not an error
    assert cached_measurement([(4, 4, 4)]) == {"fp32": 2.0, "bf16": 1.0} and len(measured) == 3


def test_real_measurement_gives_both_speeds() -> None:
    gflops = measure_matmul_gflops([(32, 16, 8)], seconds=0.01)
    assert set(gflops) == {"fp32", "bf16"} and all(value > 0 for value in gflops.values())


def test_training_reports_and_logs_its_precision(toy_data: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from nmt.train import Trainer
    from tests.test_train import make_config

    monkeypatch.setattr(nmt.precision, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(nmt.precision, "cached_measurement", lambda shapes: {"fp32": 300.0, "bf16": 150.0})
    run = tmp_path / "run"
    trainer = Trainer(make_config(toy_data, run, "train.precision=auto", "train.max_updates=1",
                                  "train.valid_bleu=false", "train.best_metric=loss"))
    assert trainer.precision.name == "fp32" and trainer.amp_dtype is None
    assert trainer._start_info()["precision"] == "fp32 (bf16 measured 0.50x fp32 on this CPU)"
    trainer.train()
    setup = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert setup == {"kind": "setup", "update": 0, "precision": "fp32",
                     "precision_reason": "bf16 measured 0.50x fp32 on this CPU",
                     "fp32_gflops": 300.0, "bf16_gflops": 150.0}
    monkeypatch.setattr(nmt.precision, "cached_measurement", lambda shapes: {"fp32": 150.0, "bf16": 300.0})
    faster = Trainer(make_config(toy_data, tmp_path / "bf16", "train.precision=auto", "train.max_updates=1"))
    assert faster.precision.name == "bf16" and faster.amp_dtype == torch.bfloat16


@pytest.mark.parametrize(("fp32", "bf16", "chosen"), [(300.0, 150.0, "fp32"), (150.0, 300.0, "bf16")])
def test_translate_says_what_auto_chose(copy_model: Path, monkeypatch: pytest.MonkeyPatch, fp32: float, bf16: float,
                                        chosen: str) -> None:
    """`nmt translate` defaults to auto; bf16, where chosen, runs on any CPU (emulated ones slowly) and still copies."""
    from typer.testing import CliRunner

    from cli.main import app

    monkeypatch.setattr(nmt.precision, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(nmt.precision, "cached_measurement", lambda shapes: {"fp32": fp32, "bf16": bf16})
    result = CliRunner().invoke(app, ["translate", "-m", str(copy_model), "--device", "cpu", "--threads", "1"],
                                input="a man runs\nein mädchen läuft\n")
    assert result.exit_code == 0, result.output
    assert result.stdout == "a man runs\nein mädchen läuft\n"
    ratio = bf16 / fp32
    assert result.stderr == f"precision: {chosen} (bf16 measured {ratio:.2f}x fp32 on this CPU)\n"
