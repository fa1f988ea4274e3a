"""precision = "auto": chosen by measurement on CPUs with native bf16, with the timings injected here."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

import nmt.precision
from nmt.errors import NmtError
from nmt.models import build_model
from nmt.precision import Precision, cached_timings, choose_precision, time_workloads
from tests.copy_model import copy_config

CPU = torch.device("cpu")


def timings(fp32: float, bf16: float, names: tuple[str, ...] = ("work",)):
    """A measurement that answers `fp32` and `bf16` seconds for each workload, recording what it was asked."""
    calls: list[tuple[str, list[str]]] = []

    def measure(key, workloads):
        calls.append((key, list(workloads)))
        return {name: {"fp32": fp32, "bf16": bf16} for name in workloads}

    return measure, calls


@pytest.mark.parametrize(("fp32", "bf16", "chosen", "speedup"), [
    (2.0, 4.0, "fp32", "0.50x"),  # the Xeon where bf16 ran at half speed
    (4.0, 2.0, "bf16", "2.00x"),  # the Zen 4 where it ran at twice
    (2.2, 2.0, "fp32", "1.10x"),  # too close to pay for autocast's casts
])
def test_auto_on_a_native_bf16_cpu_picks_the_faster(fp32: float, bf16: float, chosen: str, speedup: str) -> None:
    measure, calls = timings(fp32, bf16)
    choice = choose_precision("auto", CPU, {"an update": lambda dtype: None}, "key", native_bf16=True,
                              measure=measure)
    reason = f"bf16 measured {speedup} fp32 on an update on this CPU"
    assert choice == Precision(chosen, reason, {"an update": fp32 / bf16})
    assert choice.dtype == (torch.bfloat16 if chosen == "bf16" else None)
    assert calls == [("key", ["an update"])]  # the run's own work was timed, under its cache key
    assert choice.describe() == f"{chosen} ({reason})"
    assert choice.as_record() == {"precision": chosen, "precision_reason": reason,
                                  "bf16_speedup_an_update": round(fp32 / bf16, 3)}


def test_bf16_must_win_at_every_workload() -> None:
    """On the AMX Xeon bf16 decoded a batch 1.05x faster but one sentence at 0.5x: fp32 serves both better."""
    def measure(key, workloads):
        return {"a batch": {"fp32": 1.0, "bf16": 0.5}, "one sentence": {"fp32": 1.0, "bf16": 2.0}}

    work = {"a batch": lambda dtype: None, "one sentence": lambda dtype: None}
    choice = choose_precision("auto", CPU, work, native_bf16=True, measure=measure)
    assert choice.name == "fp32"
    assert choice.reason == "bf16 measured 2.00x fp32 on a batch, 0.50x fp32 on one sentence on this CPU"


def test_auto_without_native_bf16_and_explicit_choices_measure_nothing() -> None:
    measure, calls = timings(100.0, 1.0)
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


def test_timings_are_cached_per_machine_and_workload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NMT_CACHE_DIR", str(tmp_path))
    measured: list[object] = []
    answer = {"w": {"fp32": 2.0, "bf16": 1.0}}
    monkeypatch.setattr(nmt.precision, "time_workloads", lambda workloads: measured.append(workloads) or answer)
    work = {"w": lambda dtype: None}
    assert cached_timings("a", work) == answer
    assert cached_timings("a", work) == answer
    assert len(measured) == 1  # the second run read the cache
    cached_timings("b", work)  # another model or batch: measured again
    assert len(measured) == 2 and len(json.loads((tmp_path / "precision.json").read_text())) == 2
    cached_timings("a", {"w": work["w"], "v": work["w"]})  # other workloads under the key: measured again
    assert len(measured) == 3
    (tmp_path / "precision.json").write_text("{oops")  # a damaged cache is measured again, not an error
    assert cached_timings("a", work) == answer and len(measured) == 4


@pytest.mark.parametrize("kind", ["nested", "latin-1", "list", "fifo", "symlink"])
def test_an_unreadable_cache_is_ignored_with_one_warning_and_never_written_through(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, kind: str) -> None:
    """A FIFO there once hung `nmt translate`; a symlink there had its target overwritten."""
    monkeypatch.setenv("NMT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(nmt.precision, "time_workloads", lambda workloads: {"w": {"fp32": 2.0, "bf16": 1.0}})
    cache, target = tmp_path / "cache" / "precision.json", tmp_path / "target.json"
    cache.parent.mkdir()
    target.write_text("{}")
    if kind == "fifo":
        os.mkfifo(cache)
    elif kind == "symlink":
        cache.symlink_to(target)
    else:
        cache.write_bytes({"nested": b"[" * 100_000 + b"]" * 100_000, "latin-1": b'{"\xe9": 1}', "list": b"[1]"}[kind])
    with caplog.at_level("WARNING", logger="nmt.precision"):
        assert cached_timings("a", {"w": lambda dtype: None}) == {"w": {"fp32": 2.0, "bf16": 1.0}}
    reason = {"nested": r"not valid JSON \(nested too deeply\)", "latin-1": r"not valid UTF-8 \(byte 2\)",
              "list": "not a JSON object", "fifo": "not a regular file",
              "symlink": r"cannot read \(is a symbolic link\)"}[kind]
    assert len(caplog.messages) == 1
    assert re.fullmatch(f"warning: {cache}: {reason}; ignoring the precision cache", caplog.messages[0])
    assert target.read_text() == "{}"  # a link's target is never written
    written = cache.is_file() and not cache.is_symlink()
    assert written == (kind in ("nested", "latin-1", "list"))  # our own damaged file is replaced, nothing else


def test_real_timing_runs_each_workload_in_both_precisions_and_keeps_the_random_state() -> None:
    seen: list[torch.dtype | None] = []

    def work(dtype: torch.dtype | None) -> None:
        seen.append(dtype)
        torch.rand(3)  # draws from the global generator, which the timing puts back

    state = torch.get_rng_state()
    seconds = time_workloads({"w": work}, seconds=0.01)
    assert set(seconds) == {"w"} and set(seconds["w"]) == {"fp32", "bf16"}
    assert all(value > 0 for value in seconds["w"].values())
    assert seen[:2] == [None, torch.bfloat16] and len(seen) >= 6  # alternating, one warm-up round and two timed
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("arch", ["transformer", "gru"])
def test_the_workloads_change_no_parameter_gradient_or_random_state(arch: str) -> None:
    """What auto runs to time a training update and a translation leaves the run exactly as it was."""
    from nmt.config import DecodeConfig, ModelConfig
    from nmt.data import collate
    from nmt.train.step import update_workload
    from nmt.translate import decode_workloads

    config = (copy_config(vocab_size=20, max_positions=32) if arch == "transformer" else
              ModelConfig(arch="rnn", cell="gru", embed_dim=16, hidden_size=16, enc_layers=1, dec_layers=1,
                          src_vocab_size=20, tgt_vocab_size=20, joint_vocab=True))
    torch.manual_seed(0)
    model = build_model(config)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    state = torch.get_rng_state()
    batch = collate([([5, 6, 7], [8, 9]), ([10] * 6, [11] * 4)])
    time_workloads({"update": update_workload(model, batch, 0.1)}, seconds=0.01)
    assert all(p.grad is None for p in model.parameters())
    time_workloads(decode_workloads(model.eval(), 20, DecodeConfig(beam=3)), seconds=0.01)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())


def test_training_reports_and_logs_its_precision(toy_data: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import nmt.train.trainer
    from nmt.train import Trainer
    from tests.test_train import make_config

    def measured_each_run(fp32: float, bf16: float):
        measure, calls = timings(fp32, bf16)
        return lambda workloads: measure("", workloads), calls

    monkeypatch.setenv("NMT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(nmt.precision, "cpu_has_native_bf16", lambda: True)
    slower, calls = measured_each_run(2.0, 4.0)
    monkeypatch.setattr(nmt.train.trainer, "time_workloads", slower)
    run = tmp_path / "run"
    trainer = Trainer(make_config(toy_data, run, "train.precision=auto", "train.max_updates=1",
                                  "train.valid_bleu=false", "train.best_metric=loss"))
    assert trainer.precision.name == "fp32" and trainer.amp_dtype is None
    assert trainer._start_info()["precision"] == "fp32 (bf16 measured 0.50x fp32 on a training update on this CPU)"
    trainer.train()
    setup = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert setup == {"kind": "setup", "update": 0, "precision": "fp32",
                     "precision_reason": "bf16 measured 0.50x fp32 on a training update on this CPU",
                     "bf16_speedup_a_training_update": 0.5}
    monkeypatch.setattr(nmt.train.trainer, "time_workloads", measured_each_run(4.0, 2.0)[0])
    faster = Trainer(make_config(toy_data, tmp_path / "bf16", "train.precision=auto", "train.max_updates=1"))
    assert faster.precision.name == "bf16" and faster.amp_dtype == torch.bfloat16  # measured again: no cache
    assert len(calls) == 1 and not (tmp_path / "cache").exists()  # a busy machine's timing never sticks


@pytest.mark.parametrize(("fp32", "bf16", "chosen"), [(2.0, 4.0, "fp32"), (4.0, 2.0, "bf16")])
def test_translate_says_what_auto_chose(copy_model: Path, monkeypatch: pytest.MonkeyPatch, fp32: float, bf16: float,
                                        chosen: str) -> None:
    """`nmt translate` defaults to auto; bf16, where chosen, runs on any CPU (emulated ones slowly) and still copies."""
    from typer.testing import CliRunner

    from cli.main import app

    monkeypatch.setattr(nmt.precision, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(nmt.precision, "cached_timings", timings(fp32, bf16)[0])
    result = CliRunner().invoke(app, ["translate", "-m", str(copy_model), "--device", "cpu", "--threads", "1"],
                                input="a man runs\nein mädchen läuft\n")
    assert result.exit_code == 0, result.output
    assert result.stdout == "a man runs\nein mädchen läuft\n"
    ratio = f"{fp32 / bf16:.2f}x fp32"
    measured = f"bf16 measured {ratio} on a batch, {ratio} on one sentence on this CPU"
    assert result.stderr == f"precision: {chosen} ({measured})\n"
