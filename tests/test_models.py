from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from nmt.config import ModelConfig
from nmt.errors import NmtError
from nmt.models import build_model
from nmt.models.transformer import sinusoids
from nmt.tokenizer import BOS_ID, EOS_ID, PAD_ID

VOCAB = 20


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from more threads, and on a shared machine they lose a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TRANSFORMER = ModelConfig(
    arch="transformer", src_vocab_size=VOCAB, tgt_vocab_size=VOCAB, joint_vocab=True,
    d_model=32, heads=4, ffn_dim=64, enc_layers=2, dec_layers=2, max_positions=64,
)
RNN = ModelConfig(
    arch="rnn", src_vocab_size=VOCAB, tgt_vocab_size=VOCAB, joint_vocab=True,
    embed_dim=16, hidden_size=32, enc_layers=2, dec_layers=2,
)
CONFIGS = {
    "transformer-pre": TRANSFORMER,
    "transformer-post": replace(TRANSFORMER, norm="post"),
    "transformer-learned-gelu": replace(TRANSFORMER, positions="learned", activation="gelu", enc_layers=1,
                                        dec_layers=3),
    "transformer-marian": replace(TRANSFORMER, norm="post", activation="swish", position_layout="concatenated",
                                  output_bias=True),
    **{
        f"{cell}-{attention}": replace(RNN, cell=cell, attention=attention)
        for cell in ("lstm", "gru", "rnn")
        for attention in ("dot", "general", "bahdanau")
    },
    "lstm-no-feeding-no-bridge": replace(RNN, input_feeding=False, bridge=False, enc_layers=1, dec_layers=3),
    "gru-no-feeding": replace(RNN, cell="gru", input_feeding=False),
}


def make_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(CONFIGS[name]).eval()
    if model.output_bias() is not None:  # a bias that matters
        with torch.no_grad():
            model.output_bias().normal_()
    return model


def padded_batch(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random real tokens of the given lengths, padded with PAD_ID; returns tokens (B, L) and mask."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, VOCAB, (len(lengths), max(lengths)), generator=gen)
    mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    return tokens.masked_fill(~mask, PAD_ID), mask


def toy_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """src (4, 7) with its mask, and tgt_in (4, 6) starting with BOS, with its mask."""
    src, src_mask = padded_batch([7, 3, 5, 1], seed=1)
    tgt, tgt_mask = padded_batch([6, 2, 4, 6], seed=2)
    tgt[:, 0] = BOS_ID
    return src, src_mask, tgt, tgt_mask


def full_log_probs(model: torch.nn.Module, src: torch.Tensor, mask: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(model(src, mask, tgt).float(), dim=-1)


def encoder_outputs(memory: object) -> torch.Tensor:
    """(B, S, D) encoder outputs from either architecture's memory."""
    return memory if isinstance(memory, torch.Tensor) else memory[0]


@pytest.mark.parametrize("keep_attention", [False, True])
@pytest.mark.parametrize("name", CONFIGS)
@torch.no_grad()
def test_step_matches_forward_also_after_reorder(name: str, keep_attention: bool, device: str) -> None:
    model = make_model(name).to(device)
    src, src_mask, tgt, _ = (t.to(device) for t in toy_batch())
    full = full_log_probs(model, src, src_mask, tgt)
    state = model.init_state(model.encode(src, src_mask), src_mask, keep_attention=keep_attention)
    for t in range(3):
        log_probs, state = model.step(tgt[:, t], state)
        assert log_probs.dtype == torch.float32
        torch.testing.assert_close(log_probs, full[:, t], rtol=0, atol=1e-5)
    # beam-style: reorder the sentences and give each two rows that share its per-sentence entries
    order = torch.randperm(4, generator=torch.Generator().manual_seed(3)).to(device)
    index = order.repeat_interleave(2)
    state = model.reorder_state(state, index, order)
    full = full_log_probs(model, src[index], src_mask[index], tgt[index])
    for t in range(3, tgt.size(1)):
        log_probs, state = model.step(tgt[index, t], state)
        torch.testing.assert_close(log_probs, full[:, t], rtol=0, atol=1e-5)
        if keep_attention:
            weights = state["attention"]  # (B', layers, S)
            torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:2], device=device))
            assert not weights.masked_select(~src_mask[index][:, None, :]).any()
    assert keep_attention == ("attention" in state)


@pytest.mark.parametrize("name", CONFIGS)
@torch.no_grad()
def test_padding_invariance_and_no_nan(name: str) -> None:
    model = make_model(name)
    src, src_mask, tgt, tgt_mask = toy_batch()
    memory = encoder_outputs(model.encode(src, src_mask))
    full = full_log_probs(model, src, src_mask, tgt)
    assert torch.isfinite(full).all() and torch.isfinite(memory).all()
    for i in range(src.size(0)):
        s, t = int(src_mask[i].sum()), int(tgt_mask[i].sum())
        alone_src, alone_mask = src[i : i + 1, :s], src_mask[i : i + 1, :s]
        alone = encoder_outputs(model.encode(alone_src, alone_mask))
        torch.testing.assert_close(memory[i, :s], alone[0], rtol=0, atol=1e-5)
        alone_full = full_log_probs(model, alone_src, alone_mask, tgt[i : i + 1, :t])
        torch.testing.assert_close(full[i, :t], alone_full[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", CONFIGS)
@torch.no_grad()
def test_causality(name: str) -> None:
    model = make_model(name)
    src, src_mask, tgt, _ = toy_batch()
    changed = tgt.clone()
    changed[:, 3] = torch.where(tgt[:, 3] == 5, 6, 5)
    before, after = full_log_probs(model, src, src_mask, tgt), full_log_probs(model, src, src_mask, changed)
    torch.testing.assert_close(before[:, :3], after[:, :3], rtol=0, atol=0)
    assert (before[:, 3:] - after[:, 3:]).abs().amax(dim=(1, 2)).min() > 1e-6  # every row sees the change


@pytest.mark.parametrize("base", [TRANSFORMER, RNN], ids=["transformer", "rnn"])
def test_tied_and_shared_weights_are_one_tensor(base: ModelConfig) -> None:
    model = build_model(base)
    assert model.embed.src is model.embed.tgt
    assert model.output.weight is model.embed.tgt.weight
    assert model.output.weight.data_ptr() == model.embed.src.weight.data_ptr()
    untied = build_model(replace(base, joint_vocab=False, share_embeddings=False, tie_output=False, src_vocab_size=30))
    assert untied.embed.src.weight.data_ptr() != untied.embed.tgt.weight.data_ptr()
    assert untied.output.weight.data_ptr() != untied.embed.tgt.weight.data_ptr()
    assert untied.output.weight.shape == (VOCAB, untied.embed.tgt.embedding_dim)
    separate = build_model(replace(base, joint_vocab=False, share_embeddings=False, src_vocab_size=30))
    assert separate.embed.src is not separate.embed.tgt and separate.output.weight is separate.embed.tgt.weight
    with pytest.raises(NmtError, match="share_embeddings"):
        build_model(replace(base, joint_vocab=False))
    with pytest.raises(NmtError, match="joint_vocab"):
        build_model(replace(base, src_vocab_size=30))


@pytest.mark.parametrize("cell", ["transformer", "lstm", "gru", "rnn"])
def test_initial_loss_is_near_uniform_at_recipe_size(cell: str) -> None:
    """A tied output layer starts near the uniform distribution (loss about ln V) at the recipes'
    width and vocabulary; N(0, 1) tables started the RNN decoders at 12 (LSTM) to 41 (Elman) and GRU/Elman
    never recovered."""
    vocab = 8000
    if cell == "transformer":
        config = replace(TRANSFORMER, src_vocab_size=vocab, tgt_vocab_size=vocab, d_model=256, heads=4, ffn_dim=1024)
    else:
        config = replace(RNN, src_vocab_size=vocab, tgt_vocab_size=vocab, cell=cell, embed_dim=256, hidden_size=512)
    torch.manual_seed(0)
    model = build_model(replace(config, dropout=0.0)).eval()
    gen = torch.Generator().manual_seed(3)
    src, tgt = torch.randint(4, vocab, (8, 12), generator=gen), torch.randint(4, vocab, (8, 11), generator=gen)
    with torch.no_grad():
        logits = model(src, torch.ones_like(src, dtype=torch.bool), tgt[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tgt[:, 1:].flatten())
    assert abs(loss.item() - math.log(vocab)) < 1.5


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"arch": "cnn"}, "model.arch 'cnn'"),
        ({"arch": "rnn", "cell": "tree"}, "model.cell"),
        ({"arch": "rnn", "attention": "cosine"}, "model.attention"),
        ({"arch": "rnn", "hidden_size": 33}, "even"),
        ({"norm": "sandwich"}, "model.norm"),
        ({"activation": "tanh"}, "model.activation 'tanh'; choose one of relu, gelu, swish"),
        ({"position_layout": "spiral"}, "model.position_layout"),
        ({"heads": 5}, "divisible"),
        ({"src_vocab_size": 0, "tgt_vocab_size": 0}, "vocabulary sizes"),
    ],
)
def test_bad_options_raise_nmt_error(change: dict, message: str) -> None:
    with pytest.raises(NmtError, match=message):
        build_model(replace(TRANSFORMER, **change))


def test_too_long_sequence_is_an_nmt_error() -> None:
    model = build_model(replace(TRANSFORMER, max_positions=8))
    assert model.max_positions == 8 and build_model(RNN).max_positions is None
    src, src_mask = padded_batch([9], seed=0)
    with pytest.raises(NmtError, match="max_positions=8"):
        model.encode(src, src_mask)


def test_parameter_counts_match_hand_computation() -> None:
    v, d, f, le, ld = VOCAB, 32, 64, 2, 2
    attention_self = 3 * d * d + 3 * d + d * d + d  # fused Q/K/V and output projection
    attention_cross = d * d + d + 2 * d * d + 2 * d + d * d + d  # Q, fused K/V, output
    ffn = d * f + f + f * d + d
    norm = 2 * d
    encoder = le * (attention_self + ffn + 2 * norm)
    decoder = ld * (attention_self + attention_cross + ffn + 3 * norm)
    shared_tied = v * d
    assert build_model(TRANSFORMER).num_parameters() == shared_tied + encoder + decoder + 2 * norm
    post = replace(TRANSFORMER, norm="post", share_embeddings=False, tie_output=False, joint_vocab=False)
    assert build_model(post).num_parameters() == 3 * v * d + encoder + decoder

    e, h = 16, 32

    def lstm_layer(inputs: int, units: int) -> int:
        return 4 * (inputs * units + units * units + 2 * units)  # input and recurrent weights, two biases

    encoder = 2 * (lstm_layer(e, h // 2) + lstm_layer(h, h // 2))  # two directions of h/2 units
    decoder = lstm_layer(2 * e, h) + lstm_layer(h, h)  # input feeding doubles the first input
    bridge = 2 * (h * ld * h + ld * h)  # for h and c
    general, combine = h * h, 2 * h * e
    assert build_model(RNN).num_parameters() == v * e + encoder + decoder + bridge + general + combine
    gru = replace(RNN, cell="gru", attention="dot", bridge=False, input_feeding=False)
    gru_layer = lambda inputs, units: 3 * (inputs * units + units * units + 2 * units)  # noqa: E731
    expected = v * e + 2 * (gru_layer(e, h // 2) + gru_layer(h, h // 2)) + gru_layer(e, h) + gru_layer(h, h) + combine
    assert build_model(gru).num_parameters() == expected


@pytest.mark.parametrize("name", ["transformer-post", "transformer-learned-gelu", "gru-general", "gru-no-feeding",
                                  "rnn-dot"])
@torch.no_grad()
def test_flops_per_token_counts_every_matrix_product(name: str) -> None:
    """FlopCounterMode sees every matmul of a forward pass, attention included on the math path
    (not inside torch's fused LSTM kernel, nor a matrix-vector product, hence no lstm or bahdanau here)."""
    model = make_model(name)
    src, src_mask = padded_batch([7, 7], seed=0)
    tgt, _ = padded_batch([5, 5], seed=1)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(src, src_mask, tgt)
    assert model.flops_per_token(7, 5) == pytest.approx(counter.get_total_flops() / 10, rel=1e-9)


@pytest.mark.parametrize("name", ["transformer-pre", "lstm-general", "gru-bahdanau"])
@torch.no_grad()
def test_bf16_autocast_step_returns_float32(name: str) -> None:
    model = make_model(name)
    src, src_mask, tgt, _ = toy_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        state = model.init_state(model.encode(src, src_mask), src_mask)
        for t in range(3):
            log_probs, state = model.step(tgt[:, t], state)
            rows = torch.tensor([1, 0, 0, 3])
            state = model.reorder_state(state, rows, rows)
            assert log_probs.dtype == torch.float32
            torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(4))
        assert model(src, src_mask, tgt).shape == (4, 6, VOCAB)


@pytest.mark.parametrize("name", ["transformer-pre", "transformer-post", "transformer-marian", "lstm-general",
                                  "gru-no-feeding"])
@torch.no_grad()
def test_features_only_is_what_the_output_layer_projects(name: str) -> None:
    """The fused training loss projects `features_only` itself: it must be exactly the logits' input."""
    model = make_model(name)
    src, src_mask, tgt, _ = toy_batch()
    features = model(src, src_mask, tgt, features_only=True)
    assert features.shape[:2] == tgt.shape and features.shape[2] != VOCAB
    torch.testing.assert_close(model.output(features), model(src, src_mask, tgt), rtol=0, atol=0)


# A tiny translation task: reverse the source and map each of 8 symbols to another one.
SYMBOLS = 8
TASK_VOCAB = 4 + SYMBOLS
STEPS = 150


def reverse_and_map(n: int, seed: int) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        src = [4 + rng.randrange(SYMBOLS) for _ in range(rng.randint(3, 7))]
        pairs.append((src, [4 + (s - 4 + 3) % SYMBOLS for s in reversed(src)]))
    return pairs


def pad(rows: list[list[int]]) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [PAD_ID] * (width - len(r)) for r in rows])


@torch.no_grad()
def greedy(model: torch.nn.Module, src: torch.Tensor, src_mask: torch.Tensor, max_len: int) -> list[list[int]]:
    state = model.init_state(model.encode(src, src_mask), src_mask)
    tokens = torch.full((src.size(0),), BOS_ID)
    out = []
    for _ in range(max_len):
        log_probs, state = model.step(tokens, state)
        tokens = log_probs.argmax(-1)
        out.append(tokens)
    rows = torch.stack(out, dim=1).tolist()
    return [row[: row.index(EOS_ID)] if EOS_ID in row else row for row in rows]


TASK_MODELS = {
    "transformer-pre": replace(TRANSFORMER, d_model=64, ffn_dim=128, dropout=0.0, enc_layers=1, dec_layers=2),
    "transformer-post": replace(TRANSFORMER, d_model=64, ffn_dim=128, dropout=0.0, norm="post", enc_layers=1,
                                dec_layers=2),
    "lstm-general": replace(RNN, embed_dim=32, hidden_size=64, dropout=0.0, enc_layers=1, dec_layers=1),
    "gru-bahdanau": replace(RNN, cell="gru", attention="bahdanau", embed_dim=32, hidden_size=64, dropout=0.0,
                            enc_layers=1, dec_layers=1),
    "rnn-dot": replace(RNN, cell="rnn", attention="dot", embed_dim=32, hidden_size=64, dropout=0.0, enc_layers=1,
                       dec_layers=1),
}


@pytest.mark.parametrize("name", TASK_MODELS)
def test_overfits_reverse_and_map(name: str) -> None:
    """Pre- and post-norm Transformers and every cell learn the task: loss drops tenfold, greedy decoding is exact."""
    torch.manual_seed(0)
    config = replace(TASK_MODELS[name], src_vocab_size=TASK_VOCAB, tgt_vocab_size=TASK_VOCAB)
    model = build_model(config)
    pairs = reverse_and_map(64, seed=0)
    src = pad([s + [EOS_ID] for s, _ in pairs])
    src_mask = src != PAD_ID
    tgt_in, tgt_out = pad([[BOS_ID] + t for _, t in pairs]), pad([t + [EOS_ID] for _, t in pairs])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(STEPS):
        logits = model(src, src_mask, tgt_in)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tgt_out.flatten(), ignore_index=PAD_ID)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < 0.1 * losses[0]
    assert greedy(model, src, src_mask, max_len=10) == [t for _, t in pairs]



@pytest.mark.parametrize("name", ["transformer-pre", "lstm-general", "gru-bahdanau"])
@torch.no_grad()
def test_beams_share_their_sentence_entries_and_step_as_if_copied(name: str) -> None:
    """Two beams per sentence with one copy of the per-sentence entries (the encoder side) step to the same
    log-probs as with a copy per beam; back-pointers move only the per-hypothesis entries, and the
    per-sentence ones move only when sentences leave."""
    model = make_model(name)
    src, src_mask, tgt, _ = toy_batch()
    state = model.init_state(model.encode(src, src_mask), src_mask)
    pairs = torch.arange(4).repeat_interleave(2)  # two beams per sentence
    shared = model.reorder_state(state, pairs)
    copied = model.reorder_state(state, pairs, pairs)  # each row its own sentence
    assert model.sentence_keys & shared.keys()
    for key in model.sentence_keys & shared.keys():
        assert shared[key] is state[key] and len(copied[key]) == 8
    for t in range(3):
        tokens = tgt[:, t].repeat_interleave(2)
        shared_out, shared = model.step(tokens, shared)
        copied_out, copied = model.step(tokens, copied)
        torch.testing.assert_close(shared_out, copied_out)
    swap = torch.arange(8).view(4, 2).flip(1).reshape(-1)  # exchange the two beams of every sentence
    swapped = model.reorder_state(shared, swap)
    for key, value in swapped.items():
        if key in model.buffer_keys:
            continue
        if key in model.sentence_keys or not value.dim():
            assert value is shared[key]
        else:
            torch.testing.assert_close(value, shared[key].index_select(0, swap), rtol=0, atol=0)
    leaving = model.reorder_state(shared, torch.tensor([2, 3, 6, 7]), torch.tensor([1, 3]))  # sentences 0, 2 leave
    for key in model.sentence_keys & leaving.keys():
        torch.testing.assert_close(leaving[key], shared[key][[1, 3]], rtol=0, atol=0)


@torch.no_grad()
def test_back_pointers_gather_the_cache_into_the_buffer_of_the_cache_before_last() -> None:
    """A beam step's reorder copies the self-attention cache into the buffer the cache before last held (a
    fresh tensor of a large cache costs page faults), with the values a fresh gather gives."""
    model = make_model("transformer-pre")
    src, src_mask, tgt, _ = toy_batch()
    state = model.reorder_state(model.init_state(model.encode(src, src_mask), src_mask),
                                torch.arange(4).repeat_interleave(2))  # two beams per sentence
    swap = torch.arange(8).view(4, 2).flip(1).reshape(-1)
    for t in range(4):
        _, state = model.step(tgt[:, t].repeat_interleave(2), state)
        expected, spare = state["self_kv"].index_select(0, swap), state["spare_kv"]
        state = model.reorder_state(state, swap)
        torch.testing.assert_close(state["self_kv"], expected, rtol=0, atol=0)
        assert t == 0 or state["self_kv"].data_ptr() == spare.data_ptr()  # the first spare is too small
    fewer = model.reorder_state(state, torch.tensor([2, 3, 6, 7]), torch.tensor([1, 3]))  # sentences leave
    assert len(fewer["self_kv"]) == 4 and fewer["self_kv"].data_ptr() == state["spare_kv"].data_ptr()


def test_concatenated_sinusoids_are_marians_table_and_the_default_is_unchanged() -> None:
    """Marian's layout as Hugging Face builds it (float64 angles, sines then cosines, one rounding), exactly;
    the interleaved default keeps its float32 formula, so existing checkpoints decode bitwise as before."""
    length, dim = 50, 12
    angles = [[pos / math.pow(10000, 2 * (j // 2) / dim) for j in range(dim)] for pos in range(length)]
    marian = torch.tensor([[math.sin(a) for a in row[0::2]] + [math.cos(a) for a in row[1::2]] for row in angles])
    assert torch.equal(sinusoids(length, dim, "concatenated"), marian.float())
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    assert torch.equal(sinusoids(length, dim)[:, 0::2], torch.sin(position * frequency))
    assert torch.equal(sinusoids(length, dim)[:, 1::2], torch.cos(position * frequency))


def test_default_models_have_no_new_parameters() -> None:
    """The Marian features are opt-in: a default Transformer's state has exactly the keys it always had."""
    keys = set(build_model(TRANSFORMER).state_dict())
    assert "output.bias" not in keys and "output.bias" in build_model(CONFIGS["transformer-marian"]).state_dict()
    assert build_model(TRANSFORMER).output_bias() is None
