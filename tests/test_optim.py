from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nmt.config import TrainConfig
from nmt.loss import label_smoothed_loss
from nmt.optim import Budget, Improvement, LearningRate, build_optimizer
from nmt.tokenizer import PAD_ID


def test_inverse_sqrt_schedule_values() -> None:
    schedule = LearningRate(TrainConfig(lr=1e-3, warmup=100, scheduler="inverse_sqrt"), d_model=256)
    assert schedule.at(1) == pytest.approx(1e-5)
    assert schedule.at(50) == pytest.approx(5e-4)
    assert schedule.at(100) == pytest.approx(1e-3)
    assert schedule.at(400) == pytest.approx(5e-4)


def test_noam_schedule_values() -> None:
    schedule = LearningRate(TrainConfig(lr=2.0, warmup=4000, scheduler="noam"), d_model=512)
    assert schedule.at(4000) == pytest.approx(2.0 * 512**-0.5 * 4000**-0.5)
    assert schedule.at(100) == pytest.approx(2.0 * 512**-0.5 * 100 * 4000**-1.5)
    assert schedule.at(16000) == pytest.approx(schedule.at(4000) / 2)


def test_cosine_schedule_values() -> None:
    schedule = LearningRate(TrainConfig(lr=1e-3, warmup=100, scheduler="cosine", max_updates=1100, min_lr=1e-5), 256)
    assert schedule.at(50) == pytest.approx(5e-4)  # warm-up
    assert schedule.at(100) == pytest.approx(1e-3)
    assert schedule.at(600) == pytest.approx((1e-3 + 1e-5) / 2)  # half way down
    assert schedule.at(1100) == pytest.approx(1e-5)
    assert schedule.at(5000) == pytest.approx(1e-5)  # past max_updates (a resumed run with a larger limit)


def test_plateau_decays_after_patience_and_respects_floor() -> None:
    config = TrainConfig(lr=1e-3, warmup=0, scheduler="plateau", plateau_patience=2, plateau_factor=0.5, min_lr=3e-4)
    schedule = LearningRate(config, 256)
    assert schedule.observe(10.0, True) is False
    assert schedule.observe(9.0, True) is False
    assert schedule.observe(9.5, True) is True
    assert schedule.at(10) == pytest.approx(5e-4)
    assert schedule.observe(11.0, True) is False  # improvement resets the count
    schedule.observe(1.0, True)
    schedule.observe(1.0, True)
    assert schedule.at(10) == pytest.approx(3e-4)  # 2.5e-4 is below the floor
    restored = LearningRate(schedule.config, 256)
    restored.load_state_dict(schedule.state_dict())
    assert restored.at(10) == schedule.at(10)


def test_improvement_counts_validations_since_the_best() -> None:
    tracker = Improvement()
    scores = (3.0, 2.0, 2.5, 2.0, 1.0)
    assert [tracker.observe(score, higher_is_better=False) for score in scores] == [True, True, False, False, True]
    assert tracker == Improvement(best=1.0, bad_validations=0)
    tracker.observe(4.0, higher_is_better=False)
    assert Improvement.from_state_dict(tracker.state_dict()) == Improvement(best=1.0, bad_validations=1)


def test_plateau_state_keeps_the_checkpoint_keys_of_earlier_versions() -> None:
    schedule = LearningRate(TrainConfig(lr=1e-3, warmup=0, scheduler="plateau"), 256)
    schedule.observe(2.0, True)
    assert schedule.state_dict() == {"scale": 1.0, "best": 2.0, "bad_validations": 0, "warmup_end": 0.0}
    restored = LearningRate(schedule.config, 256)
    restored.load_state_dict({"scale": 0.5, "best": 2.0, "bad_validations": 1})  # an earlier version's state
    assert restored.at(10) == pytest.approx(5e-4)


@pytest.mark.parametrize("scheduler", ["linear", "cosine", "wsd"])
def test_budgeted_schedules_reach_the_floor_exactly_at_the_update_budget(scheduler: str) -> None:
    config = TrainConfig(lr=1e-3, warmup=100, scheduler=scheduler, max_updates=1100, min_lr=1e-6)
    schedule = LearningRate(config, 256)
    assert schedule.at(50) == pytest.approx(5e-4)  # warm-up
    assert schedule.at(100) == pytest.approx(1e-3)
    rates = [schedule.at(update) for update in range(100, 1101)]
    assert all(a >= b for a, b in zip(rates, rates[1:], strict=False))  # never rises after warm-up
    assert rates[-2] > 1e-6 and schedule.at(1100) == pytest.approx(1e-6, abs=1e-15)
    assert schedule.at(5000) == pytest.approx(1e-6, abs=1e-15)  # past the budget (a resumed run with a larger one)


def test_budgeted_schedule_shapes_half_way() -> None:
    def half_way(scheduler: str) -> float:
        config = TrainConfig(lr=1.0, warmup=100, scheduler=scheduler, max_updates=1100, min_lr=0.0)
        return LearningRate(config, 256).at(600)
    assert half_way("linear") == pytest.approx(0.5)
    assert half_way("cosine") == pytest.approx(0.5)
    assert half_way("wsd") == 1.0  # stable until the last decay_fraction (0.2) of the decay


def test_wsd_cools_down_over_its_decay_fraction() -> None:
    config = TrainConfig(lr=1.0, warmup=0, scheduler="wsd", max_updates=1000, min_lr=0.0, decay_fraction=0.1)
    schedule = LearningRate(config, 256)
    assert schedule.at(900) == 1.0
    assert schedule.at(925) == pytest.approx(1.0 - math.sqrt(0.25))
    assert schedule.at(1000) == 0.0


def test_time_budget_reaches_the_floor_when_the_minutes_run_out() -> None:
    config = TrainConfig(lr=1.0, warmup=10, scheduler="linear", max_minutes=10.0, min_lr=0.0)
    schedule, optimizer = LearningRate(config, 256), torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    for update in range(1, 11):  # warm-up takes the first 60 seconds, a tenth of the budget
        schedule.apply(optimizer, update, elapsed=6.0 * update)
    assert schedule.warmup_end == pytest.approx(0.1)
    assert schedule.apply(optimizer, 11, elapsed=60.0) == pytest.approx(1.0)
    assert schedule.at(12, elapsed=330.0) == pytest.approx(0.5)  # half of the decay's 540 seconds
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1.0)
    assert schedule.at(500, elapsed=600.0) == 0.0
    resumed = LearningRate(config, 256)  # a resumed run keeps where warm-up ended
    resumed.load_state_dict(schedule.state_dict())
    assert resumed.at(12, elapsed=330.0) == schedule.at(12, elapsed=330.0)


def test_a_resumed_run_with_a_larger_budget_follows_the_new_curve() -> None:
    """A budget raised on --resume continues as if it had been set from the start (the rate rises again
    from where the larger budget puts the run)."""
    short = LearningRate(TrainConfig(lr=1.0, warmup=0, scheduler="linear", max_updates=1000, min_lr=0.0), 256)
    longer = LearningRate(TrainConfig(lr=1.0, warmup=0, scheduler="linear", max_updates=2000, min_lr=0.0), 256)
    longer.load_state_dict(short.state_dict())
    assert short.at(1000) == 0.0 and longer.at(1000) == pytest.approx(0.5)


def test_budget_is_the_nearest_limit() -> None:
    assert Budget.of(TrainConfig(max_updates=500, max_epochs=3), updates_per_epoch=100) == Budget(300, 0.0)
    assert Budget.of(TrainConfig(max_minutes=2.0), updates_per_epoch=100) == Budget(0, 120.0)
    both = Budget(1000, 100.0)
    assert both.fraction(100, elapsed=50.0) == 0.5 and both.fraction(900, elapsed=50.0) == 0.9
    assert not Budget().bounded and Budget().fraction(10**6, 10**6) == 0.0


@pytest.mark.parametrize(("config", "expected"), [
    (TrainConfig(max_updates=100), "wsd"),
    (TrainConfig(max_minutes=1.0, warmup=0), "wsd"),
    (TrainConfig(), "inverse_sqrt"),
    (TrainConfig(warmup=0), "plateau"),
    (TrainConfig(scheduler="noam", max_updates=100), "noam"),
])
def test_auto_scheduler_decays_to_the_end_of_bounded_runs(config: TrainConfig, expected: str) -> None:
    assert LearningRate(config, 256).name == expected


def test_weight_decay_groups() -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.LayerNorm(4))
    optimizer = build_optimizer(model, TrainConfig(weight_decay=0.1))
    decay, no_decay = optimizer.param_groups
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(no_decay["params"]) == 4  # embedding, linear bias, norm weight and bias


def test_label_smoothing_matches_hand_computation(device: str) -> None:
    values = [[[2.0, 0.0, 1.0, -1.0], [0.5, 0.5, 0.5, 3.0], [1.0, 1.0, 1.0, 1.0]]]
    logits = torch.tensor(values, device=device)
    identity = torch.eye(4, device=device)  # features @ identity.T are the logits themselves
    target = torch.tensor([[2, 3, PAD_ID]], device=device)
    eps = 0.1
    loss, nll = label_smoothed_loss(logits, identity, target, eps)
    expected_nll = expected_loss = 0.0
    for row, gold in ((values[0][0], 2), (values[0][1], 3)):
        logz = math.log(sum(math.exp(v) for v in row))
        logp = [v - logz for v in row]
        expected_nll += -logp[gold]
        expected_loss += (1 - eps) * -logp[gold] + eps * sum(-lp for lp in logp) / 4
    assert nll.item() == pytest.approx(expected_nll, rel=1e-6)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-6)
    reference = torch.nn.functional.cross_entropy(logits[0], target[0], ignore_index=PAD_ID, label_smoothing=eps,
                                                  reduction="sum")
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    plain, _ = label_smoothed_loss(logits, identity, target, 0.0)
    assert plain.item() == pytest.approx(expected_nll, rel=1e-6)


def loss_inputs(shape: tuple[int, int, int], vocab: int, device: str) -> tuple[torch.Tensor, ...]:
    """Seeded features (B, T, D) and output matrix (V, D), both requiring gradients, and targets (B, T):
    drawn on the CPU, then moved, so that every device sees the same numbers."""
    torch.manual_seed(0)
    features, weight = torch.randn(shape), torch.randn(vocab, shape[2])
    target = torch.randint(4, vocab, shape[:2])
    return features.to(device).requires_grad_(), weight.to(device).requires_grad_(), target.to(device)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fused_loss_gradients_equal_autograd_reference(precision: str, device: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Loss and the gradients of features and output matrix equal plain projection + cross_entropy,
    over several chunks (the last one partial), in fp32 and under bf16 autocast. The reference runs
    on the same device, so the tolerances are those of the CPU."""
    for chunk in ("ROWS_PER_CHUNK", "CUDA_ROWS_PER_CHUNK"):  # 21 rows: chunks of 8, 8 and 5
        monkeypatch.setattr(f"nmt.loss.{chunk}", 8)
    features, weight, target = loss_inputs((3, 7, 16), 50, device)
    target[0, 5:] = PAD_ID
    target[2, 3:] = PAD_ID
    with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss, nll = label_smoothed_loss(features, weight, target, 0.2)
        (loss * 0.5).backward()
        logits = (features @ weight.t()).float().view(-1, 50)
    ours = features.grad.clone(), weight.grad.clone()
    features.grad = weight.grad = None
    reference = torch.nn.functional.cross_entropy(logits, target.view(-1), ignore_index=PAD_ID, label_smoothing=0.2,
                                                  reduction="sum")
    (reference * 0.5).backward()
    reference_nll = torch.nn.functional.cross_entropy(logits, target.view(-1), ignore_index=PAD_ID, reduction="sum")
    tolerance = 1e-5 if precision == "fp32" else 2e-2
    gradient_atol = 1e-6 if precision == "fp32" else 0.2  # fp32: as strict as the logits-gradient test it replaced
    assert loss.item() == pytest.approx(reference.item(), rel=tolerance)
    assert nll.item() == pytest.approx(reference_nll.item(), rel=tolerance) and not nll.requires_grad
    assert ours[0].dtype == features.dtype and ours[1].dtype == weight.dtype
    assert torch.allclose(ours[0], features.grad, rtol=tolerance, atol=gradient_atol)
    assert torch.allclose(ours[1], weight.grad, rtol=tolerance, atol=gradient_atol)
    assert ours[0][0, 5:].abs().max() == 0  # padding positions get no gradient


def test_fused_loss_without_gradients_gives_the_same_values(device: str) -> None:
    features, weight, target = loss_inputs((2, 5, 8), 30, device)
    with_grad = label_smoothed_loss(features, weight, target, 0.1)
    with torch.inference_mode():
        without = label_smoothed_loss(features, weight, target, 0.1)
    assert [v.item() for v in without] == pytest.approx([v.item() for v in with_grad], rel=1e-6)


@pytest.mark.parametrize("masked", [False, True], ids=["bias", "bias-with-masked-column"])
def test_fused_loss_with_an_output_bias_equals_autograd_reference(masked: bool, device: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """With a logit bias the loss and all three gradients equal plain projection + bias + cross-entropy; a
    column whose bias is -inf takes no probability, no smoothing mass and no gradient (the reference is
    cross-entropy over the other columns)."""
    monkeypatch.setattr("nmt.loss.ROWS_PER_CHUNK", 8)
    monkeypatch.setattr("nmt.loss.CUDA_ROWS_PER_CHUNK", 8)
    features, weight, target = loss_inputs((3, 7, 16), 50, device)
    target[1, 4:] = PAD_ID
    bias = torch.randn(50).to(device)
    if masked:
        bias[2] = float("-inf")
    bias.requires_grad_()
    loss, nll = label_smoothed_loss(features, weight, target, 0.2, bias=bias)
    (loss * 0.5).backward()
    ours = features.grad.clone(), weight.grad.clone(), bias.grad.clone()
    features.grad = weight.grad = bias.grad = None
    keep = torch.arange(50, device=device) != 2 if masked else torch.ones(50, dtype=torch.bool, device=device)
    logits = (features @ weight.t() + bias)[..., keep].reshape(-1, int(keep.sum()))
    gold = keep.long().cumsum(0)[target.view(-1)] - 1  # the target's column among the kept ones
    gold[target.view(-1) == PAD_ID] = -100
    reference = torch.nn.functional.cross_entropy(logits, gold, label_smoothing=0.2, reduction="sum")
    (reference * 0.5).backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    for mine, theirs in zip(ours, (features.grad, weight.grad, bias.grad), strict=True):
        assert torch.allclose(mine, torch.nan_to_num(theirs), rtol=1e-5, atol=1e-6)
    if masked:
        assert ours[2][2] == 0 and ours[1][2].abs().max() == 0
    with torch.inference_mode():
        assert label_smoothed_loss(features, weight, target, 0.2, bias=bias)[0].item() == pytest.approx(loss.item())
