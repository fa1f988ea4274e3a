"""`nmt prepare --tokenizer-from` and `nmt train --init-from`: a new run from an imported MarianMT model and from
one of nmt's own checkpoints starts from exactly its weights, learns the new data, and its result averages,
exports and serves. Mismatched data and model changes are one-line errors."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from nmt.checkpoint import Checkpoint, average_checkpoints, load_checkpoint
from nmt.config import Config, merge, parse_overrides
from nmt.data import PreparedData
from nmt.errors import NmtError
from nmt.importers import import_marian
from nmt.loss import label_smoothed_loss
from nmt.models import build_model
from nmt.train import Trainer, last_checkpoints
from nmt.train.init_from import FINETUNE_LR
from nmt.train.sizing import free_options
from nmt.translate import Translator
from tests.conftest import make_parallel

runner = CliRunner()
TEXTS = make_parallel(5, seed=21)[0]
RUN = ["model.dropout=0", "model.attention_dropout=0", "model.activation_dropout=0", "train.max_tokens=400",
       "train.warmup=2", "train.lr=0.001", "train.log_every=1", "train.threads=1", "train.precision=fp32",
       "train.valid_every=4", "train.valid_bleu=false", "train.best_metric=loss", "train.select_final=false"]


def prepare_from(checkpoint: Path, folder: Path, *options: str) -> Path:
    """Domain data, new to the model, prepared with the checkpoint's tokenizers through the CLI."""
    src, tgt = make_parallel(60, seed=17)
    for name, lines in (("train.en", src[:50]), ("train.de", tgt[:50]), ("valid.en", src[50:]),
                        ("valid.de", tgt[50:])):
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = folder / "data"
    result = runner.invoke(app, ["prepare", "--tokenizer-from", str(checkpoint), "-o", str(out), *options,
                                 *(f"--{split}-{side}={folder / f'{split}.{lang}'}" for split in ("train", "valid")
                                   for side, lang in (("src", "en"), ("tgt", "de")))])
    assert result.exit_code == 0, result.output
    return out


def run_config(checkpoint: Path, data: Path, run: Path, *sets: str) -> Config:
    config = Config()
    merge(config, parse_overrides([*RUN, f'train.init_from="{checkpoint}"', f'train.data="{data}"',
                                   f'train.run_dir="{run}"', *sets]))
    return config


@pytest.fixture(scope="module", params=["imported", "native"])
def start(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A checkpoint to start from (an imported random MarianMT model with a shared vocabulary, or the tiny trained
    Transformer), and new data prepared with its tokenizers."""
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "imported":
        pytest.importorskip("transformers")
        from tests.marian_folder import build_marian_folder

        path = folder / "imported.pt"
        import_marian(build_marian_folder(folder / "opus-mt-en-de")).save(path)
    else:
        path = request.getfixturevalue("tiny_models")["transformer"]
    return {"kind": request.param, "checkpoint": path, "data": prepare_from(path, folder), "folder": folder}


def loss_of(checkpoint: Checkpoint, data: Path, indices: list[int], smoothing: float) -> float:
    """The checkpoint's smoothed loss summed over the training batch `indices`."""
    model = build_model(checkpoint.config.model)
    model.load_state_dict(checkpoint.model_state)
    batch = PreparedData.open(data).split("train").batch(indices)
    with torch.no_grad():
        features = model(batch.src, batch.src_mask, batch.tgt_in, features_only=True)
        loss, _ = label_smoothed_loss(features, model.output_projection(), batch.tgt_out, smoothing,
                                      bias=model.output_bias())
    return float(loss)


def test_the_first_loss_is_the_checkpoints_and_the_loss_falls(start: dict, tmp_path: Path) -> None:
    config = run_config(start["checkpoint"], start["data"], tmp_path / "run", "train.max_updates=12")
    trainer = Trainer(config)
    checkpoint = load_checkpoint(start["checkpoint"])
    assert trainer.config.model == checkpoint.config.model and trainer.config.decode == checkpoint.config.decode
    first = trainer.sampler.batches(1)[0]
    smoothing = config.train.label_smoothing
    before = loss_of(checkpoint, start["data"], first, smoothing)
    loss, _, _ = trainer.update([first])
    assert loss == pytest.approx(before, rel=1e-6)
    result = Trainer(run_config(start["checkpoint"], start["data"], tmp_path / "run2",
                                "train.max_updates=12")).train()
    assert loss_of(load_checkpoint(result.last_checkpoint), start["data"], first, smoothing) < 0.97 * before


def test_the_result_averages_exports_and_serves(start: dict, tmp_path: Path) -> None:
    pytest.importorskip("ctranslate2")
    from nmt.engines import CT2Translator
    from nmt.export import export_checkpoint
    from nmt.serve.pairs import Pair
    from nmt.serve.service import Limits, Service, TranslateRequest

    run = tmp_path / "run"
    Trainer(run_config(start["checkpoint"], start["data"], run, "train.max_updates=8")).train()
    averaged = average_checkpoints(last_checkpoints(run, 2))
    averaged.save(tmp_path / "averaged.pt")
    decode = replace(averaged.config.decode, beam=1, max_len_a=0.0, max_len_b=20)
    ours = [line.best for line in Translator(averaged, decode=decode, device="cpu", precision="fp32")
            .translate_lines(TEXTS)]
    folder = export_checkpoint(tmp_path / "averaged.pt", tmp_path / "ct2")
    theirs = CT2Translator(folder, decode=decode, device="cpu", precision="fp32", threads=1).translate_lines(TEXTS)
    assert [line.best.tokens for line in theirs] == [t.tokens for t in ours]
    service = Service([tmp_path / "averaged.pt"], [Pair("en", "de")], Limits())
    service.load("cpu", "fp32").join(120)
    try:
        served = asyncio.run(service.translate(TranslateRequest(TEXTS, "en", "de", beam=1)))
    finally:
        service.drain()
        service.join(30)
    limited = Translator(averaged, decode=replace(averaged.config.decode, beam=1), device="cpu", precision="fp32")
    assert [lines[0].best.text for lines in served] == [line.best.text for line in limited.translate_lines(TEXTS)]


def test_fine_tuning_defaults_apply_where_the_run_leaves_them_free(start: dict, tmp_path: Path) -> None:
    sets = [s for s in RUN if not s.startswith(("train.lr", "train.warmup"))]
    config = Config()
    merge(config, parse_overrides([*sets, f'train.init_from="{start["checkpoint"]}"', f'train.data="{start["data"]}"',
                                   f'train.run_dir="{tmp_path / "run"}"', "train.max_updates=30"]))
    overrides = [*sets, "train.max_updates=30"]
    trainer = Trainer(config, choose=free_options(overrides=overrides))
    chosen = {choice.option: choice.value for choice in trainer.choices}
    assert chosen["train.lr"] == FINETUNE_LR and chosen["train.warmup"] == 3  # a tenth of 30 updates
    assert trainer.config.train.lr == FINETUNE_LR and "model.d_model" not in chosen
    assert trainer.config.model == replace(load_checkpoint(start["checkpoint"]).config.model, dropout=0.0,
                                           attention_dropout=0.0, activation_dropout=0.0)


def test_mismatches_are_one_line_errors(start: dict, toy_data: Path, tmp_path: Path) -> None:
    if start["kind"] == "imported":  # data encoded with nmt's toy tokenizer cannot train the imported model
        with pytest.raises(NmtError, match="encoded with other tokenizers than .* nmt prepare --tokenizer-from"):
            Trainer(run_config(start["checkpoint"], toy_data, tmp_path / "a"))
    with pytest.raises(NmtError, match=r"model.d_model comes from .*only model.dropout"):
        Trainer(run_config(start["checkpoint"], start["data"], tmp_path / "b", "model.d_model=48"))
    normalization = load_checkpoint(start["checkpoint"]).src_tokenizer.normalization
    other_form = "NFKC" if normalization == "NFC" else "NFC"
    result = runner.invoke(app, ["prepare", "--tokenizer-from", str(start["checkpoint"]), "-o", str(tmp_path / "d"),
                                 "--normalization", other_form, "--train-src", str(start["folder"] / "train.en"),
                                 "--train-tgt", str(start["folder"] / "train.de")])
    assert result.exit_code == 1 and "drop --normalization" in result.output
    assert len(result.output.strip().splitlines()) == 1
