"""`nmt import`: a random MarianMT model saved by Hugging Face, imported, computes what Hugging Face computes.

Shared and separate vocabularies; ids, teacher-forced log-probabilities over the whole
vocabulary, greedy outputs in a padded batch, and nmt's score of each of Hugging Face's
beam outputs. Beam outputs themselves may differ: Hugging Face stops a sentence once
`num_beams` hypotheses finished and no live beam could (by its heuristic) beat them,
while nmt's search is exact, so only the scores are compared. Bad folders are one line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from nmt.checkpoint import load_checkpoint
from nmt.config import DecodeConfig
from nmt.data import encode_source, pad_sources
from nmt.errors import NmtError
from nmt.importers import import_marian
from nmt.models import build_model
from nmt.search import Hypothesis, search
from nmt.tokenizer import BOS_ID, BOS_PIECE
from tests.conftest import make_parallel
from tests.marian_folder import build_marian_folder
from tests.test_search import teacher_forced

pytest.importorskip("transformers")
TEXTS = make_parallel(6, seed=3)[0] + ["a zebra plays: 42 ÷ 7"]  # unknown characters too
MAX_LENGTH = 40  # Hugging Face's max_length counts the decoder's start token


@pytest.fixture(scope="module", params=["shared", "separate"])
def marian(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A saved random MarianMT folder, Hugging Face's model and tokenizer, and the nmt model imported from it."""
    from transformers import MarianMTModel, MarianTokenizer

    separate = request.param == "separate"
    folder = build_marian_folder(tmp_path_factory.mktemp(request.param) / "opus-mt-en-de", separate=separate,
                                 seed=3 if separate else 0)  # seeds whose outputs end at mixed lengths
    path = folder.parent / "model.pt"
    import_marian(folder).save(path)
    checkpoint = load_checkpoint(path)
    model = build_model(checkpoint.config.model).eval()
    model.load_state_dict(checkpoint.model_state)
    return {"folder": folder, "checkpoint": checkpoint, "model": model,
            "hf": MarianMTModel.from_pretrained(folder).eval(), "tokenizer": MarianTokenizer.from_pretrained(folder)}


def vocab(marian: dict, side: str) -> dict[str, int]:
    name = "target_vocab.json" if side == "tgt" and (marian["folder"] / "target_vocab.json").exists() else "vocab.json"
    return json.loads((marian["folder"] / name).read_text(encoding="utf-8"))


def marian_ids(marian: dict, side: str, ids: list[int]) -> list[int]:
    """nmt ids -> Marian's, through the two vocabularies."""
    table = getattr(marian["checkpoint"], f"{side}_tokenizer").vocabulary
    return [vocab(marian, side)[table[i]] for i in ids]


def nmt_target_ids(marian: dict, ids: list[int]) -> list[int]:
    """Marian's target ids -> nmt's."""
    inverse = {vocab(marian, "tgt")[piece]: i for i, piece in enumerate(marian["checkpoint"].tgt_tokenizer.vocabulary)
               if piece != BOS_PIECE}
    return [inverse[i] for i in ids]


def test_the_checkpoint_is_an_ordinary_one(marian: dict) -> None:
    checkpoint = marian["checkpoint"]
    model = checkpoint.config.model
    assert (model.norm, model.activation, model.position_layout, model.output_bias) == ("post", "swish",
                                                                                        "concatenated", True)
    assert checkpoint.languages == ("en", "de") and checkpoint.train_state is None
    assert checkpoint.config.decode.beam == 3 and checkpoint.config.decode.length_penalty == "average"
    assert all(v.dtype == torch.float32 for v in checkpoint.model_state.values())
    assert checkpoint.src_tokenizer.vocabulary[:4] == ("<pad>", "<unk>", "<s>", "</s>")


def test_source_ids_are_hugging_faces(marian: dict) -> None:
    theirs = marian["tokenizer"](TEXTS)["input_ids"]
    ours = [marian_ids(marian, "src", encode_source(marian["checkpoint"].src_tokenizer, t)) for t in TEXTS]
    assert ours == theirs
    assert 1 in theirs[-1]  # <unk>: a piece outside the vocabulary


def test_teacher_forced_log_probabilities_agree_over_the_whole_vocabulary(marian: dict) -> None:
    """Padded batch; every Marian column compared, and nmt's extra <s> column takes no probability."""
    checkpoint, tokenizer = marian["checkpoint"], marian["tokenizer"]
    targets = make_parallel(6, seed=3)[1] + ["ein hund"]
    batch = tokenizer(TEXTS, text_target=targets, padding=True, return_tensors="pt")
    with torch.no_grad():
        theirs = marian["hf"](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              labels=batch["labels"]).logits.log_softmax(-1)
    src, mask = pad_sources([encode_source(checkpoint.src_tokenizer, t) for t in TEXTS])
    tgt = [checkpoint.tgt_tokenizer.encode(t) for t in targets]
    tgt_in = torch.zeros(len(tgt), max(map(len, tgt)) + 1, dtype=torch.long)
    for row, ids in enumerate(tgt):
        tgt_in[row, : len(ids) + 1] = torch.tensor([BOS_ID, *ids])
        assert marian_ids(marian, "tgt", ids) == batch["labels"][row, : len(ids)].tolist()
    with torch.no_grad():
        ours = marian["model"](src, mask, tgt_in).log_softmax(-1)
    assert torch.all(ours[..., BOS_ID] == float("-inf"))
    table = checkpoint.tgt_tokenizer.vocabulary
    columns = [i for i, piece in enumerate(table) if piece != BOS_PIECE]
    for row, ids in enumerate(tgt):
        steps = len(ids) + 1
        torch.testing.assert_close(ours[row, :steps, columns],
                                   theirs[row, :steps, marian_ids(marian, "tgt", columns)], rtol=0, atol=1e-5)


def hf_generate(marian: dict, beams: int, ban_unk: bool = False) -> tuple[list[list[int]], list[float]]:
    """Hugging Face's outputs in a padded batch (Marian ids, start token dropped) and their sequence scores."""
    batch = marian["tokenizer"](TEXTS, padding=True, return_tensors="pt")
    pad = marian["hf"].config.pad_token_id
    banned = [[pad]] + [[marian["tokenizer"].unk_token_id]] * ban_unk
    with torch.no_grad():
        out = marian["hf"].generate(**batch, num_beams=beams, num_return_sequences=beams, do_sample=False,
                                    max_length=MAX_LENGTH, output_scores=True, return_dict_in_generate=True,
                                    bad_words_ids=banned)
    outputs = [[t for t in row.tolist()[1:] if t != pad] for row in out.sequences]
    scores = out.sequences_scores.tolist() if beams > 1 else [0.0] * len(outputs)
    return outputs, scores


def nmt_search(marian: dict, decode: DecodeConfig) -> tuple[torch.Tensor, torch.Tensor, list[list[Hypothesis]]]:
    checkpoint = marian["checkpoint"]
    src, mask = pad_sources([encode_source(checkpoint.src_tokenizer, t) for t in TEXTS])
    with torch.no_grad():
        return src, mask, search(marian["model"], src, mask, decode)


def test_greedy_outputs_are_identical_in_a_padded_batch(marian: dict) -> None:
    decode = DecodeConfig(beam=1, max_len_a=0.0, max_len_b=MAX_LENGTH - 1)  # the same limit, EOS counted
    theirs, _ = hf_generate(marian, beams=1)
    _, _, found = nmt_search(marian, decode)
    ours = [marian_ids(marian, "tgt", hyps[0].tokens) for hyps in found]
    assert ours == theirs
    lengths = [len(tokens) for tokens in ours]
    assert min(lengths) < max(lengths) and min(lengths) < MAX_LENGTH - 1  # mixed lengths, some ended by EOS


def test_nmt_scores_hugging_faces_beam_outputs_as_hugging_face_does(marian: dict) -> None:
    """Each beam output that ended with EOS (those cut at max_length get a forced EOS scored 0 by Hugging
    Face), teacher-forced through nmt and divided by length ** 1.0, EOS counted, is Hugging Face's score."""
    theirs, scores = hf_generate(marian, beams=3)
    checkpoint = marian["checkpoint"]
    src, mask = pad_sources([encode_source(checkpoint.src_tokenizer, t) for t in TEXTS])
    ended = [k for k, tokens in enumerate(theirs) if len(tokens) < MAX_LENGTH - 1]
    assert len(ended) >= 6
    sentences = [k // 3 for k in ended]
    raw = teacher_forced(marian["model"], src[sentences], mask[sentences],
                         [[Hypothesis(nmt_target_ids(marian, theirs[k]), 0.0, 0.0)] for k in ended])
    ours = [r / len(theirs[k]) for r, k in zip(raw, ended, strict=True)]
    assert ours == pytest.approx([scores[k] for k in ended], abs=1e-5)


def break_folder(folder: Path, tmp_path: Path, change: str) -> Path:
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    config = json.loads((broken / "config.json").read_text())
    if change == "missing":
        (broken / "target.spm").unlink()
    elif change == "activation":
        (broken / "config.json").write_text(json.dumps({**config, "activation_function": "gelu_new"}))
    elif change == "vocabulary":
        vocab = json.loads((broken / "vocab.json").read_text())
        vocab.pop(next(p for p in vocab if p.startswith("▁")))
        (broken / "vocab.json").write_text(json.dumps({p: i for i, p in enumerate(sorted(vocab, key=vocab.get))}))
    elif change == "truncated":
        data = (broken / "model.safetensors").read_bytes()
        (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif change == "pre-norm":
        (broken / "config.json").write_text(json.dumps({**config, "normalize_before": True}))
    return broken


@pytest.mark.parametrize(("change", "message"), [
    ("missing", "no target.spm, so not a MarianMT model folder"),
    ("activation", "config.json: activation_function 'gelu_new' is not supported"),
    ("vocabulary", "vocab.json: .* pieces, but config.json vocab_size is"),
    ("truncated", "model.safetensors: corrupt or truncated weights"),
    ("pre-norm", "config.json: normalize_before = true is not supported"),
])
def test_bad_folders_are_one_line_errors(marian: dict, tmp_path: Path, change: str, message: str) -> None:
    with pytest.raises(NmtError, match=message) as error:
        import_marian(break_folder(marian["folder"], tmp_path, change))
    assert "\n" not in str(error.value)


def test_a_path_that_is_neither_folder_nor_hub_id_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(NmtError, match="not a folder, nor a hub model id"):
        import_marian(tmp_path / "no" / "such" / "place")


def test_the_export_to_ctranslate2_gives_nmts_greedy_outputs_and_hugging_faces_texts(marian: dict,
                                                                                     tmp_path: Path) -> None:
    """Swish, the concatenated sinusoids, the logit bias (its -inf <s> column) and the id table, through
    CTranslate2: the same tokens and texts as nmt, and the texts Hugging Face's tokenizer decodes."""
    pytest.importorskip("ctranslate2")
    from nmt.engines import CT2Translator
    from nmt.export import export_checkpoint
    from nmt.translate import Translator

    path = tmp_path / "model.pt"
    marian["checkpoint"].save(path)
    folder = export_checkpoint(path, tmp_path / "ct2")
    # <unk> banned: Hugging Face writes it as "<unk>" in text, nmt (SentencePiece) as " ⁇ "
    decode = DecodeConfig(beam=1, max_len_a=0.0, max_len_b=MAX_LENGTH - 1, ban_unk=True)
    ours = Translator(marian["checkpoint"], decode=decode, device="cpu", precision="fp32").translate_lines(TEXTS)
    theirs = CT2Translator(folder, decode=decode, device="cpu", precision="fp32", threads=1).translate_lines(TEXTS)
    hf_ids, _ = hf_generate(marian, beams=1, ban_unk=True)
    for a, b, ids in zip(ours, theirs, hf_ids, strict=True):
        assert b.best.tokens == a.best.tokens and b.best.text == a.best.text
        assert marian_ids(marian, "tgt", a.best.tokens) == ids
        assert a.best.text == marian["tokenizer"].decode(ids, skip_special_tokens=True)


def test_nmt_import_writes_a_checkpoint_and_refuses_to_overwrite_it(marian: dict, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    runner, out = CliRunner(), tmp_path / "imported.pt"
    result = runner.invoke(app, ["import", str(marian["folder"]), "-o", str(out)])
    assert result.exit_code == 0, result.output
    imported, expected = load_checkpoint(out), marian["checkpoint"]
    assert imported.config == expected.config and imported.tgt_tokenizer == expected.tgt_tokenizer
    assert all(torch.equal(v, expected.model_state[k]) for k, v in imported.model_state.items())
    for args, message in ((["import", str(marian["folder"]), "-o", str(out)], "already exists"),
                          (["import", str(tmp_path / "none"), "-o", str(tmp_path / "x.pt")], "not a folder")):
        result = runner.invoke(app, args)
        assert result.exit_code == 1 and message in result.output and len(result.output.strip().splitlines()) == 1
