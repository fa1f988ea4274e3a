"""recipes/finetune/make_marian.py builds a folder that `nmt import` takes, with the shape and decoding defaults it
asks for; its bad inputs are one line. recipes/bench/train_speed.py times an imported model (NAME=CHECKPOINT)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from nmt.data import encode_source
from nmt.importers import import_marian
from nmt.translate import Translator
from tests.conftest import make_parallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes" / "finetune"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes" / "bench"))
import make_marian
import train_speed

pytest.importorskip("transformers")
TINY = ["--d-model", "32", "--layers", "1", "--heads", "2", "--ffn", "64", "--spm-vocab", "40"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("domain")
    src, tgt = make_parallel(240, seed=5)
    for name, lines in (("train.en", src[:200]), ("train.fr", tgt[:200]), ("valid.en", src[200:]),
                        ("valid.fr", tgt[200:])):
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def imported(corpus: Path) -> Path:
    """The tiny OPUS-MT-shaped model, built by the recipe's script and imported."""
    folder = corpus / "opus-mt-en-fr"
    make_marian.main(["--src", str(corpus / "train.en"), "--tgt", str(corpus / "train.fr"), "-o", str(folder),
                      "--pair", "en-fr", "--vocab-size", "300", *TINY])
    path = corpus / "model.pt"
    import_marian(folder).save(path)
    return path


def test_the_recipes_model_is_an_opus_mt_folder_nmt_imports(imported: Path) -> None:
    translator = Translator.from_checkpoint(imported, device="cpu", precision="fp32")
    model = translator.checkpoint.config.model
    assert (model.d_model, model.enc_layers, model.dec_layers, model.heads, model.ffn_dim) == (32, 1, 1, 2, 64)
    assert (model.activation, model.norm, model.position_layout, model.output_bias) == ("swish", "post",
                                                                                         "concatenated", True)
    assert model.joint_vocab and model.src_vocab_size == 301  # padded to 300 Marian ids, and nmt's <s>
    assert translator.checkpoint.languages == ("en", "fr") and translator.decode.beam == make_marian.OPUS_MT_BEAM
    texts, decode = make_parallel(4, seed=9)[0], translator.decode
    for text, result in zip(texts, translator.translate_lines(texts), strict=True):  # ended by EOS, not the limit
        limit = decode.max_len_a * len(encode_source(translator.src_tokenizer, text)) + decode.max_len_b
        assert len(result.best.tokens) < limit


@pytest.mark.parametrize(("options", "message"), [
    (["--spm-vocab", "10"], r"error: --spm-vocab 10 on .*train.en: Vocabulary size is smaller than required_chars"),
    (["--vocab-size", "50"], r"error: --vocab-size 50 is smaller than the \d+ ids the pieces need"),
    (["--pair", "english"], r"error: --pair 'english': expected two language codes"),
    (["--heads", "3"], r"error: --d-model 32, --layers 1, --heads 3, --ffn 64: each must be 1 or more"),
])
def test_bad_options_are_one_line(corpus: Path, tmp_path: Path, options: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message) as exit_:
        make_marian.main(["--src", str(corpus / "train.en"), "--tgt", str(corpus / "train.fr"),
                          "-o", str(tmp_path / "m"), *TINY, *options])
    assert "\n" not in str(exit_.value.code)


def test_train_speed_times_an_imported_model(imported: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = corpus / "data"
    result = CliRunner().invoke(app, ["prepare", "--tokenizer-from", str(imported), "-o", str(data),
                                      f"--train-src={corpus / 'train.en'}", f"--train-tgt={corpus / 'train.fr'}",
                                      f"--valid-src={corpus / 'valid.en'}", f"--valid-tgt={corpus / 'valid.fr'}"])
    assert result.exit_code == 0, result.output
    monkeypatch.setattr(train_speed, "matmul_gflops", lambda: 100.0)  # the ceiling's timing is not under test
    row = train_speed.measure(data, f"opus-mt={imported}", "fp32", updates=1, warmup=1, max_tokens=300)
    assert row["model"] == "opus-mt" and row["tokens_per_s"] > 0
    assert row["parameters"] == Translator.from_checkpoint(imported, device="cpu").model.num_parameters()
