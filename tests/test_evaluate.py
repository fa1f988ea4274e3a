"""nmt.evaluate: scores equal sacreBLEU's, hand-checked BLEU, significance tests, sentence scores, errors."""

from __future__ import annotations

import importlib.util
import io
import math

import pytest
import sacrebleu
from sacrebleu.metrics import BLEU, CHRF, TER
from sacrebleu.metrics.bleu import _TOKENIZERS
from sacrebleu.significance import PairedTest

from nmt.errors import NmtError
from nmt.evaluate import (
    TOKENIZERS,
    check_aligned,
    compare,
    corpus_scores,
    make_metric,
    parse_metrics,
    read_stream,
    sentence_scores,
    worst,
)

HYPS = [
    "The cat sat on the mat.",
    "A man, in a RED hat, walks quickly!",
    "Dogs don't like rain; they're wet.",
    "我们今天去公园散步。",
    "Prices rose 3.5% to $1,200 in 2023-24.",
    "",
    "Ein Mann fährt Fahrrad über die Brücke.",
]
REF1 = [
    "The cat is sitting on the mat.",
    "A man in a red hat walks fast!",
    "Dogs do not like the rain; they are wet.",
    "我们今天在公园散步。",
    "Prices rose by 3.5% to $1,200 in 2023-24.",
    "Nothing was translated.",
    "Ein Mann fährt mit dem Fahrrad über eine Brücke.",
]
REF2 = [
    "On the mat sat the cat.",
    "A MAN wearing a red hat is walking quickly.",
    "Dogs dislike rain, since they get wet.",
    "今天我们去公园散步了。",
    "Prices increased 3.5 % to $1200 in 2023-24.",
    "Empty.",
    "Ein Radfahrer überquert die Brücke.",
]


def _offline(tokenize: str) -> None:
    """Skip tokenizers this machine cannot build without the network or extra packages."""
    if _TOKENIZERS[tokenize].startswith("tokenizer_spm"):
        pytest.skip(f"{tokenize} downloads its SentencePiece model at first use")
    try:
        make_metric("bleu", tokenize)
    except NmtError as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("lowercase", [False, True])
@pytest.mark.parametrize("tokenize", TOKENIZERS)
def test_bleu_equals_sacrebleu_for_every_tokenizer(tokenize: str, lowercase: bool) -> None:
    _offline(tokenize)
    refs = [REF1, REF2]
    ours = corpus_scores(HYPS, refs, metrics="bleu", tokenize=tokenize, lowercase=lowercase)["bleu"]
    metric = BLEU(tokenize=tokenize, lowercase=lowercase)
    theirs = metric.corpus_score(HYPS, refs)
    assert ours.score == theirs.score
    assert ours.signature == metric.get_signature().format()
    assert f"tok:{metric.tokenizer_signature}" in ours.signature and ("case:lc" in ours.signature) == lowercase
    assert ours.score == sacrebleu.corpus_bleu(HYPS, refs, tokenize=tokenize, lowercase=lowercase).score


@pytest.mark.parametrize("lowercase", [False, True])
def test_chrf_chrfpp_ter_equal_sacrebleu(lowercase: bool) -> None:
    refs = [REF1, REF2]
    ours = corpus_scores(HYPS, refs, metrics="chrf,chrf++,ter", lowercase=lowercase)
    expected = {
        "chrf": CHRF(lowercase=lowercase),
        "chrf++": CHRF(word_order=2, lowercase=lowercase),
        "ter": TER(),
    }
    assert list(ours) == ["chrf", "chrf++", "ter"]
    for key, metric in expected.items():
        theirs = metric.corpus_score(HYPS, refs)
        assert (ours[key].name, ours[key].score) == (theirs.name, theirs.score)
        assert ours[key].signature == metric.get_signature().format()
    assert [s.name for s in ours.values()] == ["chrF2", "chrF2++", "TER"]


def test_one_reference_list_or_a_list_of_streams() -> None:
    single = corpus_scores(HYPS, REF1, metrics=["bleu", "chrf"])
    streams = corpus_scores(HYPS, [REF1], metrics=["bleu", "chrf"])
    assert single == streams
    assert single["bleu"].score == sacrebleu.corpus_bleu(HYPS, [REF1]).score
    assert "nrefs:1" in single["bleu"].signature
    assert "nrefs:2" in corpus_scores(HYPS, [REF1, REF2], metrics="bleu")["bleu"].signature


def test_tiny_bleu_by_hand() -> None:
    hyp, ref = "the cat sat on the mat", "the cat sat on a red mat"
    # 1-grams: the(x2, clipped to 1) cat sat on mat -> 5 of 6
    # 2-grams: "the cat" "cat sat" "sat on" match; "on the" "the mat" do not -> 3 of 5
    # 3-grams: "the cat sat" "cat sat on" match -> 2 of 4
    # 4-grams: "the cat sat on" matches -> 1 of 3
    precisions = [5 / 6, 3 / 5, 2 / 4, 1 / 3]
    brevity_penalty = math.exp(1 - 7 / 6)  # hypothesis 6 words, reference 7
    expected = 100 * brevity_penalty * math.prod(precisions) ** (1 / 4)
    assert expected == pytest.approx(45.4802, abs=1e-4)
    score = corpus_scores([hyp], [ref], metrics="bleu")["bleu"]
    assert score.score == pytest.approx(expected, abs=1e-9)
    assert score.details.startswith("83.3/60.0/50.0/33.3 (BP = 0.846 ratio = 0.857 hyp_len = 6 ref_len = 7)")
    assert str(score).startswith("BLEU|nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    assert " = 45.48 83.3/60.0/50.0/33.3" in str(score)


def test_sentence_scores_and_worst() -> None:
    metrics = ("bleu", "chrf", "ter")
    sentences = sentence_scores(HYPS, [REF1, REF2], metrics=metrics)
    assert [s.line for s in sentences] == list(range(1, len(HYPS) + 1))
    bleu, chrf, ter = BLEU(effective_order=True), CHRF(), TER()
    for s, hyp, r1, r2 in zip(sentences, HYPS, REF1, REF2, strict=True):
        assert s.hypothesis == hyp and s.references == (r1, r2)
        assert s.scores == {
            "bleu": bleu.sentence_score(hyp, [r1, r2]).score,
            "chrf": chrf.sentence_score(hyp, [r1, r2]).score,
            "ter": ter.sentence_score(hyp, [r1, r2]).score,
        }
    lowest = worst(sentences, "bleu", 2)
    assert [s.scores["bleu"] for s in lowest] == sorted(s.scores["bleu"] for s in sentences)[:2]
    assert [s.line for s in lowest] == [4, 6]  # one-token Chinese line and the empty one tie at 0: file order
    assert ([s.scores["ter"] for s in worst(sentences, "ter", 3)]
            == sorted((s.scores["ter"] for s in sentences), reverse=True)[:3])


# Significance: a toy test set where one system is much better than the other.
_WORDS = "a man woman dog cat runs walks on the street with red blue ball".split()
_REFS = [" ".join(_WORDS[(i * 7 + j * 3) % len(_WORDS)] for j in range(8)) for i in range(60)]
_GOOD = list(_REFS)
_GOOD[::10] = [r.replace("the", "a") for r in _REFS[::10]]
_BAD = [" ".join(reversed(r.split()[:6])) for r in _REFS]
_MIXED = [g if i % 3 else b for i, (g, b) in enumerate(zip(_GOOD, _BAD, strict=True))]


def _edit(sentence: str, position: int, word: str) -> str:
    words = sentence.split()
    words[position] = word
    return " ".join(words)


# Two close systems that differ on every line, so resampled differences never tie with the observed one.
_ONE_ERROR = [_edit(r, i % 8, "x") for i, r in enumerate(_REFS)]
_SOME_TWO = [_edit(r, (i * 5 + 2) % 8, "y") if i % 8 else _edit(_edit(r, (i * 5 + 2) % 8, "y"), (i * 3 + 1) % 8, "zz")
             for i, r in enumerate(_REFS)]


def test_identical_systems_are_not_significantly_different() -> None:
    results = compare(_MIXED, list(_MIXED), _REFS, metrics="bleu,chrf,ter", bootstrap_samples=200, ar_trials=500)
    for c in results.values():
        assert c.p_bootstrap == 1.0 and c.p_ar == 1.0
        assert c.baseline == c.system
        assert c.system.ci > 0
        assert "|bs:200|ar:500|seed:12345|" in c.signature


def test_sacrebleu_paired_test_gives_identical_systems_the_smallest_p() -> None:
    """Why nmt.evaluate replays the tests: sacreBLEU 2.6 counts only strictly larger differences."""
    _, scores = PairedTest([("base", _MIXED), ("same", list(_MIXED))], {"BLEU": BLEU()}, [_REFS], test_type="bs",
                           n_samples=200)()
    assert scores["BLEU"][1].p_value == pytest.approx(1 / 201)


def test_clearly_better_system_has_small_p() -> None:
    results = compare(_GOOD, _BAD, _REFS, metrics="bleu,chrf", bootstrap_samples=200, ar_trials=500)
    for c in results.values():
        assert c.system.score > c.baseline.score + 20
        assert c.p_bootstrap == pytest.approx(1 / 201) and c.p_ar == pytest.approx(1 / 501)
        assert c.system.mean - c.system.ci > c.baseline.mean + c.baseline.ci  # the intervals do not overlap


def test_paired_tests_replay_sacrebleu_draws(monkeypatch: pytest.MonkeyPatch) -> None:
    """Away from ties, p-values, means and intervals are sacreBLEU's own (same seed, same draws)."""
    monkeypatch.setenv("SACREBLEU_SEED", "7")
    ours = compare(_ONE_ERROR, _SOME_TWO, _REFS, metrics="bleu,chrf", bootstrap_samples=300, ar_trials=400, seed=7)
    for test_type, samples in (("bs", 300), ("ar", 400)):
        _, theirs = PairedTest(
            [("base", _SOME_TWO), ("sys", _ONE_ERROR)], {"BLEU": BLEU(), "chrF2": CHRF()}, [_REFS], test_type=test_type,
            n_samples=samples,
        )()
        for key, name in (("bleu", "BLEU"), ("chrf", "chrF2")):
            base, system = theirs[name]
            assert 0.01 < system.p_value < 0.99  # a case without ties
            if test_type == "ar":
                assert ours[key].p_ar == system.p_value
                continue
            assert ours[key].p_bootstrap == system.p_value
            assert ours[key].system.score == system.score and ours[key].baseline.score == base.score
            assert (ours[key].system.mean, ours[key].system.ci) == pytest.approx((system.mean, system.ci), abs=1e-4)
            assert (ours[key].baseline.mean, ours[key].baseline.ci) == pytest.approx((base.mean, base.ci), abs=1e-4)


def test_seed_fixes_the_result() -> None:
    run = lambda seed: compare(_MIXED, _BAD, _REFS, metrics="bleu", bootstrap_samples=100, ar_trials=100,  # noqa: E731
                               seed=seed)["bleu"]
    assert run(1) == run(1)
    assert run(1).system.ci != run(2).system.ci


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: parse_metrics("bleu,blue"), "unknown metric 'blue'; choose from bleu, chrf, chrf++, ter"),
        (lambda: parse_metrics(" , "), "no metric given"),
        (lambda: corpus_scores(HYPS, REF1, tokenize="moses"), "unknown tokenizer 'moses'; choose from"),
        (lambda: corpus_scores([], [], metrics="bleu"), "no references given"),
        (lambda: corpus_scores([], [[]], metrics="bleu"), "no hypotheses to score"),
        (lambda: corpus_scores(HYPS, REF1[:-1]), "7 hypotheses but reference 1 has 6 lines"),
        (lambda: sentence_scores(HYPS, [REF1, REF2[:3]]), "7 hypotheses but reference 2 has 3 lines"),
        (lambda: compare(HYPS, HYPS[:2], REF1), "7 hypotheses but the baseline has 2 lines"),
        (lambda: compare(HYPS, HYPS, REF1, ar_trials=0), "--ar-trials must be between 1 and 100,000, got 0"),
        (lambda: compare(HYPS, HYPS, REF1, bootstrap_samples=10**9),  # once an attempt to allocate 373 GiB
         "--bootstrap-samples must be between 1 and 100,000, got 1000000000"),
        (lambda: compare(HYPS, HYPS, REF1, seed=-1), "seed must be 0 or more"),
        (lambda: check_aligned([("h.txt", ["a"] * 3), ("r.txt", ["a"] * 3), ("r2.txt", ["a"] * 4)]),
         "line counts differ: h.txt has 3 lines, r2.txt has 4"),
        (lambda: read_stream(io.BytesIO(b"fine\n\xff\xfe\n")), "<stdin>: line 2 is not valid UTF-8 (byte 0)"),
        (lambda: read_stream(io.BytesIO(b"")), "<stdin>: no hypotheses (empty input)"),
    ],
)
def test_user_errors(call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(NmtError) as info:
        call()
    assert message in str(info.value)


@pytest.mark.skipif(importlib.util.find_spec("MeCab") is not None, reason="MeCab is installed")
def test_tokenizer_without_its_extras_is_a_one_line_error() -> None:
    with pytest.raises(NmtError) as info:
        corpus_scores(HYPS, REF1, tokenize="ja-mecab")
    assert "tokenizer 'ja-mecab' is unavailable" in str(info.value) and "\n" not in str(info.value)


def test_read_stream_strips_newlines_and_keeps_blank_lines() -> None:
    assert read_stream(io.BytesIO("a b\r\n\nc ü\n".encode())) == ["a b", "", "c ü"]


def test_pretokenised_text_scored_with_tokenize_none_gets_no_detokenize_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    lines = [f"Satz Nummer {i} ." for i in range(200)]  # sacreBLEU warns above 100 lines ending in " ."
    with caplog.at_level("WARNING"):
        assert corpus_scores(lines, lines, metrics=("bleu",), tokenize="none")["bleu"].score == pytest.approx(100.0)
        assert "detokenize" not in caplog.text
        corpus_scores(lines, lines, metrics=("bleu",))
        assert "detokenize" in caplog.text  # the warning stays for the default tokenizer


def test_moses_tokenised_bleu_matches_scoring_pretokenised_text() -> None:
    pytest.importorskip("sacremoses")
    from nmt.evaluate import moses_tokenize

    assert moses_tokenize(['Ein Mann (mit Hut) sagt "hallo".'], "de") == ['Ein Mann ( mit Hut ) sagt " hallo " .']
    hyps = ["Ein Mann (mit Hut) läuft.", "Zwei Hunde spielen im Schnee!"]
    refs = ["Ein Mann (mit einem Hut) geht.", "Zwei Hunde spielen im Schnee."]
    expected = sacrebleu.corpus_bleu(
        [h.lower() for h in moses_tokenize(hyps, "de")], [[r.lower() for r in moses_tokenize(refs, "de")]],
        tokenize="none",
    ).score
    ours = corpus_scores(moses_tokenize(hyps, "de"), moses_tokenize(refs, "de"), metrics=("bleu",), tokenize="none",
                         lowercase=True)
    assert ours["bleu"].score == pytest.approx(expected)
