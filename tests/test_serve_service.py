"""The translation service without HTTP: language pairs, limits, decoding options, the request path."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from nmt.errors import NmtError
from nmt.export import export_checkpoint
from nmt.serve.pairs import Pair, parse_pair, resolve_pairs, stored_pair
from nmt.serve.queue import Expired, Job, settle
from nmt.serve.service import Limits, ServeError, Service, TranslateRequest, serving_threads, split_lines
from tests.conftest import make_parallel

SOURCES = make_parallel(4, seed=5)[0]


def test_pairs_from_the_command_line_else_from_the_checkpoint() -> None:
    models = [Path("a.pt"), Path("b.pt")]
    assert resolve_pairs(models, ["en-de", "de-en"]) == [Pair("en", "de"), Pair("de", "en")]
    stored = {Path("a.pt"): Pair("en", "fr"), Path("b.pt"): Pair("fr", "en")}
    assert resolve_pairs(models, [], stored.get) == [Pair("en", "fr"), Pair("fr", "en")]
    with pytest.raises(NmtError, match="b.pt stores no language codes; say which pair it serves with --pair"):
        resolve_pairs(models, [], {Path("a.pt"): Pair("en", "fr")}.get)
    with pytest.raises(NmtError, match="one --pair per --model: 2 model"):
        resolve_pairs(models, ["en-de"])
    with pytest.raises(NmtError, match="one model only, got en-de, en-de"):
        resolve_pairs(models, ["en-de", "en-de"])
    assert parse_pair("pt_BR-en") == Pair("pt_BR", "en")


def test_trained_checkpoints_and_their_exports_carry_the_pair_prepare_found(tiny_models: dict[str, Path],
                                                                            tmp_path: Path) -> None:
    """The toy data came from train.en and train.de: prepare stored en-de, each checkpoint carries it."""
    assert stored_pair(tiny_models["transformer"]) == Pair("en", "de")
    pytest.importorskip("ctranslate2")
    assert stored_pair(export_checkpoint(tiny_models["transformer"], tmp_path / "ct2")) == Pair("en", "de")


@pytest.mark.parametrize("text", ["ende", "en-de-fr", "en-", "en de", "en-d/e", "EN-DE"])
def test_a_malformed_pair_is_refused(text: str) -> None:
    with pytest.raises(NmtError, match="--pair must look like en-de"):
        parse_pair(text)


def test_limits_must_be_positive_and_finite() -> None:
    with pytest.raises(NmtError, match="--max-sentences 0, --timeout -1"):
        Limits(max_sentences=0, timeout=-1).check()
    with pytest.raises(NmtError, match="--timeout inf, --max-work 0"):
        Limits(timeout=math.inf, max_work=0).check()
    for wait in (-1, math.inf, math.nan, 60_001):
        with pytest.raises(NmtError, match=r"--max-wait-ms must be between 0 and 60000 \(a minute\), got "):
            Limits(max_wait_ms=wait).check()


def test_serving_threads_leave_a_core_to_http_and_share_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    assert [serving_threads(0, 1), serving_threads(0, 2), serving_threads(0, 16), serving_threads(3, 2)] == [7, 3, 1, 3]
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    assert serving_threads(0, 1) == 1


def test_split_lines_keeps_every_line_and_empty_texts() -> None:
    assert split_lines(["a\nb", "", "c\n"]) == ([2, 1, 2], ["a", "b", "", "c", ""])


@pytest.fixture(scope="module")
def service(copy_model: Path) -> Iterator[Service]:
    """The copying model as en-de and de-en, loaded in this process (fp32 on the CPU); its workers end after."""
    served = Service([copy_model, copy_model], [Pair("en", "de"), Pair("de", "en")], Limits(max_sentences=4))
    served.load("cpu", "fp32").join(120)
    assert served.ready.is_set() and served.failure is None
    yield served
    served.drain()
    served.join(30)
    assert not any(worker.is_alive() for model in served.models.values() for worker in model.workers)


def test_options_are_complete_keys_and_alternatives_grow_the_default_beam(service: Service) -> None:
    model = service.models[Pair("en", "de")]  # the copying checkpoint: greedy, alpha 0.6

    def options(**fields: object) -> dict[str, object]:
        return dict(model.options(TranslateRequest([], "en", "de", **fields)))  # type: ignore[arg-type]

    assert options() == {"alpha": 0.6, "beam": 1, "nbest": 1}
    assert options(alternatives=2) == {"alpha": 0.6, "beam": 3, "nbest": 3}
    assert options(beam=4, alpha=0.0, nbest=2) == {"alpha": 0.0, "beam": 4, "nbest": 2}
    with pytest.raises(ServeError, match="nbest 3 is larger than the beam size 2") as refused:
        options(beam=2, alternatives=2)  # an explicit beam is the client's to keep
    assert refused.value.status == 400
    for field, value, most in (("nbest", 33, 32), ("beam", 100, 32), ("alternatives", 10**9, 31), ("alpha", 1e3, 10)):
        with pytest.raises(ServeError, match=f"^{field}: at most {most} on this server, got {value}$"):
            options(**{field: value})


def test_a_requests_work_is_its_lines_output_limits_times_the_beam(service: Service) -> None:
    model = service.models[Pair("en", "de")]
    decode = model.engine.decode  # type: ignore[union-attr]
    lines = [SOURCES[0], "", " ".join([SOURCES[1]] * 20)]  # the last beyond the model's 64 positions
    tokens, work = model.measure(lines, model.options(TranslateRequest([], "en", "de", beam=3)))
    assert tokens[1] == 1 and tokens[2] == 64  # an empty line is its EOS; a long one is cut as translation cuts it
    assert work == [3 * min(64, math.floor(decode.max_len_a * tokens[0] + decode.max_len_b)), 0, 3 * 64]
    small = Service([], [], Limits(max_work=10))
    small.models, small.ready = service.models, service.ready
    with pytest.raises(ServeError, match=f"needs up to {work[0]} decoding steps × beams .* the limit is 10") as big:
        asyncio.run(small.translate(TranslateRequest([SOURCES[0]], "en", "de", beam=3)))
    assert big.value.status == 413


def test_a_search_stops_at_the_step_after_every_client_gave_up(service: Service) -> None:
    """The worker's `should_stop` is asked before each decoding step; until it says so, outputs are unchanged."""
    model = service.models[Pair("en", "de")]
    options = model.options(TranslateRequest([], "en", "de", beam=2))
    asked = []

    def never() -> bool:
        asked.append(False)
        return False

    assert [r.best.text for r in model.translate(options, SOURCES, never)] == SOURCES
    steps = len(asked)
    assert steps > 3
    with pytest.raises(Expired):
        model.translate(options, SOURCES, lambda: len(asked) >= steps + 3 or bool(asked.append(False)))
    assert len(asked) == steps + 3  # three steps ran, the fourth was not taken


def test_requests_are_translated_per_text_and_line(service: Service) -> None:
    request = TranslateRequest([f"{SOURCES[0]}\n{SOURCES[1]}", "", SOURCES[2]], "de", "en", alternatives=1)
    results = asyncio.run(service.translate(request))
    assert [[r.best.text for r in text] for text in results] == [[SOURCES[0], SOURCES[1]], [""], [SOURCES[2]]]
    assert [len(r.hypotheses) for text in results for r in text] == [2, 2, 1, 2]  # an empty line has one, empty
    assert asyncio.run(service.translate(TranslateRequest([], "en", "de"))) == []


class ExpiresInTheWorker:
    """The served model, except that its worker finds every job's deadline passed before the server's await
    does (both read the same deadline, so either may see it first)."""

    def __init__(self, model: object) -> None:
        self.model = model

    def __getattr__(self, name: str) -> object:
        return getattr(self.model, name)

    def put(self, job: Job) -> None:
        settle(job.future, error=Expired("the client stopped waiting"))


def test_a_request_the_worker_expires_is_a_504_like_one_the_await_times_out(service: Service) -> None:
    expiring = Service([], [], Limits(timeout=7))
    expiring.models = {Pair("en", "de"): ExpiresInTheWorker(service.models[Pair("en", "de")])}  # type: ignore[dict-item]
    expiring.ready = service.ready
    with pytest.raises(ServeError, match="^the translation took longer than the 7 s timeout$") as timed_out:
        asyncio.run(expiring.translate(TranslateRequest([SOURCES[0]], "en", "de")))
    assert timed_out.value.status == 504


@pytest.mark.parametrize(("request_", "status", "message"), [
    (TranslateRequest(["a"], "en", "fr"), 400, "no model for en-fr; this server translates en-de, de-en"),
    (TranslateRequest(["a\nb\nc", "d\ne"], "en", "de"), 413, "5 sentences in one request; the limit is 4"),
])
def test_refusals_carry_their_status(service: Service, request_: TranslateRequest, status: int, message: str) -> None:
    with pytest.raises(ServeError, match=message) as refused:
        asyncio.run(service.translate(request_))
    assert refused.value.status == status


def test_languages_in_libretranslate_shape(service: Service) -> None:
    assert service.languages() == [{"code": "de", "name": "German", "targets": ["en"]},
                                   {"code": "en", "name": "English", "targets": ["de"]}]
