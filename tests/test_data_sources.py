"""Every kind of source yields the same raw pairs; each bad input is a one-line error."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nmt.data import HubDataset, TableFile, TextFiles
from nmt.data.sources import carve, corpus_languages, file_language
from nmt.errors import NmtError

PAIRS = [("a dog runs", "ein hund läuft"), ("the girl", "das mädchen"), ("two men\tsit", "zwei männer sitzen")]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    return write_lines(path, [json.dumps(row, ensure_ascii=False) for row in rows])


def test_aligned_text_files_plain_and_gzipped(tmp_path: Path) -> None:
    src = write_lines(tmp_path / "x.en", [s for s, _ in PAIRS])
    with gzip.open(tmp_path / "x.de.gz", "wt", encoding="utf-8") as handle:
        handle.write("".join(t + "\n" for _, t in PAIRS))
    source = TextFiles(src, tmp_path / "x.de.gz")
    assert source.size() == 3 and list(source) == PAIRS
    assert source.describe() == {"kind": "files", "src": str(src), "tgt": str(tmp_path / "x.de.gz")}


@pytest.mark.parametrize(("name", "code"), [("train.en", "en"), ("x.de.gz", "de"), ("corpus.pt_BR", "pt_BR"),
                                           ("train.src", None), ("train.txt", None), ("train", None), ("a.EN", None)])
def test_a_file_suffix_is_read_as_a_language_code_only_when_it_looks_like_one(name: str, code: str | None) -> None:
    assert file_language(Path(name)) == code


def test_corpus_languages_as_given_else_from_the_training_files(tmp_path: Path) -> None:
    files = TextFiles(write_lines(tmp_path / "t.en", ["a"]), write_lines(tmp_path / "t.de", ["b"]))
    assert corpus_languages(None, None, files) == ("en", "de")
    assert corpus_languages("deu", "eng", files) == ("deu", "eng")  # given codes win
    assert corpus_languages("fr", None, files) is None  # half given: nothing guessed
    same = TextFiles(tmp_path / "t.en", write_lines(tmp_path / "u.en", ["b"]))
    assert corpus_languages(None, None, same) is None  # both sides 'en': not a pair
    table = TableFile(write_lines(tmp_path / "t.tsv", ["a\tb"]))
    assert corpus_languages(None, None, table) is None
    with pytest.raises(NmtError, match="--tgt-lang must be a language code such as en, deu or pt_BR, got 'de-AT'"):
        corpus_languages("en", "de-AT", files)


def test_tsv_with_header_names_columns_and_without_header_numbers_them(tmp_path: Path) -> None:
    rows = ["de\tid\ten"] + [f"{t}\t{i}\t{s.replace(chr(9), ' ')}" for i, (s, t) in enumerate(PAIRS)]
    named = TableFile(write_lines(tmp_path / "a.tsv", rows), "en", "de")
    assert named.size() == 3
    assert list(named) == [(s.replace("\t", " "), t) for s, t in PAIRS]
    numbered = TableFile(write_lines(tmp_path / "b.tsv", [f"{s}\t{t}" for s, t in PAIRS[:2]]))
    assert list(numbered) == PAIRS[:2] and numbered.size() == 2


def test_jsonl_fields_are_dotted_paths(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [{"translation": {"en": s, "de": t}, "id": 1} for s, t in PAIRS])
    assert list(TableFile(path, "translation.en", "translation.de")) == PAIRS


@pytest.mark.parametrize(
    ("name", "content", "fields", "message"),
    [
        ("a.tsv", "en\tde\nx\ty\n", ("en", "fr"), "no column 'fr' in the header (columns: en, de)"),
        ("a.tsv", "x\ty\nonly one\n", ("0", "1"), "line 2 has 1 column(s), expected at least 2"),
        ("a.jsonl", '{"en": "x", "de": "y"}\n{"en": "x"\n', ("en", "de"), "line 2 is not valid JSON"),
        ("a.jsonl", '{"en": "x", "de": "y"}\n{"en": "x"}\n', ("en", "de"), "line 2: no field 'de'"),
        ("a.jsonl", '{"en": "x", "de": 5}\n', ("en", "de"), "field 'de' holds int, not text"),
        ("a.jsonl", '{"en": "x", "de": "y"}\n', (None, None), "name the source and target fields"),
        ("a.csv", "x,y\n", ("0", "1"), "unknown table format"),
    ],
)
def test_table_errors_name_file_and_line(tmp_path: Path, name: str, content: str, fields: tuple, message: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(NmtError, match="^" + re.escape(str(path)) + ".*" + re.escape(message)):
        list(TableFile(path, *fields))


@pytest.mark.parametrize(
    ("src", "tgt", "message"),
    [
        (b"a\nb\nc\n", b"x\ny\n", r"x\.en has 3 lines but .*x\.de has 2: the files are not aligned"),
        (b"a\nb\n", b"x\n\xff\xfe\n", r"x\.de: line 2 is not valid UTF-8"),
        (b"a\n", b"", r"x\.de: file is empty"),
        (b"a\n", None, r"x\.de: no such file"),
    ],
)
def test_text_file_errors(tmp_path: Path, src: bytes, tgt: bytes | None, message: str) -> None:
    (tmp_path / "x.en").write_bytes(src)
    if tgt is not None:
        (tmp_path / "x.de").write_bytes(tgt)
    with pytest.raises(NmtError, match=message):
        list(TextFiles(tmp_path / "x.en", tmp_path / "x.de"))


# ---------------------------------------------------------------- Hugging Face datasets, from local files


@pytest.fixture
def hub_repo(tmp_path: Path) -> Path:
    """A dataset folder laid out as on the hub: a README declaring config 'de-en' with two splits."""
    repo = tmp_path / "repo"
    (repo / "de-en").mkdir(parents=True)
    write_jsonl(repo / "de-en" / "train.jsonl", [{"translation": {"de": t, "en": s}} for s, t in PAIRS])
    write_jsonl(repo / "de-en" / "valid.jsonl", [{"translation": {"de": "ja", "en": "yes"}}])
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: de-en\n  data_files:\n"
        "  - split: train\n    path: de-en/train.jsonl\n  - split: validation\n    path: de-en/valid.jsonl\n---\n"
    )
    return repo


@pytest.mark.parametrize("streaming", [False, True])
def test_hub_translation_dict_layout(hub_repo: Path, tmp_path: Path, streaming: bool) -> None:
    source = HubDataset(str(hub_repo), "train", "de-en", src_lang="en", tgt_lang="de",
                        streaming=streaming, cache_dir=tmp_path / "cache")
    assert list(source) == PAIRS
    assert source.describe()["fields"] == ["translation.en", "translation.de"]
    valid = HubDataset(str(hub_repo), "validation", "de-en", src_lang="en", tgt_lang="de",
                       streaming=streaming, cache_dir=tmp_path / "cache")
    assert list(valid) == [("yes", "ja")]
    if not streaming:
        assert source.size() == 3


@pytest.mark.parametrize("fmt", ["csv", "parquet", "json"])
def test_hub_plain_columns_through_loaders(tmp_path: Path, fmt: str) -> None:
    table = pa.table({"en": [s for s, _ in PAIRS], "de": [t for _, t in PAIRS], "score": [1, 2, 3]})
    path = tmp_path / f"data.{fmt}"
    if fmt == "parquet":
        pq.write_table(table, path)
    elif fmt == "csv":
        table.to_pandas().to_csv(path, index=False)
    else:
        write_jsonl(path, table.to_pylist())
    by_lang = HubDataset(fmt, "train", src_lang="en", tgt_lang="de", data_files=[str(path)], cache_dir=tmp_path / "c")
    assert list(by_lang) == PAIRS and by_lang.size() == 3
    by_field = HubDataset(fmt, "train", src_field="de", tgt_field="en", data_files=[str(path)],
                          cache_dir=tmp_path / "c")
    assert list(by_field) == [(t, s) for s, t in PAIRS]


@pytest.mark.parametrize(
    ("config", "split", "langs", "message"),
    [
        ("fr-en", "train", ("en", "de"), "cannot load dataset .* config 'fr-en'.*BuilderConfig 'fr-en' not found"),
        ("de-en", "test", ("en", "de"), r"cannot load dataset .*split 'test'.*[Uu]nknown split"),
        ("de-en", "train", ("en", "fr"), r"no language 'fr' in its translations \(de, en\)"),
        ("de-en", "train", (None, None), "give a language code or a field for each side"),
    ],
)
def test_hub_errors_are_one_line(hub_repo: Path, tmp_path: Path, config: str, split: str, langs: tuple,
                                 message: str) -> None:
    with pytest.raises(NmtError, match=message) as caught:
        HubDataset(str(hub_repo), split, config, src_lang=langs[0], tgt_lang=langs[1], cache_dir=tmp_path / "cache")
    assert "\n" not in str(caught.value)


def test_hub_unknown_dataset_and_field(tmp_path: Path) -> None:
    with pytest.raises(NmtError, match="cannot load dataset .*nowhere"):
        HubDataset(str(tmp_path / "nowhere"), "train", src_lang="en", tgt_lang="de")
    path = write_jsonl(tmp_path / "d.jsonl", [{"en": "a", "de": "b"}])
    with pytest.raises(NmtError, match=r"no field 'fr' \(fields: en, de\)"):
        HubDataset("json", "train", src_lang="en", tgt_lang="fr", data_files=[str(path)], cache_dir=tmp_path / "c")


# ---------------------------------------------------------------- carving


def test_carving_is_seeded_and_disjoint(tmp_path: Path) -> None:
    lines = [f"sentence {i}" for i in range(50)]
    source = TextFiles(write_lines(tmp_path / "a.en", lines), write_lines(tmp_path / "a.de", lines))
    carved, rest = carve(source, {"valid": 5, "test": 3}, seed=11)
    again, _ = carve(source, {"valid": 5, "test": 3}, seed=11)
    other, _ = carve(source, {"valid": 5, "test": 3}, seed=12)
    valid, test = list(carved["valid"]), list(carved["test"])
    assert (len(valid), len(test), rest.size()) == (5, 3, 42)
    assert valid == list(again["valid"]) and valid != list(other["valid"])
    assert sorted(valid + test + list(rest)) == sorted(zip(lines, lines, strict=True))
    assert [int(s.split()[1]) for s, _ in valid] == sorted(int(s.split()[1]) for s, _ in valid)  # corpus order kept
    with pytest.raises(NmtError, match="cannot carve 50 valid/test pairs out of 50"):
        carve(source, {"valid": 50}, seed=1)


def test_carving_needs_a_known_size() -> None:
    class Unsized:
        def size(self) -> None:
            return None

    with pytest.raises(NmtError, match="unknown size"):
        carve(Unsized(), {"valid": 1}, seed=1)  # type: ignore[arg-type]
