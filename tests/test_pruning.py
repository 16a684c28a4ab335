"""ARRoL components without vLLM: quality head, binned calibrator, votes, pruning callback (driven by a simulator)."""

from __future__ import annotations

import math

import pytest
import torch

from efficient_rlvr.pruning import (
    BinnedCalibrator,
    OnlinePruningCallback,
    PartialRollout,
    QualityHead,
    QualityHeadTrainer,
    RolloutRequest,
    RolloutResult,
    RolloutStep,
    hidden_state_positions,
    majority_vote,
    rank_weights,
    weighted_vote,
)

# ---------------------------------------------------------------------------------------------------------------
# Calibrator


def _hand_calibrator(**kwargs) -> BinnedCalibrator:
    # 4 bins. Positives 0.9, 0.9, 0.6 -> bins 3, 3, 2; negatives 0.1 x3, 0.4 -> bins 0, 0, 0, 1.
    cal = BinnedCalibrator(num_bins=4, alpha=1.0, cold_start_steps=0, **kwargs)
    cal.observe(torch.tensor([0.9, 0.1, 0.9, 0.1, 0.6, 0.1, 0.4]), torch.tensor([1, 0, 1, 0, 1, 0, 0]))
    cal.refit()
    return cal


# q(b) by hand: P(b|1) = [1,1,2,3]/7, P(b|0) = [4,2,1,1]/8, pi = 3/7.
HAND_Q = [3 / 17, 3 / 10, 12 / 19, 18 / 25]


def test_calibrator_posterior_on_hand_made_histograms():
    cal = _hand_calibrator()
    assert cal.prior == pytest.approx(3 / 7)
    assert cal.posterior_table.tolist() == pytest.approx(HAND_Q, abs=1e-12)
    # bin edges: b(s) = min(B - 1, floor(B s)); 0.25 -> bin 1, 1.0 -> bin 3, 0.0 -> bin 0
    q = cal.posterior(torch.tensor([0.0, 0.05, 0.25, 0.3, 0.55, 0.74, 0.999, 1.0]))
    assert q.dtype == torch.float32
    expected = [HAND_Q[b] for b in (0, 0, 1, 1, 2, 2, 3, 3)]
    assert q.tolist() == pytest.approx(expected, abs=1e-6)


def test_calibrator_delta_matches_closed_form_when_nothing_clips():
    # kappa = 0.5, lam = 0.5, rho = 0.5: no p hits the clip bounds here; delta is solved over the decided rollouts
    scores = torch.tensor([0.05, 0.3, 0.6, 0.9])  # one per bin
    mean_q = sum(HAND_Q) / 4
    literal = _hand_calibrator(survival_rule="literal")
    # mean_i (kappa + delta + lam (rho - q_i)) = kappa  <=>  delta = lam (mean q - rho)
    p, delta = literal.solve_survival(scores)
    assert delta == pytest.approx(0.5 * (mean_q - 0.5), abs=1e-8)
    assert p.tolist() == pytest.approx([0.5 + delta + 0.5 * (0.5 - q) for q in HAND_Q], abs=1e-6)
    # group-relative, one group (q_bar = mean q < rho): the terms -(q_bar - q_i) sum to 0, so delta = 0
    group = _hand_calibrator()
    p, delta = group.solve_survival(scores)
    assert delta == pytest.approx(0.0, abs=1e-8)
    assert p.tolist() == pytest.approx([0.5 - 0.5 * (mean_q - q) for q in HAND_Q], abs=1e-6)


@pytest.mark.parametrize("rule", ["group_relative", "literal"])
@pytest.mark.parametrize(
    ("kappa", "lam", "rho", "p_min", "p_max"),
    [
        (0.5, 0.5, 0.5, 0.25, 0.75),
        (0.3, 0.5, 0.4, 0.1, 0.9),
        (0.7, 2.0, 0.5, 0.25, 0.75),
        (0.25, 1.0, 0.5, 0.25, 0.75),
    ],
)
def test_bisection_mean_survival_equals_kappa(kappa, lam, rho, p_min, p_max, rule):
    gen = torch.Generator().manual_seed(0)
    labels = torch.rand(600, generator=gen) < 0.35
    scores = torch.where(labels, torch.rand(600, generator=gen) * 0.6 + 0.4, torch.rand(600, generator=gen) * 0.7)
    cal = BinnedCalibrator(
        kappa=kappa, lam=lam, rho=rho, p_min=p_min, p_max=p_max, buffer_size=1000, survival_rule=rule
    )
    cal.observe(scores, labels)
    cal.refit()
    # mean p over the rollouts decided together (here 75 groups of 8), through the public float32 path
    q = cal.posterior(scores).view(75, 8)
    group_means = q.mean(1, keepdim=True).expand_as(q).reshape(-1)
    p, delta = cal.solve_survival(scores, group_means)
    assert p.double().mean().item() == pytest.approx(kappa, abs=1e-6)
    assert float(p.min()) >= p_min - 1e-7 and float(p.max()) <= p_max + 1e-7
    assert torch.equal(cal.survival_probabilities(scores, group_means), p)


@pytest.mark.parametrize("rule", ["group_relative", "literal"])
def test_survival_probabilities_are_clipped(rule):
    cal = _hand_calibrator(lam=3.0, survival_rule=rule)
    p, delta = cal.solve_survival(torch.tensor([0.05, 0.3, 0.6, 0.9]))
    mean_q = sum(HAND_Q) / 4
    terms = [0.5 - q for q in HAND_Q] if rule == "literal" else [-(mean_q - q) for q in HAND_Q]  # mean q < rho
    raw = [0.5 + delta + 3.0 * t for t in terms]
    assert p.tolist() == pytest.approx([min(max(r, 0.25), 0.75) for r in raw], abs=1e-6)
    assert p.max().item() == pytest.approx(0.75) and p.min().item() == pytest.approx(0.25)  # both bounds bind
    assert sum(p.tolist()) / 4 == pytest.approx(0.5, abs=1e-6)


def test_calibrator_edge_cases_and_validation():
    cal = BinnedCalibrator(cold_start_steps=2)
    assert cal.survival_probabilities(torch.tensor([0.1, 0.9])).tolist() == pytest.approx([0.5, 0.5])
    assert not cal.ready
    cal.refit()  # empty buffer: prior 0.5, q 0.5
    assert cal.prior == 0.5 and not cal.ready
    cal.observe(torch.tensor([0.2, 0.3]), torch.tensor([0, 0]))  # only negatives: q = 0 everywhere
    cal.refit()
    assert cal.ready and cal.prior == 0.0
    assert cal.posterior(torch.tensor([0.9])).item() == 0.0
    with pytest.raises(ValueError, match="scores must lie in"):
        cal.observe(torch.tensor([1.5]), torch.tensor([1]))
    for kwargs, name in [
        ({"num_bins": 0}, "num_bins"),
        ({"alpha": 0.0}, "alpha"),
        ({"kappa": 0.9}, "kappa"),
        ({"p_max": 0.2}, "p_max"),
        ({"lam": -1.0}, "lam"),
        ({"rho": 1.5}, "rho"),
        ({"buffer_size": 0}, "buffer_size"),
        ({"cold_start_steps": -1}, "cold_start_steps"),
        ({"survival_rule": "greedy"}, "survival_rule"),
    ]:
        with pytest.raises(ValueError, match=name):
            BinnedCalibrator(**kwargs)


def test_calibrator_sliding_buffer_is_bounded():
    cal = BinnedCalibrator(num_bins=2, buffer_size=3, cold_start_steps=0)
    cal.observe(torch.tensor([0.9, 0.9, 0.1, 0.1]), torch.tensor([1, 1, 0, 0]))  # the first 0.9 falls out
    cal.refit()
    assert len(cal) == 3 and cal.prior == pytest.approx(1 / 3)


def test_calibrator_state_dict_roundtrip():
    cal = _hand_calibrator()
    state = cal.state_dict()
    other = BinnedCalibrator(num_bins=4, cold_start_steps=0)
    other.load_state_dict(state)
    probe = torch.linspace(0, 1, 17)
    assert torch.equal(other.survival_probabilities(probe), cal.survival_probabilities(probe))
    for c in (cal, other):
        c.observe(torch.tensor([0.7, 0.2]), torch.tensor([1, 0]))
        c.refit()
    assert torch.equal(other.posterior_table, cal.posterior_table) and other.num_refits == cal.num_refits == 2
    assert torch.equal(other.survival_probabilities(probe), cal.survival_probabilities(probe))


def test_survival_rule_moves_a_high_mean_group_toward_rho():
    """Lemma 4.1 behaviour: with mu > rho, rollouts with q_j above the group mean are the likeliest prunes, and
    pruning them moves the kept mean toward rho (here without overshoot); with mu < rho the group-relative rule
    prunes the rollouts below the mean first, while the literal appendix rule still favours low q."""
    gen = torch.Generator().manual_seed(1)
    labels = torch.rand(2000, generator=gen) < 0.5
    scores = (labels.float() * 0.5 + torch.rand(2000, generator=gen) * 0.5).clamp(0, 1)  # higher when positive
    cal = BinnedCalibrator(cold_start_steps=0, buffer_size=2000)
    cal.observe(scores, labels)
    cal.refit()
    group = torch.tensor([0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.3, 0.55])  # scores of one group
    q = cal.posterior(group).double()
    p = cal.survival_probabilities(group).double()
    mu, rho = q.mean().item(), cal.rho
    assert mu > rho
    assert all(p[i] <= p[j] for i in range(8) for j in range(8) if q[i] > q[j])  # non-increasing in q
    j = int(torch.argmin(p))  # the likeliest prune
    assert q[j] > mu
    mu_minus_j = (q.sum() - q[j]).item() / 7
    assert abs(mu_minus_j - rho) < abs(mu - rho)
    kept_mean = (p * q).sum().item() / p.sum().item()  # expected positive ratio of the kept rollouts
    assert rho < kept_mean < mu
    # A group below rho: the group-relative rule keeps its likely-correct rollouts; the literal rule, group-agnostic
    # (always favouring low q), moves it away from rho.
    low = torch.tensor([0.05, 0.1, 0.2, 0.6, 0.15])
    q_low, p_low = cal.posterior(low).double(), cal.survival_probabilities(low).double()
    assert q_low.mean() < rho
    assert all(p_low[i] >= p_low[j] for i in range(5) for j in range(5) if q_low[i] > q_low[j])
    assert (p_low * q_low).sum() / p_low.sum() > q_low.mean()
    literal = BinnedCalibrator(cold_start_steps=0, buffer_size=2000, survival_rule="literal")
    literal.observe(scores, labels)
    literal.refit()
    p_lit = literal.survival_probabilities(low).double()
    assert (p_lit * q_low).sum() / p_lit.sum() <= q_low.mean()
    assert torch.allclose(literal.survival_probabilities(group).double(), p, atol=1e-6)  # one group above rho: same


# ---------------------------------------------------------------------------------------------------------------
# Votes


def test_rank_weights():
    assert rank_weights([3.0, 1.0, 2.0]) == pytest.approx([1.0, 0.0, 0.5])
    assert rank_weights([1.0, 1.0, 3.0]) == pytest.approx([0.0, 0.0, 1.0])  # tie shares the average rank
    assert rank_weights(torch.tensor([0.2, 0.9, 0.5, 0.9])) == pytest.approx([0.0, 1.0, 0.4, 1.0])
    assert rank_weights([0.4]) == [1.0] and rank_weights([0.4, 0.4]) == [1.0, 1.0] and rank_weights([]) == []
    with pytest.raises(ValueError, match="NaN"):
        rank_weights([0.1, math.nan])


def test_weighted_vote_cases():
    answers = ["a", "b", "b", "c"]
    scores = [0.9, 0.1, 0.2, 0.5]  # weights [1, 0, 1/3, 2/3]: a 1, b 1/3, c 2/3
    assert majority_vote(answers) == "b"
    assert weighted_vote(answers, scores) == "a"
    assert weighted_vote(answers, torch.tensor(scores)) == "a"
    # equal scores -> every weight 1 -> majority vote
    assert weighted_vote(answers, [0.3] * 4) == "b"
    # tie in total weight (x: 1, y: 0 + 1) -> more votes wins
    assert weighted_vote(["x", "y", "y"], [2.0, 0.0, 2.0]) == "y"
    # None answers do not vote and are not ranked: ranks over [0.5, 0.6] only
    assert weighted_vote([None, "p", "q"], [0.99, 0.5, 0.6]) == "q"
    assert weighted_vote([None, None], [0.1, 0.2]) is None and majority_vote([]) is None
    # majority tie -> first appearing answer
    assert majority_vote(["u", "v", "v", "u"]) == "u"
    with pytest.raises(ValueError, match="same length"):
        weighted_vote(["a"], [0.1, 0.2])


def test_weighted_vote_keep_lets_only_the_best_scored_fraction_vote():
    """DeepConf's filter: the full rank-weighted vote goes to the six "b" voters (b: (5+4+3+2+1+0)/7, a: (7+6)/7);
    with keep=0.5 only the four best-scored vote (a 0.9, a 0.8, b 0.7, b 0.6: weights 1, 2/3, 1/3, 0), so "a" wins."""
    answers = ["a", "b", "a", "b", "b", "b", "b", "b"]
    scores = [0.9, 0.7, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2]
    assert weighted_vote(answers, scores) == "b"
    assert weighted_vote(answers, scores, keep=0.5) == "a"
    assert weighted_vote(answers, scores, keep=1.0) == weighted_vote(answers, scores)
    assert weighted_vote(answers, scores, keep=0.01) == "a"  # at least one voter: the best scored
    assert weighted_vote([None, "p", "q"], [0.99, 0.5, 0.6], keep=0.5) == "q"  # None neither votes nor counts
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="keep"):
            weighted_vote(answers, scores, keep=bad)


# ---------------------------------------------------------------------------------------------------------------
# Quality head


def _separable(n: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(width, generator=torch.Generator().manual_seed(12345))  # one separating direction for all sets
    x = torch.randn(n, width, generator=torch.Generator().manual_seed(seed))
    return x, (x @ w > 0).float()


def test_head_shapes_dtype_and_positions():
    head = QualityHead(16, seed=0)
    assert [tuple(p.shape) for p in head.parameters()] == [(128, 16), (128,), (1, 128), (1,)]
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    s = head.score(x)
    assert s.shape == (3, 5) and s.dtype == torch.float32 and ((s > 0) & (s < 1)).all()
    assert torch.allclose(head.score(x.to(torch.bfloat16)), s, atol=2e-2)
    assert torch.equal(QualityHead(16, seed=0).net[0].weight, head.net[0].weight)  # seeded init
    # prompt of 10 tokens: length-k state at index 10 + k - 2
    assert hidden_state_positions(10, 100, 32) == (40, 108)
    assert hidden_state_positions(10, 5, 32) == (13, 13)
    with pytest.raises(ValueError, match="hidden_size"):
        QualityHead(0)
    with pytest.raises(ValueError, match="lr"):
        QualityHeadTrainer(head, lr=0.0)


def test_head_training_reduces_bce_on_separable_data():
    x, y = _separable(256, 16, seed=0)
    x_last = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    head = QualityHead(16, seed=0)
    trainer = QualityHeadTrainer(head, lr=0.01)
    states = x.clone().requires_grad_(True)
    first = trainer.observe(states, x_last, y)  # rewards 0/1 -> labels reward > 0.5
    for _ in range(60):
        last = trainer.observe(x, x_last, y)
    assert states.grad is None  # inputs are detached
    assert last["pruning/head_loss_after"] < 0.3 * first["pruning/head_loss"]
    assert last["pruning/head_accuracy"] > 0.9
    x_test, y_test = _separable(256, 16, seed=7)  # held out
    assert trainer.loss(x_test, y_test).item() < 0.3 * first["pruning/head_loss"]
    assert trainer.metrics()["pruning/head_updates"] == 61.0


def test_head_trainer_resume_repeats_updates():
    x, y = _separable(64, 8, seed=3)
    a = QualityHeadTrainer(QualityHead(8, seed=0))
    for _ in range(3):
        a.observe(x, x, y)
    state = a.state_dict()
    b = QualityHeadTrainer(QualityHead(8, seed=5))
    b.load_state_dict(state)
    for _ in range(3):
        a.observe(x, x * 0.5, y)
        b.observe(x, x * 0.5, y)
    for pa, pb in zip(a.head.parameters(), b.head.parameters(), strict=True):
        assert torch.equal(pa, pb)


# ---------------------------------------------------------------------------------------------------------------
# Pruning callback, driven by a small engine simulator (the real engine is tested in test_pruning_engine.py)

WIDTH = 8


def _requests(groups: int, size: int, max_tokens: int = 64) -> list[RolloutRequest]:
    return [
        RolloutRequest(f"r{g}-{k}", g * size + k, f"g{g}", (1, 2, 3), max_tokens)
        for g in range(groups)
        for k in range(size)
    ]


def _state(index: int, length: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * index + length)
    return torch.randn(WIDTH, generator=gen)


class _Logprob:  # vLLM's Logprob: the callback reads `.logprob`
    def __init__(self, value: float):
        self.logprob = value


def _simulate(
    callback: OnlinePruningCallback, requests: list[RolloutRequest], lengths: list[int], logprob=None
) -> RolloutResult:
    """One generation: every active request gains a token per step; finished at its length; aborts stop it.
    `logprob(index, n)`: the sampled log-prob of token n of request `index`, handed over as vLLM does (a dict per
    position); None: hidden states instead."""
    callback.on_generation_start(requests)
    logprobs = {r.request_id: [] for r in requests}
    tokens = {r.request_id: [] for r in requests}
    active = {r.request_id for r in requests}
    aborted_at: dict[str, int] = {}
    step = 0
    while active:
        partials = []
        for r in requests:
            if r.request_id not in active:
                continue
            tokens[r.request_id].append(7)
            n = len(tokens[r.request_id])
            finished = n >= lengths[r.index]
            if logprob is None:
                partial = PartialRollout(r.request_id, r.index, tokens[r.request_id], finished, _state(r.index, n))
            else:
                logprobs[r.request_id].append({7: _Logprob(logprob(r.index, n))})
                partial = PartialRollout(
                    r.request_id, r.index, tokens[r.request_id], finished, None, logprobs[r.request_id]
                )
            partials.append(partial)
            if finished:
                active.discard(r.request_id)
        for rid in callback.on_step(RolloutStep(step, partials)):
            assert rid in active
            active.discard(rid)
            aborted_at[rid] = len(tokens[rid])
        step += 1
    result = RolloutResult(
        prompt_ids=[list(r.prompt_ids) for r in requests],
        completion_ids=[tokens[r.request_id] for r in requests],
        logprobs=None,
        logprob_token_ids=None,
        request_ids=[r.request_id for r in requests],
        group_ids=[r.group_id for r in requests],
        aborted=[r.request_id in aborted_at for r in requests],
        aborted_at=[aborted_at.get(r.request_id) for r in requests],
        finish_reasons=["abort" if r.request_id in aborted_at else "length" for r in requests],
        num_steps=step,
    )
    callback.on_generation_end(result)
    return result


def _callback(seed: int = 0, **cal_kwargs) -> OnlinePruningCallback:
    cal = BinnedCalibrator(cold_start_steps=cal_kwargs.pop("cold_start_steps", 0), **cal_kwargs)
    return OnlinePruningCallback(QualityHeadTrainer(QualityHead(WIDTH, seed=0)), cal, l_detect=5, rng=seed)


def test_callback_prunes_at_l_detect_and_keeps_min_survivors():
    # p_min = p_max = kappa = 0: every decided rollout would be pruned; only the survivor floor stops it.
    cb = _callback(kappa=0.0, p_min=0.0, p_max=0.0)
    requests = _requests(groups=2, size=4)
    lengths = [3, 12, 12, 12, 5, 9, 12, 12]  # r0-0 ends before L_detect=5; r1-0 ends exactly at it
    result = _simulate(cb, requests, lengths)
    decided = {d.request_id: d for d in cb.decisions}
    assert "r0-0" not in decided and "r1-0" not in decided  # finished at or before L_detect: never decided
    assert all(d.length == 5 for d in decided.values())
    pruned = cb.pruned_ids
    # group 0: r0-0 survives by finishing early, so 2 of the 3 long ones can go; group 1 likewise
    assert pruned == {"r0-1", "r0-2", "r1-1", "r1-2"}
    assert [d.forced_keep for d in decided.values()] == [False, False, True, False, False, True]
    for i, rid in enumerate(result.request_ids):
        expected = 5 if rid in pruned else lengths[i]
        assert len(result.completion_ids[i]) == expected and result.aborted[i] == (rid in pruned)
    m = cb.metrics()
    assert m["pruning/pruned_fraction"] == pytest.approx(4 / 8)
    assert m["pruning/keep_rate"] == pytest.approx(2 / 6)
    # tokens not generated: group 0 kept long rollout r0-3 ran 12 -> (12-5) x 2; group 1 kept r1-3 ran 12 -> 7 x 2
    assert m["pruning/tokens_not_generated_estimate"] == pytest.approx(28.0)
    assert all(k.startswith("pruning/") for k in m)


def test_callback_cold_start_never_prunes():
    cb = _callback(kappa=0.0, p_min=0.0, p_max=0.0, cold_start_steps=1)
    _simulate(cb, _requests(2, 4), [12] * 8)
    assert cb.pruned_ids == set() and len(cb.decisions) == 8 and all(d.cold_start for d in cb.decisions)
    cb.observe({f"r{g}-{k}": float(k % 2) for g in range(2) for k in range(4)})
    assert cb.calibrator.ready
    _simulate(cb, _requests(2, 4), [12] * 8)
    assert len(cb.pruned_ids) == 4


def test_callback_observe_trains_on_unpruned_finished_rollouts():
    cb = _callback()
    requests = _requests(2, 4)
    lengths = [3, 12, 12, 12, 5, 9, 12, 12]
    result = _simulate(cb, requests, lengths)
    rewards = [float(i % 2) for i in range(8)]
    ids, detect, last, values = cb.training_batch(rewards, result.request_ids)
    assert set(ids) == set(result.request_ids) - cb.pruned_ids
    for rid, d, la in zip(ids, detect, last, strict=True):
        i = result.request_ids.index(rid)
        assert torch.equal(d, _state(i, min(5, lengths[i]))) and torch.equal(la, _state(i, lengths[i]))
    metrics = cb.observe(rewards, result.request_ids)
    assert metrics["pruning/head_examples"] == len(ids)
    # the calibration buffer holds only those that reached L_detect (r0-0 finished before it)
    reached = [rid for rid in ids if lengths[result.request_ids.index(rid)] >= 5]
    assert "r0-0" in ids and "r0-0" not in reached
    assert len(cb.calibrator) == len(reached) == metrics["pruning/calibration_examples"]
    assert cb.calibrator.num_refits == 1
    assert cb.trainer.num_updates == 1
    with pytest.raises(ValueError, match="request_ids"):
        cb.observe([1.0, 0.0])


def test_callback_resume_repeats_next_decisions():
    lengths = [12, 12, 12, 12, 6, 12, 12, 8]
    a = _callback(seed=11)
    for _ in range(3):  # some history: head updates, calibrator buffer, RNG use
        result = _simulate(a, _requests(2, 4), lengths)
        a.observe([float(i % 3 == 0) for i in range(8)], result.request_ids)
    state = a.state_dict()
    torch.save(state, "/dev/null")  # torch.save-able
    b = _callback(seed=99)
    b.load_state_dict(state)
    for _ in range(2):
        ra = _simulate(a, _requests(2, 4), lengths)
        rb = _simulate(b, _requests(2, 4), lengths)
        assert a.decisions == b.decisions and ra.completion_ids == rb.completion_ids
        a.observe([1.0, 0.0] * 4, ra.request_ids)
        b.observe([1.0, 0.0] * 4, rb.request_ids)
    assert any(d.pruned for d in a.decisions) and any(not d.pruned for d in a.decisions)


def test_callback_random_mode_keeps_kappa_regardless_of_scores():
    cal = BinnedCalibrator(kappa=0.3, p_min=0.1, p_max=0.9, cold_start_steps=0)
    cb = OnlinePruningCallback(QualityHead(WIDTH, seed=0), cal, l_detect=5, min_survivors_per_group=1, mode="random")
    kept = 0
    for _ in range(50):
        _simulate(cb, _requests(2, 4), [12] * 8)
        assert all(d.survival_probability == pytest.approx(0.3) for d in cb.decisions)
        kept += sum(not d.pruned for d in cb.decisions)
    assert kept / 400 == pytest.approx(0.3, abs=0.07)  # binomial sd ~0.023


def test_callback_validation():
    cal = BinnedCalibrator()
    head = QualityHead(WIDTH)
    for kwargs, name in [({"l_detect": 0}, "l_detect"), ({"min_survivors_per_group": 0}, "min_survivors_per_group")]:
        with pytest.raises(ValueError, match=name):
            OnlinePruningCallback(head, cal, **kwargs)
    with pytest.raises(ValueError, match="rng"):
        OnlinePruningCallback(head, cal, rng="seed")
    with pytest.raises(ValueError, match="mode"):
        OnlinePruningCallback(head, cal, mode="greedy")
    with pytest.raises(RuntimeError, match="QualityHeadTrainer"):
        OnlinePruningCallback(head, cal).observe({})


def _confident(index: int, n: int) -> float:
    """Odd rollouts of each group are sure of every token; even ones hesitate once, at token 3."""
    return -0.05 if index % 2 or n != 3 else -2.0


def test_confidence_scorer_scores_the_sampled_tokens_and_learns_nothing():
    from efficient_rlvr.pruning.confidence import WINDOW, deepconf

    cal = BinnedCalibrator(kappa=0.5, cold_start_steps=0)
    cb = OnlinePruningCallback(QualityHeadTrainer(QualityHead(WIDTH, seed=0)), cal, l_detect=5, scorer="confidence")
    assert not cb.needs_hidden_states  # the engine captures no hidden states for it
    result = _simulate(cb, _requests(2, 4), [12] * 8, logprob=_confident)
    for d in cb.decisions:
        values = torch.tensor([_confident(d.index, n) for n in range(1, 6)])  # the L_detect = 5 tokens it saw
        assert d.score == pytest.approx(math.exp(deepconf(values, 5)[1]))
    hesitant = [d.score for d in cb.decisions if d.index % 2 == 0]
    assert WINDOW == 4 and max(hesitant) == pytest.approx(math.exp((-2.0 - 0.15) / 4))
    assert min(d.score for d in cb.decisions if d.index % 2) == pytest.approx(math.exp(-0.05))
    ids, detect, last, values = cb.training_batch([float(i % 2) for i in range(8)], result.request_ids)
    assert detect.shape == (len(ids), 2) and last.shape == (len(ids), 2)
    metrics = cb.observe([float(i % 2) for i in range(8)], result.request_ids)
    assert cb.trainer.num_updates == 0 and "pruning/head_loss" not in metrics  # no head to train
    assert metrics["pruning/head_within_group_auc_last"] == pytest.approx(1.0)  # confident ones were right
    state = cb.state_dict()
    head = OnlinePruningCallback(QualityHeadTrainer(QualityHead(WIDTH, seed=0)), BinnedCalibrator(), l_detect=5)
    with pytest.raises(ValueError, match="scorer"):
        head.load_state_dict(state)


def test_deepconf_statistics_by_hand():
    from efficient_rlvr.pruning.confidence import deepconf

    values = torch.tensor([-0.1, -0.2, -3.0, -0.1, -0.1, -0.5])
    mean, lowest = deepconf(values, 6)
    assert mean == pytest.approx(-4.0 / 6) and lowest == pytest.approx((-3.0 - 0.1 - 0.1 - 0.5) / 4)
    assert deepconf(values, 3) == pytest.approx((-3.3 / 3, -3.3 / 3))  # shorter than the window: one window
    assert deepconf(values, 0) == (0.0, 0.0)
    unknown = torch.tensor([-0.1, float("-inf"), -0.1, -0.1, -0.1, -0.1])  # vLLM's NaN, read as least confident
    assert deepconf(unknown, 6)[1] == float("-inf")


def test_confidence_scorer_needs_the_engines_logprobs():
    cb = OnlinePruningCallback(QualityHead(WIDTH), BinnedCalibrator(), l_detect=2, scorer="confidence")
    with pytest.raises(RuntimeError, match="logprobs=0"):
        _simulate(cb, _requests(1, 2), [4, 4])  # hidden states only, as with SamplingParams(logprobs=None)
    with pytest.raises(ValueError, match="scorer"):
        OnlinePruningCallback(QualityHead(WIDTH), BinnedCalibrator(), scorer="oracle")
