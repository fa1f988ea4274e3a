"""The training loop: exact resumption, DDP equivalence, interruption, errors, end to end."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from nmt.checkpoint import load_checkpoint
from nmt.config import Config, merge, parse_overrides, resolve
from nmt.errors import NmtError
from nmt.plot import read_metrics
from nmt.train import RunDirectory, SilentMonitor, Trainer, latest_checkpoint
from nmt.train.sizing import free_options
from nmt.translate import Translator
from tests.conftest import TINY_TRANSFORMER


def make_config(data: Path, run_dir: Path, *extra: str) -> Config:
    config = Config()
    merge(config, parse_overrides([*TINY_TRANSFORMER, f'train.data="{data}"', f'train.run_dir="{run_dir}"', *extra]))
    return config


def parameters(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).model_state


@pytest.mark.parametrize("model", ["transformer", "lstm"])
def test_resume_is_bitwise_identical(toy_data: Path, tmp_path: Path, model: str, train_device: list[str]) -> None:
    """Exact on every device: both runs are on the same device, with the same kernels. The first run has the
    same budget (so the same budget-aware schedule) and is cut short at update 5, as by a signal."""
    extra = ["train.max_tokens=2000", "train.accum_steps=2", "train.valid_every=3", "train.valid_max_sentences=8",
             "model.dropout=0.2", *train_device]
    if model == "lstm":
        extra += ["model.arch=rnn", "model.embed_dim=32", "model.hidden_size=32", "model.enc_layers=1",
                  "model.dec_layers=1"]
    straight = Trainer(make_config(toy_data, tmp_path / "a", "train.max_updates=11", *extra)).train()
    cut = Trainer(make_config(toy_data, tmp_path / "b", "train.max_updates=11", *extra))
    cut._limit_reached = lambda: "interrupted" if cut.progress.update >= 5 else ""
    first = cut.train()
    assert first.stop_reason == "interrupted" and first.updates == 5
    resumed = Trainer(make_config(toy_data, tmp_path / "b", "train.max_updates=11", *extra), resume=True).train()
    assert straight.updates == resumed.updates == 11
    assert straight.epochs_finished >= 1  # the run crossed an epoch boundary after resuming mid-epoch
    a, b = parameters(straight.last_checkpoint), parameters(resumed.last_checkpoint)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    state = load_checkpoint(resumed.last_checkpoint).train_state
    assert state["progress"]["update"] == 11


def test_checkpoints_best_and_keep_last(toy_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = Trainer(make_config(toy_data, run, "train.max_updates=6", "train.valid_every=2", "train.keep_last=2",
                                 "train.best_metric=loss", "train.valid_bleu=false")).train()
    assert sorted(p.name for p in run.glob("update_*.pt")) == ["update_00000004.pt", "update_00000006.pt"]
    assert result.best_checkpoint == run / "best.pt"
    best = load_checkpoint(run / "best.pt")
    assert best.metrics["loss"] == pytest.approx(result.best)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in records if r["kind"] == "valid"] == [2, 4, 6]
    assert [r["update"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert all(r["lr"] > 0 and r["tokens_per_s"] > 0 for r in records if r["kind"] == "train")
    assert (run / "config.toml").is_file()


def test_resume_reset_and_errors(toy_data: Path, tmp_path: Path) -> None:
    with pytest.raises(NmtError, match="no checkpoint to resume from"):
        Trainer(make_config(toy_data, tmp_path / "empty"), resume=True)
    with pytest.raises(NmtError, match="unknown --reset"):
        Trainer(make_config(toy_data, tmp_path / "x"), reset=("everything",))
    with pytest.raises(NmtError, match="no such data directory"):
        Trainer(make_config(tmp_path / "nowhere", tmp_path / "y"))
    with pytest.raises(NmtError, match="best_metric bleu needs train.valid_bleu"):
        Trainer(make_config(toy_data, tmp_path / "z", "train.valid_bleu=false"))
    run = tmp_path / "r"
    Trainer(make_config(toy_data, run, "train.max_updates=2", "train.valid_bleu=false",
                        "train.best_metric=loss")).train()
    trainer = Trainer(make_config(toy_data, run, "train.max_updates=3", "train.valid_bleu=false",
                                  "train.best_metric=loss"), resume=True, reset=("optimizer", "best"))
    assert trainer.progress.update == 2 and trainer.progress.best is None
    assert not trainer.optimizer.state  # a fresh optimiser
    with pytest.raises(NmtError, match=r"cannot resume with changed model.d_model \(32 -> 48\), train.max_tokens"):
        Trainer(make_config(toy_data, run, "model.d_model=48", "train.max_tokens=700", "train.valid_bleu=false",
                            "train.best_metric=loss"), resume=True)
    with pytest.raises(NmtError, match="train.keep_last must be at least 1"):
        Trainer(make_config(toy_data, tmp_path / "k", "train.keep_last=0"))


def _ddp_worker(rank: int, world: int, port: int, data: str, run: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    config = make_config(Path(data), Path(run), "train.max_updates=4", "model.dropout=0.0", "train.valid_every=2",
                         "train.valid_max_sentences=4")
    result = Trainer(config).train()
    torch.distributed.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps({"updates": result.updates}))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2,
                    reason="with CUDA, DDP puts each process on its own GPU: needs 2")
def test_two_process_ddp_matches_one_process_with_accumulation(toy_data: Path, tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(toy_data), str(tmp_path / "ddp"), str(tmp_path / "out.json")),
             nprocs=2)
    assert json.loads((tmp_path / "out.json").read_text()) == {"updates": 4}
    single = make_config(toy_data, tmp_path / "single", "train.max_updates=4", "model.dropout=0.0",
                         "train.accum_steps=2", "train.valid_every=2", "train.valid_max_sentences=4")
    Trainer(single).train()
    losses = {}
    for name in ("ddp", "single"):
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses["ddp"]) == len(losses["single"]) == 4
    assert losses["ddp"] == pytest.approx(losses["single"], rel=0.02)
    ddp_checkpoints = sorted(p.name for p in (tmp_path / "ddp").glob("update_*.pt"))
    assert ddp_checkpoints == ["update_00000002.pt", "update_00000004.pt"]


def _nmt(*args: str, **kwargs) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("nmt")
    env = {k: v for k, v in os.environ.items() if k != "NMT_DEBUG"}
    return subprocess.Popen([str(exe), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            **kwargs)


def _overrides(extra: list[str]) -> list[str]:
    return [arg for item in [*TINY_TRANSFORMER, *extra] for arg in ("--set", item)]


def _long_training(data: Path, run: Path) -> subprocess.Popen:
    """`nmt train` without a limit, returned once it has logged a few updates (to be stopped by a signal)."""
    proc = _nmt("train", "--data", str(data), "--run-dir", str(run), "--max-updates", "100000",
                *_overrides(["train.valid_bleu=false", "train.best_metric=loss", "train.valid_every=0"]))
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.2)
    return proc


def test_ctrl_c_leaves_a_loadable_checkpoint(toy_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = _long_training(toy_data, run)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    last = latest_checkpoint(run)
    assert last is not None
    state = load_checkpoint(last).train_state
    assert state["progress"]["update"] >= 3
    assert "interrupted" in stdout


def test_cli_end_to_end_and_corrupt_checkpoint(toy_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = _nmt("train", "--data", str(toy_data), "--run-dir", str(run), "--max-updates", "3",
                *_overrides(["train.valid_max_sentences=4"]))
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "Training" in stdout and "max updates" in stdout
    translator = Translator.from_checkpoint(run / "update_00000003.pt", device="cpu", precision="fp32")
    assert len(translator.translate(["a man runs", ""])) == 2
    again = _nmt("train", "--data", str(toy_data), "--run-dir", str(run), "--max-updates", "3")
    _, stderr = again.communicate(timeout=120)
    assert again.returncode == 1 and "already holds checkpoints" in stderr
    (run / "update_00000003.pt").write_bytes((run / "update_00000003.pt").read_bytes()[:1000])
    resumed = _nmt("train", "--run-dir", str(run), "--resume")
    _, stderr = resumed.communicate(timeout=120)
    assert resumed.returncode == 1
    assert stderr.strip().count("\n") == 0 and "corrupt or truncated checkpoint" in stderr, stderr


@pytest.mark.convergence
@pytest.mark.parametrize("model", ["transformer", "gru"])
def test_convergence_the_tiny_models_learn_the_toy_mapping(tiny_models: dict[str, Path], model: str) -> None:
    """Needs training by definition: a loss, gradient or optimiser bug that leaves every plumbing test green
    would keep the loss up. The margin (half the first loss after 200 updates, where the toy word
    mapping takes it far lower) holds whatever the CPU's rounding does to the path in between."""
    records = [json.loads(line) for line in (tiny_models[model].parent / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 200
    assert sum(losses[-10:]) / 10 < 0.5 * losses[0]


NO_BLEU = ["train.valid_bleu=false", "train.best_metric=loss"]


def train_records(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def test_api_and_cli_resolve_and_train_alike(toy_data: Path, tmp_path: Path) -> None:
    """`nmt train` is config.resolve + Trainer sizing what no option sets: the same options give the same
    config (sized alike) and the same run."""
    options = [*TINY_TRANSFORMER, *NO_BLEU, "train.valid_every=0", f'train.data="{toy_data}"']
    proc = _nmt("train", "--run-dir", str(tmp_path / "cli"), "--max-updates", "2",
                *[arg for option in options for arg in ("--set", option)])
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what the CLI's tune_cpu applied for train.threads=1
    try:
        api = [*options, f'train.run_dir="{tmp_path / "api"}"', "train.max_updates=2"]
        Trainer(resolve(overrides=api), choose=free_options(overrides=api)).train()
    finally:
        torch.set_num_threads(threads)
    toml = {name: (tmp_path / name / "config.toml").read_text().replace(str(tmp_path / name), "RUN")
            for name in ("cli", "api")}
    assert toml["cli"] == toml["api"]
    assert [r["loss"] for r in train_records(tmp_path / "cli")] == [r["loss"] for r in train_records(tmp_path / "api")]


def test_a_run_resumed_at_its_limit_does_no_update(toy_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    Trainer(make_config(toy_data, run, "train.max_updates=3", "train.valid_every=0", *NO_BLEU)).train()
    before = (run / "update_00000003.pt").read_bytes()
    result = Trainer(make_config(toy_data, run, "train.max_updates=3", *NO_BLEU), resume=True).train()
    assert (result.updates, result.stop_reason) == (3, "max_updates")
    assert result.last_checkpoint == run / "update_00000003.pt"
    assert sorted(p.name for p in run.glob("update_*.pt")) == ["update_00000003.pt"]
    assert (run / "update_00000003.pt").read_bytes() == before
    assert [r["update"] for r in train_records(run)] == [1, 2, 3]
    with pytest.raises(NmtError, match="train.max_updates must be at least 0, got -1"):
        Trainer(make_config(toy_data, tmp_path / "negative", "train.max_updates=-1"))


def test_a_new_run_refuses_a_directory_with_checkpoints_or_in_use(toy_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    Trainer(make_config(toy_data, run, "train.max_updates=1", *NO_BLEU)).train()
    with pytest.raises(NmtError, match="already holds checkpoints: use --resume"):
        Trainer(make_config(toy_data, run, "train.max_updates=2", *NO_BLEU))
    with RunDirectory(run).lock():
        with pytest.raises(NmtError, match=f"another training is using this run directory \\(pid {os.getpid()} "):
            Trainer(make_config(toy_data, run, "train.max_updates=2", *NO_BLEU), resume=True)
    assert load_checkpoint(run / "update_00000001.pt").train_state["progress"]["update"] == 1


def test_resume_after_a_partial_metrics_line(toy_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    Trainer(make_config(toy_data, run, "train.max_updates=2", *NO_BLEU)).train()
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"kind": "train", "update": 3, "lo')  # killed mid-write
    Trainer(make_config(toy_data, run, "train.max_updates=3", *NO_BLEU), resume=True).train()
    assert [r["update"] for r in train_records(run)] == [1, 2, 3]
    assert read_metrics(run).series[("train", "loss")][0] == [1, 2, 3]


def test_a_failed_resume_leaves_the_stored_config_alone(toy_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    Trainer(make_config(toy_data, run, "train.max_updates=2", "train.valid_every=0", *NO_BLEU)).train()
    stored = (run / "config.toml").read_text()
    resumed = resolve(overrides=[f'train.run_dir="{run}"', "train.lr=1e9", "train.max_updates=20"], resume=True)
    with pytest.raises(NmtError, match=r"loss became (nan|-?inf) at update \d+; stopped without saving"):
        Trainer(resumed, resume=True).train()
    assert (run / "config.toml").read_text() == stored
    Trainer(resolve(overrides=[f'train.run_dir="{run}"', "train.max_updates=3"], resume=True), resume=True).train()
    assert "max_updates = 3\n" in (run / "config.toml").read_text()  # backed by update_00000003.pt


def test_data_errors_say_what_the_path_is(toy_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(NmtError, match=r"meta.json: is a file, not a directory written by `nmt prepare`$"):
        Trainer(make_config(toy_data / "meta.json", tmp_path / "a"))
    monkeypatch.chdir(toy_data.parent)
    run = tmp_path / "run"
    Trainer(make_config(Path(toy_data.name), run, "train.max_updates=1", *NO_BLEU)).train()
    monkeypatch.chdir(tmp_path)
    message = rf"^{toy_data.name}: no such data directory \(the resumed run's train.data.*pass --data DIR"
    with pytest.raises(NmtError, match=message):
        Trainer(resolve(overrides=[f'train.run_dir="{run}"', "train.max_updates=2"], resume=True), resume=True)


def test_bad_options_fail_before_any_work_in_one_line(toy_data: Path, tmp_path: Path) -> None:
    """A vocabulary size in the config was once silently replaced, and heads=0 a ZeroDivisionError traceback."""
    with pytest.raises(NmtError, match=r"^model.src_vocab_size 5 differs from the tokenizer's 300 in .*data: "
                                       r"vocabulary sizes come from the tokenizer; leave them unset$"):
        Trainer(make_config(toy_data, tmp_path / "a", "model.src_vocab_size=5"))
    Trainer(make_config(toy_data, tmp_path / "b", "model.src_vocab_size=300"))  # as a stored config.toml has it
    from typer.testing import CliRunner

    from cli.main import app

    for option, message in (("model.heads=0", "model.heads must be at least 1, got 0"),
                            ('decode.length_penalty="bogus"', "[decode] unknown length penalty 'bogus'")):
        result = CliRunner().invoke(app, ["train", "--data", str(toy_data), "--run-dir", str(tmp_path / "c"),
                                          "--set", option])
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith(f"error: {message}"), result.stderr
        assert not (tmp_path / "c").exists()


class RecordingMonitor(SilentMonitor):
    def __init__(self) -> None:
        self.tasks: list[list] = []
        self.validations: list[dict] = []

    def validated(self, record: dict) -> None:
        self.validations.append(record)

    def task(self, description: str, total: float | None = None, unit: str = "lines"):
        entry = [description, total, unit, 0]
        self.tasks.append(entry)
        return lambda amount: entry.__setitem__(3, entry[3] + amount)


def test_validation_shows_progress_and_its_time_is_kept_apart(toy_data: Path, tmp_path: Path) -> None:
    monitor = RecordingMonitor()
    result = Trainer(make_config(toy_data, tmp_path / "run", "train.max_updates=4", "train.valid_every=2",
                                 "train.valid_max_sentences=6"), monitor=monitor).train()
    assert monitor.tasks == [["validation BLEU", 6, "sentences", 6]] * 2
    assert [(v["update"], v["bleu_sentences"]) for v in monitor.validations] == [(2, 6), (4, 6)]
    assert 0 < result.validation_seconds < result.seconds
    assert result.tokens_per_second == result.target_tokens / (result.seconds - result.validation_seconds)
    state = load_checkpoint(result.last_checkpoint).train_state["progress"]
    assert 0 < state["validation_seconds"] < state["elapsed"]


def test_sigterm_saves_and_a_second_training_is_refused(toy_data: Path, tmp_path: Path) -> None:
    """Two trainings in one run directory: the second fails at once naming the first; SIGTERM then
    stops the first as Ctrl-C does (save, exit), with 143 = 128 + SIGTERM."""
    run = tmp_path / "run"
    first = _long_training(toy_data, run)
    second = _nmt("train", "--data", str(toy_data), "--run-dir", str(run), "--max-updates", "5",
                  *_overrides([*NO_BLEU, "train.seed=7"]))
    _, stderr = second.communicate(timeout=120)
    assert second.returncode == 1
    assert stderr.startswith(f"error: {run}: another training is using this run directory (pid {first.pid} on ")
    assert stderr.count("\n") == 1
    first.send_signal(signal.SIGTERM)
    stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 143, stderr
    assert "Traceback" not in stderr and "terminated" in stdout
    last = latest_checkpoint(run)
    assert last is not None and load_checkpoint(last).train_state["progress"]["update"] >= 3
    assert load_checkpoint(last).config.train.seed == 1


def test_the_cli_monitor_shows_validation_progress(capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from cli.train import RichMonitor

    monkeypatch.delenv("NMT_PROGRESS", raising=False)
    monitor = RichMonitor()
    advance = monitor.task("validation BLEU", total=3, unit="sentences")
    assert [task.description for task in monitor.progress.tasks] == ["validation BLEU"]
    advance(2)
    advance(1)
    assert monitor.progress.tasks == []  # a finished validation leaves no bar behind
    monitor.stop()
    assert capsys.readouterr().err == "validation BLEU: 3 sentences\n"  # where no bar is drawn (not a terminal)
