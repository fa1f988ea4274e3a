"""Shared fixtures: small generated corpora, so the core suite needs no downloaded data."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

MULTI30K = Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k-en-de"

EN_WORDS = "a man woman dog cat runs walks on the street with red blue ball in park young girl boy plays".split()
DE_WORDS = ("ein mann frau hund katze läuft geht auf der straße mit rotem blauem ball im park "
            "junges mädchen junge spielt").split()


@pytest.fixture(scope="session", autouse=True)
def own_compile_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A fresh torch.compile cache for the session (subprocesses inherit it): torch reuses kernels generated
    under another ATEN_CPU_CAPABILITY, which then fail to build ('at::vec' has not been declared)."""
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path_factory.mktemp("inductor"))
    yield
    if previous is None:
        del os.environ["TORCHINDUCTOR_CACHE_DIR"]
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous


def make_parallel(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """A toy parallel corpus: the target is a word-by-word mapping of the source."""
    rng = random.Random(seed)
    src, tgt = [], []
    for _ in range(n):
        idx = [rng.randrange(len(EN_WORDS)) for _ in range(rng.randint(3, 12))]
        src.append(" ".join(EN_WORDS[i] for i in idx))
        tgt.append(" ".join(DE_WORDS[i] for i in idx))
    return src, tgt


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/valid .en/.de files of the toy corpus."""
    root = tmp_path_factory.mktemp("corpus")
    for split, n, seed in (("train", 600, 0), ("valid", 40, 1)):
        src, tgt = make_parallel(n, seed)
        (root / f"{split}.en").write_text("\n".join(src) + "\n", encoding="utf-8")
        (root / f"{split}.de").write_text("\n".join(tgt) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def joint_spm(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A joint SentencePiece model over the toy corpus (vocabulary 300 with byte fallback)."""
    from nmt.tokenizer import train_sentencepiece

    prefix = tmp_path_factory.mktemp("spm") / "joint"
    train_sentencepiece([corpus_dir / "train.en", corpus_dir / "train.de"], prefix, vocab_size=300)
    return Path(f"{prefix}.model")


@pytest.fixture
def multi30k() -> Path:
    if not (MULTI30K / "train.en").is_file():
        pytest.skip("Multi30k data not present")
    return MULTI30K


@pytest.fixture(scope="session")
def toy_data(corpus_dir: Path, joint_spm: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The toy corpus prepared with the joint tokenizer: train and valid splits."""
    from nmt.data import Sources, TextFiles, prepare
    from nmt.tokenizer import Tokenizer

    tok = Tokenizer.load(joint_spm)
    out = tmp_path_factory.mktemp("prepared") / "data"
    sources = Sources(
        train=TextFiles(corpus_dir / "train.en", corpus_dir / "train.de"),
        valid=TextFiles(corpus_dir / "valid.en", corpus_dir / "valid.de"),
    )
    prepare(out, sources, (tok, tok))
    return out


TINY_TRANSFORMER = [
    "model.d_model=32", "model.heads=2", "model.ffn_dim=64", "model.enc_layers=1", "model.dec_layers=1",
    "train.max_tokens=600", "train.warmup=4", "train.lr=0.003", "train.log_every=1", "train.threads=1",
    "train.precision=fp32",  # "auto" would measure the CPU and could pick bf16: tests run in fp32
    "train.select_final=false",  # beam-decoding valid six times at the end: tests/test_train_selection.py turns it on
]


@pytest.fixture(scope="session")
def tiny_models(toy_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The last checkpoint of a tiny Transformer and a tiny GRU trained briefly on the toy data.

    What such a model outputs depends on the CPU's rounding, so tests use these only for
    invariants (batched == alone, beam 1 == greedy, CLI == library), never for what they
    translate; plumbing tests use `copy_model`. Each run directory also holds the checkpoint
    of its half-way update (for averaging).
    """
    from nmt.config import Config, merge, parse_overrides
    from nmt.train import Trainer

    common = ["train.lr=0.01", "train.warmup=10", "model.dropout=0", "train.label_smoothing=0",
              "train.valid_bleu=false", "train.best_metric=loss"]
    rnn = ["model.arch=rnn", "model.cell=gru", "model.embed_dim=64", "model.hidden_size=64",
           "model.enc_layers=1", "model.dec_layers=1"]
    models = {}
    for name, updates, extra in (("transformer", 200, []), ("gru", 200, rnn)):
        run = tmp_path_factory.mktemp("runs") / name
        config = Config()
        merge(config, parse_overrides([*TINY_TRANSFORMER, *common, *extra, f'train.data="{toy_data}"',
                                       f'train.run_dir="{run}"', f"train.max_updates={updates}",
                                       f"train.valid_every={updates // 2}"]))
        models[name] = Trainer(config).train().last_checkpoint
    return models


@pytest.fixture(scope="session")
def copy_spm(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small joint SentencePiece model (64 pieces, no byte fallback) that keeps `copy_model` narrow."""
    from nmt.tokenizer import train_sentencepiece

    prefix = tmp_path_factory.mktemp("copy_spm") / "joint"
    train_sentencepiece([corpus_dir / "train.en", corpus_dir / "train.de"], prefix, vocab_size=64, byte_fallback=False)
    return Path(f"{prefix}.model")


@pytest.fixture(scope="session")
def copy_model(copy_spm: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Transformer checkpoint set, not trained, to copy its input: its output is known on every machine."""
    from nmt.tokenizer import Tokenizer
    from tests.copy_model import save_copy_checkpoint

    return save_copy_checkpoint(Tokenizer.load(copy_spm), tmp_path_factory.mktemp("copy") / "copy.pt")


@pytest.fixture(params=["cpu", "cuda"])
def device(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run a test on the CPU, and on CUDA where there is one (skipped elsewhere).

    On CUDA the test runs in true fp32: TF32 products are off for its duration, and restored after.
    cuDNN's RNNs use TF32 by default, and the CLI's `tune_cpu` (run in-process by the CLI tests)
    turns it on for cuBLAS too; about 10 bits of mantissa would break the tests' fp32 tolerances.
    """
    import torch

    if request.param == "cpu":
        yield "cpu"
        return
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield "cuda"
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture
def train_device(device: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The config overrides that train on `device`. On CUDA also deterministic kernels, which a bitwise resume
    needs there (the CPU's kernels always are); torch's process-wide switch is put back afterwards."""
    if device == "cpu":
        yield ["train.device=cpu"]
        return
    import torch

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what the trainer would set, undone after
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        yield ["train.device=cuda", "train.deterministic=true"]
    finally:
        torch.use_deterministic_algorithms(previous)
