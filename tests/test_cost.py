"""Tests of Cost-Aware GRPO: `efficient_rlvr.cost` (sampler + importance-weighted loss).

Monte Carlo checks state their tolerance in standard errors of the estimator (estimated from the draws themselves);
every random draw is seeded, so each test is deterministic.
"""

from __future__ import annotations

import collections
import io
import math
import types

import pytest
import torch

from efficient_rlvr.cost import (
    SUPPORTED_LOSS_TYPES,
    CostAwareSampler,
    check_loss_type,
    check_objective,
    policy_loss_normalizer,
    rollout_costs,
    select_rows,
    weighted_policy_loss,
)

# ---------------------------------------------------------------------------------------------------- sampler


def test_probabilities_hand_computed():
    # scores |A| / sqrt(c): 1/2, 1/4, 0, 2/1 -> sum 2.75
    adv = torch.tensor([1.0, -1.0, 0.0, 2.0])
    cost = torch.tensor([4.0, 16.0, 9.0, 1.0])
    p = CostAwareSampler().probabilities(adv, cost)
    expected = torch.tensor([0.5, 0.25, 0.0, 2.0]) / 2.75
    torch.testing.assert_close(p, expected)
    assert p.dtype == torch.float32 and p[2].item() == 0.0

    # smoothing: p = (1 - alpha) p* + alpha / N
    p_s = CostAwareSampler(alpha=0.4).probabilities(adv, cost)
    torch.testing.assert_close(p_s, 0.6 * expected + 0.4 / 4)
    torch.testing.assert_close(CostAwareSampler(alpha=1.0).probabilities(adv, cost), torch.full((4,), 0.25))
    # the sign of A does not matter, and equal costs reduce to p ~ |A|
    torch.testing.assert_close(
        CostAwareSampler().probabilities(torch.tensor([3.0, -1.0]), torch.tensor([5.0, 5.0])),
        torch.tensor([0.75, 0.25]),
    )


def test_zero_advantage_never_drawn_unless_smoothed():
    adv = torch.tensor([1.0, 0.0, -2.0, 0.0])
    cost = torch.tensor([10.0, 10.0, 40.0, 5.0])
    idx, _ = CostAwareSampler(seed=3).draw(adv, cost, num_draws=2000)
    assert not torch.isin(idx, torch.tensor([1, 3])).any()

    sampler = CostAwareSampler(alpha=0.5, seed=3, recenter=False)
    p = sampler.probabilities(adv, cost)
    assert p[1].item() == pytest.approx(0.5 / 4) and p[3].item() == pytest.approx(0.5 / 4)
    idx, w = sampler.draw(adv, cost, num_draws=2000)
    zero_rows = torch.isin(idx, torch.tensor([1, 3]))
    assert zero_rows.any()
    # raw weight of a zero-advantage rollout: 1 / (N * alpha / N) = 1 / alpha
    torch.testing.assert_close(w[zero_rows], torch.full((int(zero_rows.sum()),), 2.0))
    assert sampler.metrics()["cost/zero_adv_frac"] == 0.5


def test_eps_counts_tiny_advantages_as_zero():
    adv = torch.tensor([1e-7, 0.5, -0.5])
    cost = torch.ones(3)
    assert CostAwareSampler(eps=1e-6).probabilities(adv, cost)[0].item() == 0.0
    assert CostAwareSampler(eps=0.0).probabilities(adv, cost)[0].item() > 0.0
    # float32 round-off of a zero-variance group of non-binary rewards after GRPO's std normalisation: the default
    # (eps = 0, only exact zeros get p = 0) draws it rarely, a threshold can exclude it
    rewards = torch.tensor([[0.7] * 8, [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0]])
    grpo_adv = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)
    assert 0 < grpo_adv[0].abs().max() < 1e-3
    p = CostAwareSampler().probabilities(grpo_adv.reshape(-1), torch.ones(16))
    assert (p[:8] > 0).all() and p[:8].sum().item() < 1e-3
    p = CostAwareSampler(eps=1e-3).probabilities(grpo_adv.reshape(-1), torch.ones(16))
    assert (p[:8] == 0).all() and p[8:].sum().item() == pytest.approx(1.0)


def test_all_zero_advantages_fall_back_to_uniform():
    sampler = CostAwareSampler(seed=0)
    adv = torch.zeros(5)
    cost = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    torch.testing.assert_close(sampler.probabilities(adv, cost), torch.full((5,), 0.2))
    idx, w = sampler.draw(adv, cost)
    assert idx.shape == (5,) and torch.equal(w, torch.ones(5))
    m = sampler.metrics()
    assert m["cost/uniform_fallback"] == 1.0 and m["cost/zero_adv_frac"] == 1.0
    assert m["cost/weight_max"] == pytest.approx(1.0) and m["cost/ess"] == pytest.approx(5.0)
    sampler.draw(torch.tensor([1.0, 0, 0, 0, 0]), cost)
    assert sampler.metrics()["cost/uniform_fallback"] == 0.0


def test_weights_raw_and_recentred():
    adv = torch.tensor([2.0, 1.0, 0.0, 1.0, 0.5])
    cost = torch.tensor([4.0, 1.0, 4.0, 9.0, 1.0])
    raw_sampler = CostAwareSampler(seed=11, recenter=False)
    rec_sampler = CostAwareSampler(seed=11, recenter=True)
    p = raw_sampler.probabilities(adv, cost).double()
    idx_raw, w_raw = raw_sampler.draw(adv, cost, num_draws=64)
    idx_rec, w_rec = rec_sampler.draw(adv, cost, num_draws=64)
    assert torch.equal(idx_raw, idx_rec)  # same generator state -> same draws
    torch.testing.assert_close(w_raw.double(), 1.0 / (5 * p[idx_raw]), rtol=1e-6, atol=0)
    # re-centring divides by the expected raw weight N_+ / N = 4 / 5, a constant: never by the draws' own mean
    torch.testing.assert_close(w_rec.double(), 1.0 / (4 * p[idx_raw]), rtol=1e-6, atol=0)
    assert w_rec.mean().item() != pytest.approx(1.0, abs=1e-3)
    assert rec_sampler.support_size(adv, cost) == 4 and rec_sampler.metrics()["cost/support_rows"] == 4.0
    # metrics report the raw weights in both cases
    assert rec_sampler.metrics()["cost/weight_max"] == pytest.approx(w_raw.max().item(), rel=1e-6)
    assert rec_sampler.metrics()["cost/weight_mean"] == pytest.approx(w_raw.mean().item(), rel=1e-6)


def test_effective_sample_size_hand_computed():
    # p = [1/2, 1/4, 1/4] -> raw weights [2/3, 4/3, 4/3]
    sampler = CostAwareSampler(seed=5, recenter=False)
    adv, cost = torch.tensor([2.0, 1.0, -1.0]), torch.ones(3)
    idx, w = sampler.draw(adv, cost, num_draws=10)
    k = int((idx == 0).sum())
    assert 0 < k < 10  # a mixed batch, so the ESS is below M
    ess = (k * 2 / 3 + (10 - k) * 4 / 3) ** 2 / (k * 4 / 9 + (10 - k) * 16 / 9)
    m = sampler.metrics()
    assert m["cost/ess"] == pytest.approx(ess, rel=1e-9)
    assert m["cost/ess_frac"] == pytest.approx(ess / 10, rel=1e-9)
    assert m["cost/weight_max"] == pytest.approx(4 / 3) and m["cost/num_draws"] == 10.0
    assert m["cost/weight_mean"] == pytest.approx((k * 2 / 3 + (10 - k) * 4 / 3) / 10)
    # equal weights -> ESS = M
    sampler.draw(torch.tensor([1.0, 1.0]), torch.ones(2), num_draws=7)
    assert sampler.metrics()["cost/ess"] == pytest.approx(7.0)


def test_token_accounting():
    sampler = CostAwareSampler(seed=2)
    adv = torch.tensor([1.0, 0.0, 0.0, -1.0])
    cost = torch.tensor([10.0, 20.0, 30.0, 40.0])
    idx1, _ = sampler.draw(adv, cost)  # M = N = 4; only rows 0 and 3 can be drawn
    used1 = cost[idx1].sum().item()
    m1 = sampler.metrics()
    assert m1["cost/policy_tokens"] == used1
    assert m1["cost/full_batch_tokens"] == 100.0
    assert m1["cost/tokens_saved"] == 100.0 - used1
    assert m1["cost/tokens_saved_frac"] == pytest.approx((100.0 - used1) / 100.0)
    assert m1["cost/unique_frac"] == pytest.approx(torch.unique(idx1).numel() / 4)
    idx2, _ = sampler.draw(adv, cost, num_draws=6)
    used2 = cost[idx2].sum().item()
    m2 = sampler.metrics()
    assert m2["cost/policy_tokens"] == used2 and m2["cost/num_draws"] == 6.0
    assert m2["cost/policy_tokens_cumulative"] == used1 + used2
    assert m2["cost/tokens_saved_cumulative"] == 200.0 - used1 - used2
    assert m2["cost/draw_calls"] == 2.0
    assert all(key.startswith("cost/") for key in m2) and all(isinstance(v, float) for v in m2.values())


def test_state_dict_resume_repeats_next_draws():
    gen = torch.Generator().manual_seed(0)
    adv = torch.randn(32, generator=gen)
    cost = torch.randint(5, 200, (32,), generator=gen).float()
    sampler = CostAwareSampler(alpha=0.1, seed=123)
    sampler.draw(adv, cost)
    buffer = io.BytesIO()
    torch.save(sampler.state_dict(), buffer)
    expected = [sampler.draw(adv, cost) for _ in range(3)]
    expected_metrics = sampler.metrics()

    buffer.seek(0)
    restored = CostAwareSampler(alpha=0.1, seed=999)  # the seed comes back with the state
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    got = [restored.draw(adv, cost) for _ in range(3)]
    for (i_e, w_e), (i_g, w_g) in zip(expected, got, strict=True):
        assert torch.equal(i_e, i_g) and torch.equal(w_e, w_g)
    assert restored.metrics() == expected_metrics
    # a fresh sampler with the same seed does not repeat them (the state matters)
    fresh = CostAwareSampler(alpha=0.1, seed=123)
    assert not torch.equal(fresh.draw(adv, cost)[0], expected[0][0])

    with pytest.raises(ValueError, match="alpha"):
        CostAwareSampler(alpha=0.3).load_state_dict(sampler.state_dict())


def test_same_global_inputs_give_same_draws_on_every_process():
    gen = torch.Generator().manual_seed(1)
    adv = torch.randn(64, generator=gen)
    cost = torch.randint(1, 500, (64,), generator=gen)
    rank0, rank1 = CostAwareSampler(seed=7), CostAwareSampler(seed=7)
    for _ in range(3):
        i0, w0 = rank0.draw(adv, cost)
        i1, w1 = rank1.draw(adv.double(), cost.float())  # dtype of the inputs does not change the draw
        assert torch.equal(i0, i1) and torch.equal(w0, w1)
    assert not torch.equal(CostAwareSampler(seed=8).draw(adv, cost)[0], CostAwareSampler(seed=7).draw(adv, cost)[0])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(alpha=-0.1), "alpha"),
        (dict(alpha=1.5), "alpha"),
        (dict(alpha=True), "alpha"),
        (dict(num_draws=0), "num_draws"),
        (dict(num_draws=2.5), "num_draws"),
        (dict(seed=-1), "seed"),
        (dict(eps=-1e-3), "eps"),
        (dict(eps=float("nan")), "eps"),
    ],
)
def test_constructor_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CostAwareSampler(**kwargs)


def test_input_validation():
    sampler = CostAwareSampler()
    adv = torch.tensor([1.0, -1.0, 0.5])
    with pytest.raises(ValueError, match="costs must be finite and > 0"):
        sampler.probabilities(adv, torch.tensor([1.0, -2.0, 3.0]))
    with pytest.raises(ValueError, match="costs must be finite and > 0"):
        sampler.draw(adv, torch.tensor([1.0, 0.0, 3.0]))
    with pytest.raises(ValueError, match="same length"):
        sampler.draw(adv, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="1-D"):
        sampler.probabilities(adv[None], torch.ones(1, 3))
    with pytest.raises(ValueError, match="finite"):
        sampler.draw(torch.tensor([1.0, float("nan"), 0.0]), torch.ones(3))
    with pytest.raises(ValueError, match="at least one"):
        sampler.draw(torch.zeros(0), torch.zeros(0))
    with pytest.raises(ValueError, match="num_draws"):
        sampler.draw(adv, torch.ones(3), num_draws=0)
    assert sampler.metrics()["cost/draw_calls"] == 0.0  # failed calls change nothing


def test_rollout_costs_and_select_rows():
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    completion_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    torch.testing.assert_close(rollout_costs(prompt_mask, completion_mask), torch.tensor([4.0, 7.0]))
    with pytest.raises(ValueError, match="same N"):
        rollout_costs(prompt_mask, completion_mask[:1])

    batch = {
        "completion_mask": completion_mask,
        "advantages": torch.tensor([0.5, -0.5]),
        "num_items_in_batch": torch.tensor(6.0),
        "num_images": [1, 2],
    }
    out = select_rows(batch, torch.tensor([1, 1, 0]), num_rows=2)
    assert torch.equal(out["completion_mask"], completion_mask[[1, 1, 0]])
    assert torch.equal(out["advantages"], torch.tensor([-0.5, -0.5, 0.5]))
    assert out["num_items_in_batch"] is batch["num_items_in_batch"]  # the full batch's count is kept
    assert out["num_images"] == [2, 2, 1]


# ---------------------------------------------------------------------------------------------------- loss types


def test_check_loss_type():
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"):
        assert check_loss_type(loss_type) == loss_type
    assert set(SUPPORTED_LOSS_TYPES) == {"grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"}
    for bad in ("gspo", "DAPO", "", "dpo"):
        with pytest.raises(ValueError, match="not supported by cost-aware sampling"):
            check_loss_type(bad)


def test_check_objective():
    assert check_objective("dapo") == []
    with pytest.raises(ValueError, match="top_entropy_quantile"):
        check_objective("grpo", top_entropy_quantile=0.2)
    with pytest.raises(ValueError, match="not supported"):
        check_objective("gspo")
    with pytest.raises(ValueError, match="route"):
        check_objective("dapo", route="logits")
    # the advantage route cannot weight the KL term, the entropy bonus, or bnpo's draw-dependent denominator
    with pytest.raises(ValueError, match="KL"):
        check_objective("dapo", beta=0.04, route="advantage")
    with pytest.raises(ValueError, match="entropy bonus"):
        check_objective("dapo", entropy_coef=0.01, route="advantage")
    with pytest.raises(ValueError, match="bnpo"):
        check_objective("bnpo", route="advantage")
    assert check_objective("cispo", route="advantage") == []
    # the loss route takes them all; alpha = 0 leaves the regularisers of zero-advantage rollouts unsampled
    caveats = check_objective("bnpo", beta=0.04, entropy_coef=0.01, alpha=0.0)
    assert len(caveats) == 1 and "alpha" in caveats[0]
    assert check_objective("bnpo", beta=0.04, alpha=0.1) == []
    assert any("adaptive" in c for c in check_objective("grpo", use_adaptive_entropy=True, alpha=0.1))


def _trl_reference_loss(per_token_loss, mask, loss_type, *, ga, training, num_items, num_processes, spg, max_len):
    """TRL 1.16 `_compute_loss` normalisation block, retyped (grpo_trainer.py, 'if self.loss_type in ...')."""
    normalizer = ga if training else 1.0
    if loss_type in ("grpo", "sapo"):
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / normalizer
    if loss_type == "bnpo":
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0) / normalizer
    if loss_type == "dr_grpo":
        return (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_len) / normalizer
    if loss_type in ("cispo", "dapo", "vespo"):
        z = num_items.clamp(min=1.0) / num_processes
        if training:
            z = z * ga / spg
        return (per_token_loss * mask).sum() / z
    if loss_type == "luspo":
        return (per_token_loss * mask).sum(-1).mean() / normalizer
    raise AssertionError(loss_type)


@pytest.mark.parametrize("loss_type", SUPPORTED_LOSS_TYPES)
@pytest.mark.parametrize("training", [True, False])
def test_unit_weights_match_trl_normalisation_formulas(loss_type, training):
    gen = torch.Generator().manual_seed(0)
    rows, cols = 6, 9
    per_token_loss = torch.randn(rows, cols, generator=gen)
    lengths = torch.tensor([9, 1, 4, 0, 7, 3])  # one empty row (fully truncated completion)
    mask = (torch.arange(cols)[None] < lengths[:, None]).long()
    num_items = torch.tensor(97.0)
    kwargs = dict(ga=3, training=training, num_items=num_items, num_processes=2, spg=6, max_len=cols)
    expected = _trl_reference_loss(per_token_loss, mask, loss_type, **kwargs)
    z = policy_loss_normalizer(
        loss_type,
        mask,
        grad_accum_steps=3,
        training=training,
        num_items_in_batch=num_items,
        num_processes=2,
        steps_per_generation=6,
        max_completion_length=cols,
    )
    torch.testing.assert_close(weighted_policy_loss(per_token_loss, mask, None, loss_type, z), expected)
    torch.testing.assert_close(weighted_policy_loss(per_token_loss, mask, torch.ones(rows), loss_type, z), expected)
    # [B, 1] sequence-level losses broadcast over the mask like TRL's
    seq = per_token_loss[:, :1]
    torch.testing.assert_close(
        weighted_policy_loss(seq, mask, None, loss_type, z), _trl_reference_loss(seq, mask, loss_type, **kwargs)
    )


def test_weights_scale_each_sequence_term():
    # hand-computed: rows [1, 2, 3] (len 3) and [4, 0, 0] (len 1), weights [2, 0.5]
    ptl = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    w = torch.tensor([2.0, 0.5])
    # grpo: (2 * mean(1,2,3) + 0.5 * 4) / (B=2 * GA=1) = (4 + 2) / 2
    z = policy_loss_normalizer("grpo", mask)
    assert weighted_policy_loss(ptl, mask, w, "grpo", z).item() == pytest.approx(3.0)
    # dapo: (2 * 6 + 0.5 * 4) / 10 tokens in the full batch
    z = policy_loss_normalizer("dapo", mask, num_items_in_batch=10)
    assert weighted_policy_loss(ptl, mask, w, "dapo", z).item() == pytest.approx(1.4)
    # bnpo: TRL divides by this micro-batch's 4 tokens; a sample divides by the full batch's count instead
    assert policy_loss_normalizer("bnpo", mask).item() == 4.0
    assert policy_loss_normalizer("bnpo", mask, num_items_in_batch=10, sampled=True).item() == 10.0
    # luspo: (2 * 6 + 0.5 * 4) / 2 rows; dr_grpo: (2 * 6 + 0.5 * 4) / (2 rows * 5 max tokens)
    assert weighted_policy_loss(ptl, mask, w, "luspo", policy_loss_normalizer("luspo", mask)).item() == 7.0
    z = policy_loss_normalizer("dr_grpo", mask, max_completion_length=5)
    assert weighted_policy_loss(ptl, mask, w, "dr_grpo", z).item() == pytest.approx(1.4)
    # gradient flows to the per-token loss, scaled by the weight
    ptl.requires_grad_(True)
    weighted_policy_loss(ptl, mask, w, "dapo", 10.0).backward()
    torch.testing.assert_close(ptl.grad, torch.tensor([[0.2, 0.2, 0.2], [0.05, 0.0, 0.0]]))


def test_loss_input_validation():
    mask = torch.ones(2, 3)
    with pytest.raises(ValueError, match="weights"):
        weighted_policy_loss(torch.zeros(2, 3), mask, torch.ones(3), "dapo", 1.0)
    with pytest.raises(ValueError, match="weights"):
        weighted_policy_loss(torch.zeros(2, 3), mask, torch.tensor([1.0, -1.0]), "dapo", 1.0)
    with pytest.raises(ValueError, match="normalizer"):
        weighted_policy_loss(torch.zeros(2, 3), mask, None, "dapo", 0.0)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        weighted_policy_loss(torch.zeros(3, 3), mask, None, "dapo", 1.0)
    with pytest.raises(ValueError, match="not supported"):
        weighted_policy_loss(torch.zeros(2, 3), mask, None, "ppo", 1.0)
    with pytest.raises(ValueError, match="num_items_in_batch"):
        policy_loss_normalizer("dapo", mask)
    with pytest.raises(ValueError, match="num_items_in_batch"):
        policy_loss_normalizer("bnpo", mask, sampled=True)
    with pytest.raises(ValueError, match="max_completion_length"):
        policy_loss_normalizer("dr_grpo", mask)


# ------------------------------------------------------------- against TRL 1.16's own GRPOTrainer._compute_loss


def _trl_harness(loss_type, per_token_logps, entropies, *, beta, entropy_coef, ga, spg, max_len, training):
    """A `GRPOTrainer` object carrying only what `_compute_loss` reads, running TRL's real code on given log-probs.

    The model forward is replaced by fixed per-token log-probs (the inputs under test); accelerate is real.
    """
    from accelerate import Accelerator
    from trl.trainer.grpo_trainer import GRPOTrainer

    h = GRPOTrainer.__new__(GRPOTrainer)
    h._get_per_token_logps_and_entropies = lambda *args, **kwargs: (per_token_logps, entropies, None)
    h.aux_loss_enabled = False
    h.top_entropy_quantile = 1.0
    h.off_policy_mask_threshold = None
    h.importance_sampling_level = "sequence" if loss_type == "luspo" else "token"
    h.beta = beta
    h.args = types.SimpleNamespace(
        use_bias_correction_kl=False,
        delta=None,
        sapo_temperature_pos=1.0,
        sapo_temperature_neg=1.05,
        vespo_k_pos=2.0,
        vespo_lambda_pos=3.0,
        vespo_k_neg=3.0,
        vespo_lambda_neg=2.0,
        steps_per_generation=spg,
    )
    h.loss_type = loss_type
    h.epsilon_low, h.epsilon_high = 0.2, (5.0 if loss_type == "cispo" else 0.28)
    h.use_vllm = False
    h.model = torch.nn.Linear(1, 1).train(training)
    h.current_gradient_accumulation_steps = ga
    h.accelerator = Accelerator(cpu=True)
    h.max_completion_length = max_len
    h.entropy_coef = entropy_coef
    h.use_adaptive_entropy = False
    h._entropy_bonus_enabled = entropy_coef != 0.0
    h._metrics = {"train": collections.defaultdict(list), "eval": collections.defaultdict(list)}
    return h


def _random_trl_batch(seed, rows=6, cols=8):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([8, 3, 5, 1, 6, 8])[:rows]
    mask = (torch.arange(cols)[None] < lengths[:, None]).long()
    logps = -3.0 * torch.rand(rows, cols, generator=gen)
    inputs = {
        "prompt_ids": torch.zeros(rows, 2, dtype=torch.long),
        "prompt_mask": torch.ones(rows, 2, dtype=torch.long),
        "completion_ids": torch.zeros(rows, cols, dtype=torch.long),
        "completion_mask": mask,
        "advantages": torch.tensor([1.3, -0.7, 0.4, -1.1, 0.9, -0.2])[:rows],
        "num_items_in_batch": torch.tensor(4.0 * float(mask.sum())),
        "ref_per_token_logps": logps + 0.3 * torch.randn(rows, cols, generator=gen),
    }
    return inputs, logps, torch.rand(rows, cols, generator=gen), mask


@pytest.mark.parametrize("training", [True, False])
def test_matches_trl_compute_loss_for_every_loss_type(training):
    """With unit weights, policy (+ KL) and entropy bonus reproduce TRL's `_compute_loss` output exactly.

    At old log-probs == current log-probs (TRL's on-policy path) the per-token policy loss of each type is
    hand-derived: PPO types -A; sapo -(4 sigmoid(0) / tau) A; cispo -min(1, eps_high) A logp; vespo phi(1) = 1 so
    -A logp. The KL term is k3 = exp(ref - logp) - (ref - logp) - 1.
    """
    inputs, logps, entropies, mask = _random_trl_batch(0)
    beta, coef, ga, spg, cols = 0.04, 0.01, 2, 4, logps.size(1)
    adv = inputs["advantages"][:, None]
    kl = torch.exp(inputs["ref_per_token_logps"] - logps) - (inputs["ref_per_token_logps"] - logps) - 1
    for loss_type in SUPPORTED_LOSS_TYPES:
        h = _trl_harness(
            loss_type, logps, entropies, beta=beta, entropy_coef=coef, ga=ga, spg=spg, max_len=cols, training=training
        )
        trl_loss = h._compute_loss(None, inputs)
        if loss_type == "sapo":
            tau = torch.where(adv > 0, 1.0, 1.05)
            policy = -(2.0 / tau) * adv * torch.ones_like(logps)
        elif loss_type == "cispo":
            policy = -1.0 * adv * logps
        elif loss_type == "vespo":
            policy = -adv * logps
        else:
            policy = -adv * torch.ones_like(logps)
        per_token_loss = policy + beta * kl
        z = policy_loss_normalizer(
            loss_type,
            mask,
            grad_accum_steps=ga,
            training=training,
            num_items_in_batch=inputs["num_items_in_batch"],
            steps_per_generation=spg,
            max_completion_length=cols,
        )
        z_entropy = policy_loss_normalizer("bnpo", mask, grad_accum_steps=ga, training=training)
        ours = weighted_policy_loss(per_token_loss, mask, torch.ones(6), loss_type, z)
        ours = ours - coef * weighted_policy_loss(entropies, mask, torch.ones(6), "bnpo", z_entropy)
        torch.testing.assert_close(ours, trl_loss, rtol=1e-6, atol=1e-7, msg=f"loss_type={loss_type}")


def test_trl_advantage_scaling_weights_the_policy_term_exactly():
    """Checked on TRL's code, off-policy (ratios far from 1, so clipping is active) for all eight types:
    loss(A * w) == sum_b w_b * loss(A restricted to row b), i.e. scaling A weights each sequence's policy term.
    With beta > 0 that route leaves the KL term unweighted (why `check_objective(route='advantage')` refuses it)."""
    inputs, logps, entropies, mask = _random_trl_batch(1)
    gen = torch.Generator().manual_seed(2)
    row_shift = torch.tensor([-0.4, 0.4, 0.3, 0.4, -0.4, -0.3])[:, None]  # sequence ratios 0.5-2: clipping active
    inputs["old_per_token_logps"] = logps + row_shift + 0.6 * torch.randn(logps.shape, generator=gen)
    w = torch.tensor([0.3, 2.5, 1.0, 0.7, 4.0, 1.6])
    rows = torch.eye(6)
    for loss_type in SUPPORTED_LOSS_TYPES:
        kwargs = dict(beta=0.0, entropy_coef=0.0, ga=2, spg=4, max_len=logps.size(1), training=True)
        h = _trl_harness(loss_type, logps, entropies, **kwargs)

        def trl_loss(advantages, harness=h):
            return harness._compute_loss(None, {**inputs, "advantages": advantages})

        per_row = torch.stack([trl_loss(inputs["advantages"] * rows[b]) for b in range(6)])  # [6]
        torch.testing.assert_close(trl_loss(inputs["advantages"]), per_row.sum(), rtol=1e-5, atol=1e-6)
        if loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):  # TRL's own metric: the clip was active
            assert h._metrics["train"]["clip_ratio/region_mean"][-1] > 0.0, loss_type
        torch.testing.assert_close(
            trl_loss(inputs["advantages"] * w), (w * per_row).sum(), rtol=1e-5, atol=1e-6, msg=loss_type
        )
    # With beta > 0, TRL's loss is policy + KL; scaling A reweights the policy part and leaves the KL part unweighted.
    h = _trl_harness("dapo", logps, entropies, beta=0.5, entropy_coef=0.0, ga=1, spg=1, max_len=8, training=True)
    z = policy_loss_normalizer("dapo", mask, num_items_in_batch=inputs["num_items_in_batch"])
    delta = inputs["ref_per_token_logps"] - logps
    kl = 0.5 * (torch.exp(delta) - delta - 1)  # [B, T]
    kl_only = h._compute_loss(None, {**inputs, "advantages": torch.zeros(6)})
    torch.testing.assert_close(kl_only, weighted_policy_loss(kl, mask, None, "dapo", z))
    policy_rows = torch.stack(
        [h._compute_loss(None, {**inputs, "advantages": inputs["advantages"] * rows[b]}) - kl_only for b in range(6)]
    )
    scaled = h._compute_loss(None, {**inputs, "advantages": inputs["advantages"] * w})
    torch.testing.assert_close(scaled, (w * policy_rows).sum() + kl_only, rtol=1e-5, atol=1e-6)
    weighted_kl = weighted_policy_loss(kl, mask, w, "dapo", z)  # what the per-token-loss route uses
    assert abs(weighted_kl.item() - kl_only.item()) > 0.1 * kl_only.item() > 0


# ---------------------------------------------------------------------------------------- unbiasedness (Monte Carlo)


def _tiny_policy_problem():
    """A linear softmax policy scored on 12 rollouts of varied lengths (3 groups of 4; one zero-variance group)."""
    gen = torch.Generator().manual_seed(0)
    n, cols, dim, vocab = 12, 10, 4, 5
    lengths = torch.tensor([10, 2, 7, 4, 9, 1, 5, 8, 3, 6, 10, 2])
    mask = (torch.arange(cols)[None] < lengths[:, None]).long()  # [N, T]
    feats = torch.randn(n, cols, dim, generator=gen)  # [N, T, D]
    tokens = torch.randint(vocab, (n, cols), generator=gen)  # [N, T]
    ref_logps = -1.6 + 0.5 * torch.randn(n, cols, generator=gen)  # [N, T]
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0]])
    adv = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).reshape(-1)  # [N]
    costs = torch.tensor([5, 5, 5, 5, 8, 8, 8, 8, 3, 3, 3, 3]) + lengths
    model = torch.nn.Linear(dim, vocab)
    with torch.no_grad():
        model.weight.copy_(0.5 * torch.randn(vocab, dim, generator=gen))
        model.bias.copy_(0.1 * torch.randn(vocab, generator=gen))

    def per_token_loss(rows: torch.Tensor, beta: float) -> torch.Tensor:  # [M, T]
        logps = torch.log_softmax(model(feats[rows]), -1).gather(-1, tokens[rows][..., None]).squeeze(-1)
        ratio = torch.exp(logps - logps.detach())
        delta = ref_logps[rows] - logps
        return -adv[rows][:, None] * ratio + beta * (torch.exp(delta) - delta - 1)

    return model, per_token_loss, mask, adv, costs


def _flat_grad(model, loss):
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return torch.cat([g.reshape(-1) for g in grads]).double()


@pytest.mark.parametrize("loss_type", ["grpo", "luspo", "dr_grpo", "dapo", "bnpo"])  # the five reductions
def test_sampled_weighted_gradient_is_unbiased(loss_type):
    """Mean over K sampled minibatches of the gradient of the weighted loss == full-batch gradient.

    Draws are i.i.d., so the K = 400 gradients are i.i.d.; per coordinate the Monte Carlo standard error is
    s / sqrt(K) (s: their sample std). Tolerance: 5 standard errors per coordinate (25 coordinates: a correct estimator
    fails with probability < 25 * 6e-7; observed max 1.5-2). The unweighted draws sit ~25 standard errors off. alpha = 0.2 makes zero-advantage rollouts drawable so that the KL term (beta = 0.1),
    present on every rollout, is estimated without bias too. The same draws without weights must fail the check.
    """
    model, per_token_loss, mask, adv, costs = _tiny_policy_problem()
    n, cols, beta, draws = adv.numel(), mask.size(1), 0.1, 400
    num_items = mask.sum()
    everyone = torch.arange(n)
    z_full = policy_loss_normalizer(loss_type, mask, num_items_in_batch=num_items, max_completion_length=cols)
    full = _flat_grad(model, weighted_policy_loss(per_token_loss(everyone, beta), mask, None, loss_type, z_full))

    sampler = CostAwareSampler(alpha=0.2, seed=0, recenter=False)
    weighted, unweighted = [], []
    for _ in range(draws):
        idx, w = sampler.draw(adv, costs)  # M = N, the shape TRL's batch keeps
        sub_mask = mask[idx]
        z = policy_loss_normalizer(
            loss_type, sub_mask, num_items_in_batch=num_items, max_completion_length=cols, sampled=True
        )
        weighted_loss = weighted_policy_loss(per_token_loss(idx, beta), sub_mask, w, loss_type, z)
        weighted.append(_flat_grad(model, weighted_loss))
        unweighted_loss = weighted_policy_loss(per_token_loss(idx, beta), sub_mask, None, loss_type, z)
        unweighted.append(_flat_grad(model, unweighted_loss))
    weighted, unweighted = torch.stack(weighted), torch.stack(unweighted)  # [K, P]

    def z_scores(samples):
        se = samples.std(0) / math.sqrt(draws)
        return (samples.mean(0) - full).abs() / (se + 1e-12)

    assert full.abs().max() > 1e-3
    assert z_scores(weighted).max() < 5.0, z_scores(weighted)
    assert z_scores(unweighted).max() > 10.0  # the check has power: sampling without weights is biased


def test_bnpo_micro_batch_token_count_is_biased_under_sampling():
    """Why `policy_loss_normalizer("bnpo", sampled=True)` uses the full batch's token count: TRL's own bnpo divisor
    (the sampled micro-batch's tokens) depends on the draw, and the weighted estimate is then biased; with K = 1500
    draws it sits > 5 standard errors off (observed 7.2), where the sampled normaliser stays within 5 (observed 2)."""
    model, per_token_loss, mask, adv, costs = _tiny_policy_problem()
    n, draws = adv.numel(), 1500
    full_loss = weighted_policy_loss(per_token_loss(torch.arange(n), 0.1), mask, None, "bnpo", mask.sum())
    full = _flat_grad(model, full_loss)
    sampler = CostAwareSampler(alpha=0.2, seed=0, recenter=False)
    grads = []
    for _ in range(draws):
        idx, w = sampler.draw(adv, costs)
        z = policy_loss_normalizer("bnpo", mask[idx])  # TRL's per-micro-batch count
        grads.append(_flat_grad(model, weighted_policy_loss(per_token_loss(idx, 0.1), mask[idx], w, "bnpo", z)))
    grads = torch.stack(grads)
    z_scores = (grads.mean(0) - full).abs() / (grads.std(0) / math.sqrt(draws))
    assert z_scores.max() > 5.0


def test_recentred_weights_rescale_the_gradient_by_a_constant():
    """N = 12 rollouts, one zero-variance group (N_+ = 8): re-centring multiplies every draw's gradient by N / N_+."""
    model, per_token_loss, mask, adv, costs = _tiny_policy_problem()
    raw_sampler = CostAwareSampler(seed=4, recenter=False)
    rec_sampler = CostAwareSampler(seed=4, recenter=True)
    for _ in range(5):
        idx, w_raw = raw_sampler.draw(adv, costs)
        idx_r, w_rec = rec_sampler.draw(adv, costs)
        assert torch.equal(idx, idx_r)
        z = policy_loss_normalizer("dapo", mask[idx], num_items_in_batch=mask.sum())
        g_raw = _flat_grad(model, weighted_policy_loss(per_token_loss(idx, 0.0), mask[idx], w_raw, "dapo", z))
        g_rec = _flat_grad(model, weighted_policy_loss(per_token_loss(idx, 0.0), mask[idx], w_rec, "dapo", z))
        torch.testing.assert_close(g_rec, g_raw * 12 / 8, rtol=1e-5, atol=1e-8)


# ------------------------------------------------------------------------------- paper section 4.4: least squares


def _cost_to_target(a, b, x_star, costs, sampler, proxy_costs, grad_proxy, target, chains, max_steps):
    """Importance-weighted SGD on f(x) = mean_i (a_i.x - b_i)^2 / 2, `chains` independent runs in parallel.

    Returns (steps, mean cost over chains) when the chain-mean ||x - x*||^2 first drops to `target` (None if never).
    Step size 1 / (mu (t + 50)) (strongly convex rate), the same for every sampling strategy.
    """
    n = a.size(0)
    idx, w = sampler.draw(grad_proxy, proxy_costs, num_draws=max_steps * chains)
    idx, w = idx.view(max_steps, chains), w.double().view(max_steps, chains)  # raw weights 1 / (n p_i)
    mu = torch.linalg.eigvalsh(a.T @ a / n)[0].item()
    spent = costs[idx].cumsum(0).mean(1)  # [steps]
    x = torch.zeros(chains, a.size(1), dtype=torch.float64)
    for t in range(max_steps):
        rows = idx[t]
        residual = (a[rows] * x).sum(1) - b[rows]  # [chains]
        x = x - (1.0 / (mu * (t + 50))) * (w[t] * residual)[:, None] * a[rows]
        if ((x - x_star) ** 2).sum(1).mean().item() <= target:
            return t + 1, spent[t].item()
    return None, float("inf")


def test_least_squares_cost_aware_sgd_beats_uniform_and_gradient_only_sampling():
    """Paper section 4.4 (its sizes and cost range were lost in extraction; these are ours): n = 200 points in d = 5,
    norms log-uniform in [0.1, 1], label noise proportional to the norm, costs log-uniform in [1, 1000] independent of
    the points; G_i = sup of ||grad f_i|| over the ball of radius 2 ||x*||. Theory (Thm 4.1): cost to an error is
    proportional to (second moment at x*) x (mean cost per step): 14.3 uniform, 8.2 G-only, 5.4 G / sqrt(c) here.
    Measured (64 chains, target mean ||x - x*||^2 <= 0.02): G / sqrt(c) spends 0.59x the cost of G-only and 0.38x
    that of uniform; in a sweep over problem seeds 0-4 these ratios were at most 0.71 and 0.38, so the asserted
    margins are 0.85x and 0.5x. G-only takes the fewest steps (the paper: fastest per iteration, not per cost).
    """
    gen = torch.Generator().manual_seed(0)
    n, d = 200, 5
    u = torch.randn(n, d, generator=gen, dtype=torch.float64)
    u = u / u.norm(dim=1, keepdim=True)
    norms = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(math.log(0.1), 0.0, generator=gen))
    a = u * norms[:, None]
    b = a @ torch.randn(d, generator=gen, dtype=torch.float64) + norms * torch.randn(n, generator=gen).double()
    costs = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(0.0, math.log(1000.0), generator=gen))
    x_star = torch.linalg.lstsq(a, b[:, None]).solution[:, 0]
    grad_bound = norms * (norms * 2 * x_star.norm() + b.abs())  # Lipschitz constant on the ball

    common = dict(target=0.02, chains=64, max_steps=6000)
    strategies = {
        "uniform": (CostAwareSampler(alpha=1.0, seed=1, recenter=False), costs),
        "gradient_only": (CostAwareSampler(seed=1, recenter=False), torch.ones(n, dtype=torch.float64)),
        "cost_aware": (CostAwareSampler(seed=1, recenter=False), costs),
    }
    result = {
        name: _cost_to_target(a, b, x_star, costs, s, proxy, grad_bound, **common)
        for name, (s, proxy) in strategies.items()
    }
    steps = {k: v[0] for k, v in result.items()}
    spent = {k: v[1] for k, v in result.items()}
    assert all(s is not None for s in steps.values()), result
    assert spent["cost_aware"] < 0.85 * spent["gradient_only"], result
    assert spent["cost_aware"] < 0.5 * spent["uniform"], result
    assert steps["gradient_only"] < steps["cost_aware"] and steps["gradient_only"] < steps["uniform"], result
