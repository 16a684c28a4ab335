"""V0.5: shrinkage fusion, the adaptive rollout budget and the value priors, against hand-computed numbers."""

from __future__ import annotations

import io

import pytest
import torch

from efficient_rlvr.budget import (
    CallablePrior,
    HistoryPrior,
    RolloutBudget,
    ValuePrior,
    fused_advantages,
    fused_mse,
    fused_mse_gain,
    fusion_stats,
    shrinkage_baseline,
)


def _t(*xs):
    return torch.tensor(xs, dtype=torch.float32)


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


# ----------------------------------------------------------------------------------------------------------------------
# Fusion
def test_prior_kept_when_deviation_is_within_noise():
    # Prior 0.5 (0 on +-1). [1,0,1,0]: m = 0, D2 = 0. [1,1,1,0]: m = 0.5, (0.5)^2 - 1/4 = 0 (the boundary) -> w = 0.
    b, w = shrinkage_baseline([_t(1, 0, 1, 0), _t(1, 1, 1, 0)], _t(0.5, 0.5))
    assert w.tolist() == [0.0, 0.0]
    assert b.tolist() == [0.5, 0.5]


def test_prior_rejected_when_far():
    # Prior 1 (+1), 16 zeros (m = -1): D2 = 4 - 1/16 = 3.9375, w = 3.9375 / 4 = 0.984375,
    # b = 0.984375 * -1 + 0.015625 * 1 = -0.96875 on +-1 -> 0.015625 on [0, 1].
    b, w = shrinkage_baseline(torch.zeros(1, 16), _t(1.0))
    assert float(w) == pytest.approx(0.984375)
    assert float(b) == pytest.approx(0.015625)


def test_intermediate_weight_and_reward_range():
    # [1,1,1,1] vs prior 0.5: m = 1, V = 0, D2 = 1 - 1/4 = 0.75, w = 0.75 / (0.75 + 0.25) = 0.75, b = 0.75 -> 0.875.
    b, w = shrinkage_baseline(torch.ones(1, 4), _t(0.5))
    assert (float(b), float(w)) == pytest.approx((0.875, 0.75))
    # Same on a [0, 10] reward scale: the weight is scale-free, the baseline scales.
    b, w = shrinkage_baseline(torch.full((1, 4), 10.0), _t(5.0), reward_range=(0.0, 10.0))
    assert (float(b), float(w)) == pytest.approx((8.75, 0.75))


def test_single_rollout():
    # k = 1: noise 1/k = 1. Reward 1 vs prior 0.5: (1 - 0)^2 - 1 = 0 -> w = 0.
    # Reward 0 vs prior 1: D2 = 4 - 1 = 3, w = 3/4, b = 0.75 * -1 + 0.25 * 1 = -0.5 -> 0.25.
    b, w = shrinkage_baseline([_t(1), _t(0)], _t(0.5, 1.0))
    assert w.tolist() == pytest.approx([0.0, 0.75])
    assert b.tolist() == pytest.approx([0.5, 0.25])


def test_variable_group_sizes_list_and_padded_agree():
    groups = [_t(1, 0, 1, 0), torch.zeros(16), _t(0), torch.zeros(0)]
    prior = _t(0.5, 1.0, 1.0, 0.3)
    b_list, w_list = shrinkage_baseline(groups, prior)
    padded = torch.full((4, 16), 7.0)  # junk in the padding must be ignored
    for i, g in enumerate(groups):
        padded[i, : g.numel()] = g
    b_pad, w_pad = shrinkage_baseline(padded, prior, counts=[4, 16, 1, 0])
    torch.testing.assert_close(b_list, b_pad)
    torch.testing.assert_close(w_list, w_pad)
    assert b_list.tolist() == pytest.approx([0.5, 0.015625, 0.25, 0.3])  # k = 0: the prior itself
    assert w_list.tolist() == pytest.approx([0.0, 0.984375, 0.75, 0.0])


def test_fused_advantages_scaling():
    rewards = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    baseline = _t(0.5, 0.875)
    none = fused_advantages(rewards, baseline)
    assert none.tolist() == [[0.5, -0.5, 0.5, -0.5], [0.125] * 4]  # an all-correct group still gets a signal
    # Batch std (unbiased) of six 1s and two 0s: sqrt(1.5 / 7).
    batch_std = (1.5 / 7) ** 0.5
    batch = fused_advantages(rewards, baseline, scale="batch", eps=0.0)
    torch.testing.assert_close(batch, none / batch_std)
    # Group std: row 0 sqrt(1/3); row 1 has zero std and borrows the batch std instead of dividing by eps.
    group = fused_advantages(rewards, baseline, scale="group", eps=0.0)
    torch.testing.assert_close(group[0], none[0] / (1 / 3) ** 0.5)
    torch.testing.assert_close(group[1], none[1] / batch_std)
    # Lists in, lists out, with padding never leaking.
    out = fused_advantages([_t(1, 0), _t(1)], _t(0.25, 0.5))
    assert [o.tolist() for o in out] == [[0.75, -0.25], [0.5]]
    with pytest.raises(ValueError, match="scale"):
        fused_advantages(rewards, baseline, scale="rank")


# ----------------------------------------------------------------------------------------------------------------------
# MSE estimate and the budget rule
def test_mse_and_gain_formulas():
    d2 = _t(0.0, 0.75, 1e9)
    assert fused_mse(d2, 4).tolist() == pytest.approx([0.0, 0.75 / 4.0, 0.25])  # 1/k for a useless prior
    gain = fused_mse_gain(d2, 4)
    assert gain.tolist() == pytest.approx([0.0, 0.5625 / 19.0, 1 / 20], rel=1e-6)
    # The plain-mean gain 1/(k(k+1)) crosses 1/256 between k = 15 and k = 16: the default cost matches k_max = 16.
    assert float(fused_mse_gain(_t(1e9), 15)) > 0.0039 > float(fused_mse_gain(_t(1e9), 16))


def test_agreeing_prompt_stops_at_k_init_and_conflicting_goes_to_k_max():
    budget = RolloutBudget()
    truth = {0: [1.0, 0.0], 1: [0.0]}  # prompt 0 alternates 1, 0 (prior 0.5 agrees); prompt 1 always 0 (prior 1)
    drawn = [0, 0]

    def sample(n):
        out = []
        for i, k in enumerate(n.tolist()):
            seq = truth[i]
            out.append(torch.tensor([seq[(drawn[i] + j) % len(seq)] for j in range(k)]))
            drawn[i] += k
        return out

    rewards = budget.run(sample, _t(0.5, 1.0))
    assert [r.numel() for r in rewards] == [4, 16]
    m = budget.metrics()
    # prior weights: 1 (w = 0) and 1 - 0.984375; rollouts 20 of a fixed 2 x 16 = 32; 1 + 12 rounds.
    assert m["budget/k_mean"] == 10 and m["budget/k_max"] == 16 and m["budget/k_min"] == 4
    assert m["budget/stopped_at_k_init"] == 0.5 and m["budget/reached_k_max"] == 0.5
    assert m["budget/prior_weight"] == pytest.approx((1.0 + 0.015625) / 2)
    assert m["budget/rollouts"] == 20 and m["budget/rollouts_fixed"] == 32
    assert m["budget/rollout_ratio"] == pytest.approx(0.625)
    assert m["budget/rounds"] == 13
    # k = 15 of the conflicting prompt still asks for more; k = 16 stops.
    assert budget.decide([torch.zeros(15), torch.zeros(16)], _t(1.0, 1.0)).tolist() == [True, False]


def test_cost_threshold():
    # [1,1,1,1] vs prior 0.5: D2 = 0.75, k = 4, gain = 0.5625 / (4 * 4.75) = 0.0296052...
    rewards = torch.ones(1, 4)
    assert float(RolloutBudget().gains(rewards, _t(0.5))) == pytest.approx(0.5625 / 19.0)
    assert RolloutBudget(cost=0.0296).decide(rewards, _t(0.5)).tolist() == [True]
    assert RolloutBudget(cost=0.0297).decide(rewards, _t(0.5)).tolist() == [False]


def test_planned_rollouts_and_next_round():
    # D2 = 0.75: gain_j = 0.5625 / ((1 + 0.75 j)(1.75 + 0.75 j)) > 0.0039 for j = 4..14 (j = 14: 0.00399; j = 15:
    # 0.00353), so 11 more rollouts are planned.
    rewards, prior = torch.ones(1, 4), _t(0.5)
    budget = RolloutBudget()
    assert budget.planned(rewards, prior).tolist() == [11]
    assert budget.next_round(rewards, prior).tolist() == [1]
    assert RolloutBudget(step=4).next_round(rewards, prior).tolist() == [4]
    assert budget.next_round(rewards, prior, rounds_left=2).tolist() == [6]
    assert budget.next_round(rewards, prior, rounds_left=1).tolist() == [11]
    # Below k_init: filled up to it first.
    assert budget.next_round([torch.zeros(0), _t(1, 0)], _t(0.5, 0.5)).tolist() == [4, 2]
    # k_init == k_max: no adaptivity at all.
    assert RolloutBudget(k_init=4, k_max=4).next_round(torch.zeros(1, 4), _t(1.0)).tolist() == [0]


def test_max_rounds_caps_generation_rounds():
    budget = RolloutBudget()
    rewards = budget.run(lambda n: [torch.zeros(int(k)) for k in n], _t(1.0), max_rounds=2)
    # Round 1: 4 rollouts; round 2 is the last, so it gets the whole plan at once (here up to k_max).
    assert [r.numel() for r in rewards] == [16]
    assert budget.metrics()["budget/rounds"] == 2


def test_budget_state_dict_resume():
    def run(b):
        return b.run(lambda n: [torch.zeros(int(k)) for k in n], _t(1.0, 0.0, 0.5))

    a = RolloutBudget()
    run(a)
    restored = RolloutBudget()
    restored.load_state_dict(_roundtrip(a.state_dict()))
    assert restored.metrics() == a.metrics()
    run(a)
    run(restored)
    assert restored.metrics() == a.metrics()
    assert a.metrics()["budget/total_rollouts"] == 2 * a.metrics()["budget/rollouts"]


def test_budget_validation():
    with pytest.raises(ValueError, match="k_max"):
        RolloutBudget(k_init=8, k_max=4)
    with pytest.raises(ValueError, match="k_init"):
        RolloutBudget(k_init=0)
    with pytest.raises(ValueError, match="cost"):
        RolloutBudget(cost=-1.0)
    with pytest.raises(ValueError, match="step"):
        RolloutBudget(step=0)
    with pytest.raises(ValueError, match="reward_range"):
        RolloutBudget(reward_range=(1.0, 1.0))
    with pytest.raises(ValueError, match="sample_fn returned"):
        RolloutBudget().run(lambda n: [torch.zeros(1)], _t(0.5))


# ----------------------------------------------------------------------------------------------------------------------
# Priors
def test_history_prior_shrinkage_numbers():
    prior = HistoryPrior(shrinkage=2.0)
    assert isinstance(prior, ValuePrior)
    assert prior.prior(["a"]).tolist() == [0.5]  # nothing observed: the default
    prior.observe(["a", "b"], [torch.ones(4), torch.zeros(4)])
    # Dataset mean 0.5; one visit each: (1 * 1 + 2 * 0.5) / 3 = 2/3, (0 + 1) / 3 = 1/3; unseen: 0.5.
    assert prior.prior(["a", "b", "c"]).tolist() == pytest.approx([2 / 3, 1 / 3, 0.5])
    assert prior.metrics()["budget/prior_hit_rate"] == pytest.approx(2 / 3)
    prior.observe(["a"], [_t(1, 0, 1, 0)])
    # a: visits 2, mean 0.75; dataset mean (1 + 0 + 0.5) / 3 = 0.5 -> (2 * 0.75 + 2 * 0.5) / 4 = 0.625.
    assert float(prior.prior(["a"])) == pytest.approx(0.625)
    # The error is measured before the update: prior of a was 2/3, group mean 0.5.
    assert prior.metrics()["budget/prior_abs_error"] == pytest.approx(1 / 6)
    assert float(HistoryPrior(shrinkage=0.0).prior(["x"])) == 0.5


def test_history_prior_ema():
    prior = HistoryPrior(shrinkage=1.0, ema=0.5)
    prior.observe(["a", "b"], [torch.ones(2), torch.zeros(2)])  # dataset EMA starts at the call mean 0.5
    prior.observe(["a"], [torch.zeros(2)])  # a: 0.5 * 1 + 0.5 * 0 = 0.5, 2 visits; dataset: 0.5 * 0.5 + 0 = 0.25
    # a: (2 * 0.5 + 1 * 0.25) / 3; b: (1 * 0 + 0.25) / 2.
    assert prior.prior(["a", "b"]).tolist() == pytest.approx([1.25 / 3, 0.125])


def test_history_prior_bounded_memory_lru():
    prior = HistoryPrior(max_prompts=2, shrinkage=0.0)
    prior.observe(["a", "b"], [torch.ones(2), torch.zeros(2)])
    prior.observe(["a"], [torch.ones(2)])  # a is now more recent than b
    prior.observe(["c"], [_t(0.5, 0.5)])  # evicts b, the least recently observed
    assert len(prior) == 2
    g = (1 + 0 + 1 + 0.5) / 4
    assert prior.prior(["a", "b", "c"]).tolist() == pytest.approx([1.0, g, 0.5])  # b falls back to the dataset mean
    assert prior.metrics()["budget/prior_evicted"] == 1 and prior.metrics()["budget/prior_tracked"] == 2
    for i in range(100):
        prior.observe([f"p{i}"], [torch.ones(1)])
    assert len(prior) == 2 and len(prior.state_dict()["keys"]) == 2


def test_history_prior_ignores_missing_rewards():
    prior = HistoryPrior(shrinkage=0.0)
    prior.observe(["a", "b"], [_t(float("nan"), 1.0), _t(float("nan"))])
    assert len(prior) == 1 and prior.prior(["a"]).tolist() == [1.0]
    with pytest.raises(ValueError, match="keys"):
        prior.observe(["a"], [_t(1), _t(0)])


def test_history_prior_resume():
    prior = HistoryPrior(shrinkage=1.5, max_prompts=3)
    prior.observe(["a", "b", "c", "d"], torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [0.0, 1.0]]))
    restored = HistoryPrior()
    restored.load_state_dict(_roundtrip(prior.state_dict()))
    keys = ["a", "b", "c", "d", "e"]
    assert restored.prior(keys).tolist() == prior.prior(keys).tolist()
    for p in (prior, restored):
        p.observe(["e", "b"], [torch.ones(3), torch.ones(1)])
    assert restored.prior(keys).tolist() == prior.prior(keys).tolist()
    assert restored.metrics() == prior.metrics()


def test_history_prior_validation():
    with pytest.raises(ValueError, match="shrinkage"):
        HistoryPrior(shrinkage=-1.0)
    with pytest.raises(ValueError, match="ema"):
        HistoryPrior(ema=0.0)
    with pytest.raises(ValueError, match="max_prompts"):
        HistoryPrior(max_prompts=0)


def test_callable_prior():
    seen = []
    prior = CallablePrior(
        lambda keys, prompts: [0.2 * len(p) for p in prompts], observe_fn=lambda k, r: seen.append(k)
    )
    assert isinstance(prior, ValuePrior)
    assert prior.prior(["a", "b"], ["xx", "xxxxxxxxxx"]).tolist() == pytest.approx([0.4, 2.0])
    clipped = CallablePrior(lambda keys, prompts: torch.tensor([-0.5, 0.3, 1.7]), clip_range=(0.0, 1.0))
    assert clipped.prior(["a", "b", "c"]).tolist() == pytest.approx([0.0, 0.3, 1.0])
    prior.observe(["a"], [_t(1)])
    assert seen == [["a"]]
    with pytest.raises(ValueError, match="returned 1 values for 2 keys"):
        CallablePrior(lambda keys, prompts: [0.5]).prior(["a", "b"])
    with pytest.raises(ValueError, match="non-finite"):
        CallablePrior(lambda keys, prompts: [float("nan")]).prior(["a"])
    # A prior plugs straight into the fusion.
    stats = fusion_stats(torch.ones(2, 4), clipped.prior(["a", "b", "c"])[1:])
    # m = 1 vs V = -0.4 (0.3 on [0, 1]): D2 = 1.4^2 - 1/4 = 1.71, w = 1.71 / 1.96; vs V = 1: D2 = 0, w = 0.
    assert stats.weight.tolist() == pytest.approx([1.71 / 1.96, 0.0])
