"""An export folder is checked once when read: nmt.json's types and ranges, the language codes (as --pair's),
the tokenizer against CTranslate2's vocabulary, a damaged model.bin; errors while writing one name the output."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

import nmt.export
from cli.main import app
from nmt.errors import NmtError
from nmt.export import ExportedModel, damaged_model_file, export_checkpoint
from tests.test_cli_translate import CPU, assert_one_line_error

runner = CliRunner()


@pytest.fixture(scope="module")
def export(copy_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("ctranslate2")
    return export_checkpoint(copy_model, tmp_path_factory.mktemp("export") / "ct2")


def variant(export: Path, folder: Path, **changes: object) -> Path:
    """A copy of the export whose nmt.json has `changes`."""
    shutil.copytree(export, folder)
    manifest = json.loads((export / "nmt.json").read_text())
    (folder / "nmt.json").write_text(json.dumps({**manifest, **changes}))
    return folder


@pytest.mark.parametrize(("changes", "message"), [
    ({"max_positions": "abc"}, "max_positions must be a whole number of at least 2, got 'abc'"),  # a traceback once
    ({"max_positions": 0}, "max_positions must be a whole number of at least 2, got 0"),  # empty translations once
    ({"max_positions": True}, "max_positions must be a whole number of at least 2, got True"),
    ({"languages": ["en"]}, "languages must be [source, target] language codes, as [\"en\", \"de\"], got ['en']"),
    ({"languages": "en"}, "languages must be [source, target] language codes, as [\"en\", \"de\"], got 'en'"),
    ({"languages": ["en", "de-AT"]}, "the target language must be a language code such as en, deu or pt_BR"),
    ({"normalization": "NFD"}, "normalization must be one of NFC, NFKC, got 'NFD'"),  # once blamed on spm.model
    ({"tokenizers": {"src": "../spm.model", "tgt": "spm.model"}}, "tokenizers must be file names in the folder"),
    ({"tokenizers": "spm.model"}, "tokenizers must name a file per side"),
    ({"decode": {"beam": 0}}, "beam size must be at least 1, got 0"),
    ({"decode": {"alpha": 1e308}}, "alpha (the length penalty exponent) must be in [0, 10]"),
    ({"decode": {"beam": "x"}}, "option decode.beam expects int, got 'x'"),
    ({"model": {"heads": 0}}, "model.heads must be at least 1, got 0"),
    ({"max_positions": None, "normalization": None}, "normalization must be one of NFC, NFKC, got None"),
])
def test_manifest_fields_are_checked_and_blamed_on_nmt_json(export: Path, tmp_path: Path, changes: dict,
                                                             message: str) -> None:
    folder = variant(export, tmp_path / "bad", **changes)
    with pytest.raises(NmtError) as refused:
        ExportedModel(folder)
    text = str(refused.value)
    assert text.startswith(f"{folder / 'nmt.json'}: ") and message in text and "\n" not in text


def test_unreadable_manifests_are_one_line(export: Path, tmp_path: Path) -> None:
    folder = variant(export, tmp_path / "latin")
    (folder / "nmt.json").write_bytes((export / "nmt.json").read_text().replace("NFC", "NF\xc9").encode("latin-1"))
    with pytest.raises(NmtError, match=r"latin/nmt.json: not valid UTF-8 \(byte \d+\)$"):
        ExportedModel(folder)
    (folder / "nmt.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(NmtError, match=r"latin/nmt.json: not valid JSON \(nested too deeply\)$"):
        ExportedModel(folder)
    manifest = json.loads((export / "nmt.json").read_text())
    del manifest["max_positions"]
    (folder / "nmt.json").write_text(json.dumps(manifest))
    with pytest.raises(NmtError, match=r"latin/nmt.json: damaged manifest \(no 'max_positions'\)$"):
        ExportedModel(folder)


def test_languages_are_read_as_pair_codes(export: Path, tmp_path: Path) -> None:
    assert ExportedModel(variant(export, tmp_path / "pair", languages=["en", "pt_BR"])).languages == ("en", "pt_BR")
    assert ExportedModel(variant(export, tmp_path / "none", languages=None)).languages is None


def test_a_swapped_tokenizer_is_refused_not_translated_wrongly(export: Path, joint_spm: Path, tmp_path: Path) -> None:
    folder = variant(export, tmp_path / "swapped")
    shutil.copy(joint_spm, folder / "spm.model")  # another tokenizer: 300 pieces where CTranslate2 has 64
    message = (f"{folder}: spm.model does not match CTranslate2's shared_vocabulary.json (300 pieces against 64); "
               "the files do not belong together: export the checkpoint again")
    with pytest.raises(NmtError) as refused:
        ExportedModel(folder)
    assert str(refused.value) == message
    vocabulary = json.loads((export / "shared_vocabulary.json").read_text())
    vocabulary[5], vocabulary[6] = vocabulary[6], vocabulary[5]
    (folder / "shared_vocabulary.json").write_text(json.dumps(vocabulary))
    shutil.copy(export / "spm.model", folder / "spm.model")
    with pytest.raises(NmtError, match=f"piece 5 is {vocabulary[6]!r} against {vocabulary[5]!r}"):
        ExportedModel(folder)
    (folder / "shared_vocabulary.json").unlink()
    with pytest.raises(NmtError, match="no source vocabulary .shared_vocabulary.json or source_vocabulary.json."):
        ExportedModel(folder)


def test_random_bytes_in_model_bin_are_damage_not_a_later_version(export: Path, tmp_path: Path) -> None:
    assert not damaged_model_file(export / "model.bin")
    folder = variant(export, tmp_path / "random")
    (folder / "model.bin").write_bytes(bytes(range(256)) * 20)  # once "generated by a later version of CTranslate2"
    assert damaged_model_file(folder / "model.bin")
    result = runner.invoke(app, ["translate", "--engine", "ctranslate2", "-m", str(folder), *CPU], input="a\n")
    assert_one_line_error(result.exit_code, result.stderr,
                          f"{folder / 'model.bin'}: damaged (not a CTranslate2 model); export the checkpoint again")


def test_write_errors_name_the_output_not_the_temporary_folder(copy_model: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("ctranslate2")
    out = tmp_path / "ct2"

    def full_disk(folder: Path, checkpoint: object) -> dict[str, str]:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # a write on a full disk names no file

    def denied(folder: Path, checkpoint: object) -> dict[str, str]:
        raise PermissionError(errno.EACCES, "Permission denied", str(folder / "spm.model"))

    for failure, message in ((full_disk, f"{out}: cannot write (No space left on device)"),
                             (denied, f"{out / 'spm.model'}: cannot write (Permission denied)")):
        monkeypatch.setattr(nmt.export, "write_tokenizers", failure)
        result = runner.invoke(app, ["export", str(copy_model), "-o", str(out)])
        assert_one_line_error(result.exit_code, result.stderr, message)
        assert list(tmp_path.iterdir()) == []


def test_an_export_folder_given_as_a_checkpoint_says_what_it_is(export: Path, tmp_path: Path) -> None:
    """translate --engine nmt, average and attention once said "no such checkpoint"."""
    message = (f"{export}: a CTranslate2 export folder (from nmt export), not a checkpoint: translate it with "
               "--engine ctranslate2; the nmt engine, average and attention need the checkpoint it came from")
    for args in (["translate", "-m", str(export), *CPU], ["average", str(export), "-o", str(tmp_path / "a.pt")],
                 ["attention", "-m", str(export), "-o", str(tmp_path / "att"), "--no-png", "--device", "cpu"]):
        result = runner.invoke(app, args, input="a\n")
        assert_one_line_error(result.exit_code, result.stderr, message)
