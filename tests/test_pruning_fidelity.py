"""ARRoL fidelity (issue 12, items 1 and 2): the survival rule, its decision timing, the calibration buffer.

Everything runs through :class:`OnlinePruningCallback` driven by a lockstep engine simulator (no vLLM). The quality
head is an identity head (score = sigmoid of the one-dimensional hidden state), so a simulated world sets the scores
directly: a rollout's logit at L_detect is ``mu * correct + N(0, 1)``, which gives a head of within-group AUC
``Phi(mu / sqrt(2))``. All worlds are seeded; the balance comparisons are paired (the same groups and the same
uniform draws under the rule and under random pruning at the same keep rate) and sized so that the weakest effect
(AUC 0.6) is resolved by several standard errors of the paired per-group differences.
"""

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
)

G = 16
KAPPA = 0.5
RHO = 0.5
MIN_SURVIVORS = 2
REDRAWS = 32  # fresh uniforms per world for the balance statistics (the world's own draws are checked too)


# ---------------------------------------------------------------------------------------------------------------
# Simulation helpers
def _identity_head() -> QualityHead:
    """``score(x) = sigmoid(x[0])``: relu(x) - relu(-x) = x."""
    head = QualityHead(1, inner_size=2)
    with torch.no_grad():
        head.net[0].weight.copy_(torch.tensor([[1.0], [-1.0]]))
        head.net[0].bias.zero_()
        head.net[2].weight.copy_(torch.tensor([[1.0, -1.0]]))
        head.net[2].bias.zero_()
    return head


def _requests(groups: int, size: int, tag: str = "r") -> list[RolloutRequest]:
    return [
        RolloutRequest(f"{tag}{g}-{k}", g * size + k, f"g{g}", (1, 2, 3), 10_000)
        for g in range(groups)
        for k in range(size)
    ]


def _run(
    callback: OnlinePruningCallback,
    requests: list[RolloutRequest],
    lengths: list[int],
    state,
    stalled: dict[int, set[int]] | None = None,
) -> RolloutResult:
    """One generation in lockstep: every running request gains one token per engine step.

    ``state(i, n)`` is request i's hidden state ``[1]`` from which its n-th token was sampled; request i finishes
    with ``lengths[i]`` tokens; ``stalled[i]`` holds the engine steps in which the scheduler does not run request i
    (preempted or not yet scheduled: it produces no token and is absent from that step's outputs).
    """
    stalled = stalled or {}
    callback.on_generation_start(requests)
    length = {r.request_id: 0 for r in requests}
    tokens = {r.request_id: [] for r in requests}
    active = {r.request_id for r in requests}
    aborted_at: dict[str, int] = {}
    step = 0
    while active:
        partials = []
        for r in requests:
            if r.request_id not in active or step in stalled.get(r.index, ()):
                continue
            tokens[r.request_id].append(7)
            n = len(tokens[r.request_id])
            length[r.request_id] = n
            finished = n >= lengths[r.index]
            partials.append(PartialRollout(r.request_id, r.index, tokens[r.request_id], finished, state(r.index, n)))
            if finished:
                active.discard(r.request_id)
        for rid in callback.on_step(RolloutStep(step, partials)):
            assert rid in active, rid
            active.discard(rid)
            aborted_at[rid] = length[rid]
        step += 1
        assert step < 100_000
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


def _mu(auc: float) -> float:
    """Class separation of unit-variance Gaussian logits with ROC AUC ``auc``: ``sqrt(2) Phi^-1(auc)``."""
    return 2.0 * torch.erfinv(torch.tensor(2.0 * auc - 1.0, dtype=torch.float64)).item()


def _world(
    groups: int, pass_rate: float | None, auc: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels ``[groups, G]`` and L_detect logits ``[groups, G]``; ``pass_rate`` None: uniform per-group rates."""
    rates = torch.rand(groups, 1, generator=gen) if pass_rate is None else torch.full((groups, 1), pass_rate)
    labels = torch.rand(groups, G, generator=gen) < rates
    logits = _mu(auc) * labels.float() + torch.randn(groups, G, generator=gen)
    return labels, logits


def _fitted_calibrator(labels: torch.Tensor, logits: torch.Tensor, **kwargs) -> BinnedCalibrator:
    cal = BinnedCalibrator(cold_start_steps=0, buffer_size=10**7, kappa=KAPPA, rho=kwargs.pop("rho", RHO), **kwargs)
    cal.observe(torch.sigmoid(logits.flatten()), labels.flatten())
    cal.refit()
    return cal


def _decide(
    cal: BinnedCalibrator, logits: torch.Tensor, mode: str = "arrol", seed: int = 0
) -> dict[str, torch.Tensor]:
    """One generation through the callback in which every rollout reaches L_detect = 1 in the same engine step
    (lengths 2): ``kept``, survival probabilities ``p`` and ``draws``, each ``[groups, G]``, by prompt index."""
    groups = logits.shape[0]
    flat = logits.flatten()
    callback = OnlinePruningCallback(
        _identity_head(), cal, l_detect=1, min_survivors_per_group=MIN_SURVIVORS, rng=seed, mode=mode
    )
    rows = list(flat.view(-1, 1).unbind(0))
    result = _run(callback, _requests(groups, G), [2] * flat.numel(), lambda i, n: rows[i])
    decisions = sorted(callback.decisions, key=lambda d: d.index)
    assert [d.index for d in decisions] == list(range(flat.numel()))
    p = torch.tensor([d.survival_probability for d in decisions], dtype=torch.float64).view(groups, G)
    draws = torch.tensor([d.draw for d in decisions], dtype=torch.float64).view(groups, G)
    return {"kept": ~torch.tensor(result.aborted).view(groups, G), "p": p, "draws": draws}


def _prune_once(cal: BinnedCalibrator, logits: torch.Tensor, mode: str = "arrol", seed: int = 0) -> torch.Tensor:
    return _decide(cal, logits, mode, seed)["kept"]


def _keep(p: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """The callback's decisions for groups decided in one batch: keep when ``draw < p``; in prompt order, a prune
    that would leave fewer than MIN_SURVIVORS is turned into a keep. ``[..., G]`` -> ``[..., G]`` bool."""
    prune = draws >= p
    return ~(prune & (prune.long().cumsum(-1) <= p.shape[-1] - MIN_SURVIVORS))


def _group_stats(labels: torch.Tensor, kept: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per group (``kept`` ``[groups, G]`` or ``[draws, groups, G]``, averaged over draws): survivors' positive
    ratio, rho_hat (1 - rho_hat), |rho_hat - rho| and 'a mixed group turned zero-variance'."""
    k = kept.float()
    rho_hat = (labels.float() * k).sum(-1) / k.sum(-1)
    mixed = (labels.sum(1) > 0) & (labels.sum(1) < labels.shape[1])
    flat = mixed & ((rho_hat == 0) | (rho_hat == 1))
    stats = {"rho_hat": rho_hat, "var": rho_hat * (1 - rho_hat), "dist": (rho_hat - RHO).abs(), "flat": flat.float()}
    if kept.dim() == 3:
        stats = {key: value.mean(0) for key, value in stats.items()}
    return {**stats, "mixed": mixed.float()}


def _versus_random(
    labels: torch.Tensor, decided: dict[str, torch.Tensor], redraws: int, seed: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-group statistics of the callback's survival probabilities and of random pruning at the same keep rate,
    each averaged over ``redraws`` fresh sets of uniforms shared by both (paired)."""
    assert torch.equal(_keep(decided["p"], decided["draws"]), decided["kept"])  # _keep is the callback's rule
    u = torch.rand(redraws, *labels.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    rule = _group_stats(labels, _keep(decided["p"], u))
    rand = _group_stats(labels, _keep(torch.full_like(decided["p"], KAPPA), u))
    return rule, rand


def _paired_z(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Mean of ``a - b`` and its z-score (mean over standard error of the per-group differences)."""
    d = (a - b).double()
    se = d.std().item() / math.sqrt(d.numel())
    return d.mean().item(), d.mean().item() / se if se > 0 else math.inf


# ---------------------------------------------------------------------------------------------------------------
# Item 1: the survival rule
@pytest.mark.parametrize("auc", [0.6, 0.7, 0.8])
def test_group_relative_rule_balances_survivors_better_than_random_pruning(auc):
    """The issue's setting: G = 16, pass rate 0.32 < rho = 0.5, default lambda / clip, head of within-group AUC
    0.6 / 0.7 / 0.8. Against random pruning at the same keep rate (same groups, same draws): survivors' E[rho_hat]
    moves toward rho, E[rho_hat (1 - rho_hat)] rises and fewer mixed groups are left with zero variance."""
    gen = torch.Generator().manual_seed(int(auc * 100))
    cal = _fitted_calibrator(*_world(2000, 0.32, auc, gen))
    labels, logits = _world(3000, 0.32, auc, gen)
    decided = _decide(cal, logits)
    assert decided["p"].mean().item() == pytest.approx(KAPPA, abs=2e-3)  # the keep rate of random pruning
    rule, rand = _versus_random(labels, decided, REDRAWS, seed=1)
    d_rho, z_rho = _paired_z(rule["rho_hat"], rand["rho_hat"])
    d_var, z_var = _paired_z(rule["var"], rand["var"])
    d_flat, z_flat = _paired_z(rand["flat"], rule["flat"])
    mixed = rule["mixed"].sum().item()
    print(
        f"\nAUC {auc}: E[rho_hat] rule {rule['rho_hat'].mean():.4f} random {rand['rho_hat'].mean():.4f} (z {z_rho:.1f}); "
        f"E[var] {rule['var'].mean():.4f} vs {rand['var'].mean():.4f} (z {z_var:.1f}); mixed groups turned flat "
        f"{rule['flat'].sum() / mixed:.4f} vs {rand['flat'].sum() / mixed:.4f} (z {z_flat:.1f})"
    )
    assert abs(rule["rho_hat"].mean() - RHO) < abs(rand["rho_hat"].mean() - RHO)
    assert d_rho > 0 and z_rho > 4
    assert d_var > 0 and z_var > 4
    assert d_flat > 0 and z_flat > 4


def test_group_relative_rule_balances_groups_on_both_sides_of_rho():
    """Pass rates uniform in [0, 1] (groups above and below rho), AUC 0.8: survivors end closer to rho in mean
    absolute distance, with more variance and fewer flattened mixed groups than under random pruning."""
    gen = torch.Generator().manual_seed(5)
    cal = _fitted_calibrator(*_world(2000, None, 0.8, gen))
    labels, logits = _world(2000, None, 0.8, gen)
    rule, rand = _versus_random(labels, _decide(cal, logits), REDRAWS, seed=2)
    d_dist, z_dist = _paired_z(rand["dist"], rule["dist"])
    d_var, z_var = _paired_z(rule["var"], rand["var"])
    d_flat, z_flat = _paired_z(rand["flat"], rule["flat"])
    print(f"\nuniform pass rates, AUC 0.8: z |rho_hat - rho| {z_dist:.1f}, var {z_var:.1f}, flat {z_flat:.1f}")
    assert d_dist > 0 and z_dist > 4
    assert d_var > 0 and z_var > 4
    assert d_flat > 0 and z_flat > 4


def test_rho_changes_decisions():
    gen = torch.Generator().manual_seed(3)
    labels, logits = _world(2000, 0.32, 0.8, gen)
    new_labels, new_logits = _world(500, 0.32, 0.8, gen)
    kept = {rho: _prune_once(_fitted_calibrator(labels, logits, rho=rho), new_logits) for rho in (0.2, 0.8)}
    changed = (kept[0.2] != kept[0.8]).float().mean().item()
    assert changed > 0.05, changed
    # rho below every group's mean: likely-correct rollouts go first; above: likely-wrong ones go first
    low, high = (_group_stats(new_labels, kept[rho])["rho_hat"].mean().item() for rho in (0.2, 0.8))
    assert low < high


def test_literal_rule_is_selectable_ignores_rho_and_unbalances_groups_below_rho():
    """``survival_rule="literal"`` is the appendix formula: rho cancels (delta absorbs lambda rho), so decisions do
    not depend on it, and below rho the survivors are less balanced than under random pruning."""
    gen = torch.Generator().manual_seed(4)
    train_labels, train_logits = _world(2000, 0.32, 0.8, gen)
    labels, logits = _world(2000, 0.32, 0.8, gen)
    decided = {
        rho: _decide(_fitted_calibrator(train_labels, train_logits, rho=rho, survival_rule="literal"), logits)
        for rho in (0.2, 0.8)
    }
    assert torch.equal(decided[0.2]["kept"], decided[0.8]["kept"])
    assert torch.allclose(decided[0.2]["p"], decided[0.8]["p"], atol=1e-6)
    literal, rand = _versus_random(labels, decided[0.2], REDRAWS, seed=3)
    d_rho, z_rho = _paired_z(rand["rho_hat"], literal["rho_hat"])
    d_var, z_var = _paired_z(rand["var"], literal["var"])
    assert literal["rho_hat"].mean() < rand["rho_hat"].mean() < RHO
    assert z_rho > 4 and z_var > 4
    with pytest.raises(ValueError, match="survival_rule"):
        BinnedCalibrator(survival_rule="greedy")


def test_survival_probabilities_group_relative_formula_and_keep_rate():
    """p_i = clip(kappa + delta + lambda sign(q_bar_g - rho) (q_bar_g - q_i), p_min, p_max), mean p = kappa."""
    cal = BinnedCalibrator(num_bins=4, cold_start_steps=0, lam=2.0)
    cal.observe(torch.tensor([0.9, 0.1, 0.9, 0.1, 0.6, 0.1, 0.4]), torch.tensor([1, 0, 1, 0, 1, 0, 0]))
    cal.refit()
    scores = torch.tensor([0.9, 0.6, 0.1, 0.05, 0.3, 0.9])
    q = cal.posterior(scores).double()
    q_bar = torch.tensor([0.7, 0.7, 0.7, 0.2, 0.2, 0.2], dtype=torch.float64)  # groups above / below rho
    p, delta = cal.solve_survival(scores, q_bar)
    expected = (KAPPA + delta + 2.0 * torch.sign(q_bar - RHO) * (q_bar - q)).clamp(0.25, 0.75)
    assert p.double().tolist() == pytest.approx(expected.tolist(), abs=1e-6)
    assert p.double().mean().item() == pytest.approx(KAPPA, abs=1e-6)
    assert p[0] < p[1] and p[5] > p[4]  # above rho: likely-correct first; below: likely-wrong first
    assert torch.equal(cal.survival_probabilities(scores, q_bar), p)


# ---------------------------------------------------------------------------------------------------------------
# Decision timing: per group, once its running rollouts reached L_detect
def test_group_waits_for_a_lagging_member_but_not_for_a_stalled_one():
    # kappa = p_min = p_max = 0: every decided rollout is pruned unless the floor (2 per group) forbids it.
    cal = BinnedCalibrator(kappa=0.0, p_min=0.0, p_max=0.0, cold_start_steps=0)
    cal.observe(torch.linspace(0, 1, 50), torch.linspace(0, 1, 50) > 0.5)
    cal.refit()
    callback = OnlinePruningCallback(_identity_head(), cal, l_detect=5, min_survivors_per_group=2, rng=0)
    requests = _requests(2, 4)
    stalled = {3: set(range(2, 10)), 7: {0}}  # r0-3: preempted for steps 2..9; r1-3: scheduled one step late
    base = torch.linspace(-1.0, 1.0, 8)
    result = _run(callback, requests, [12] * 8, lambda i, n: torch.tensor([base[i] + 0.1 * n]), stalled)
    by_id = {d.request_id: d for d in callback.decisions}
    # group 1 waits one step for r1-3: all four decided together at its L_detect, the others then have 6 tokens
    assert [by_id[f"r1-{k}"].length for k in range(4)] == [6, 6, 6, 5]
    # group 0 does not wait for the stalled r0-3: three decided at L_detect, r0-3 alone when it gets there
    assert [by_id[f"r0-{k}"].length for k in range(3)] == [5, 5, 5] and by_id["r0-3"].length == 5
    order = [d.request_id for d in callback.decisions]
    assert order.index("r0-3") > order.index("r1-3")
    # scores are taken at L_detect (the state that sampled token 5), whenever the decision happens
    for d in callback.decisions:
        i = int(d.index)
        assert d.score == pytest.approx(torch.sigmoid(base[i] + 0.5).item(), abs=1e-6)
    # the late decision sees the whole group: q_bar over the four L_detect scores
    q = cal.posterior(torch.sigmoid(base[:4] + 0.5))
    assert by_id["r0-3"].group_mean == pytest.approx(q.mean().item(), abs=1e-6)
    assert by_id["r0-0"].group_mean == pytest.approx(q[:3].mean().item(), abs=1e-6)
    pruned = callback.pruned_ids
    assert pruned == {"r0-0", "r0-1", "r1-0", "r1-1"}
    for i, rid in enumerate(result.request_ids):
        if rid in pruned:
            assert result.aborted_at[i] == by_id[rid].length


def test_finished_group_members_enter_the_group_mean_at_their_last_token():
    cal = BinnedCalibrator(cold_start_steps=0)
    cal.observe(torch.linspace(0, 1, 50), torch.linspace(0, 1, 50) > 0.5)
    cal.refit()
    callback = OnlinePruningCallback(_identity_head(), cal, l_detect=5, min_survivors_per_group=1, rng=0)
    lengths = [3, 12, 12, 12]  # r0-0 finishes before L_detect
    last = torch.tensor([2.0, 0.0, 0.0, 0.0])
    early = torch.tensor([-3.0, -1.0, 0.5, 1.5])

    def state(i: int, n: int) -> torch.Tensor:
        return torch.tensor([last[i].item() if n == lengths[i] else early[i].item()])

    _run(callback, _requests(1, 4), lengths, state)
    q_detect = cal.posterior(torch.sigmoid(early[1:]))
    q_last = cal.posterior(torch.sigmoid(last[:1]))
    expected = torch.cat([q_last, q_detect]).mean().item()
    assert {d.request_id for d in callback.decisions} == {"r0-1", "r0-2", "r0-3"}
    assert all(d.group_mean == pytest.approx(expected, abs=1e-6) for d in callback.decisions)


# ---------------------------------------------------------------------------------------------------------------
# Item 2: the calibration buffer and the realised keep rate
def test_calibration_buffer_holds_only_rollouts_scored_at_l_detect():
    head = _identity_head()
    cal = BinnedCalibrator(cold_start_steps=0)
    callback = OnlinePruningCallback(QualityHeadTrainer(head, lr=1e-12), cal, l_detect=5, rng=0)
    lengths = [3, 12, 12, 12, 5, 9, 12, 4]  # r0-0 and r1-3 finish before L_detect, r1-0 exactly at it
    detect = torch.linspace(-2.0, 2.0, 8)

    def state(i: int, n: int) -> torch.Tensor:
        return torch.tensor([3.0 if n == lengths[i] and n != 5 else detect[i].item()])

    result = _run(callback, _requests(2, 4), lengths, state)
    rewards = [1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    callback.observe(rewards, result.request_ids)
    buffered = cal.state_dict()
    reached = [i for i, n in enumerate(lengths) if n >= 5 and not result.aborted[i]]
    assert len(cal) == len(reached)
    assert buffered["scores"] == pytest.approx([torch.sigmoid(detect[i]).item() for i in reached], abs=1e-6)
    assert buffered["labels"] == [rewards[i] > 0.5 for i in reached]
    assert cal.prior == pytest.approx(sum(rewards[i] > 0.5 for i in reached) / len(reached))
    # the head still trains on every finished rollout, the early ones included
    assert callback.metrics()["pruning/head_examples"] == len(lengths) - len(callback.pruned_ids)


@pytest.mark.parametrize(("kappa", "p_min", "p_max"), [(0.5, 0.25, 0.75), (0.3, 0.1, 0.9)])
def test_realised_keep_rate_over_a_run_is_kappa(kappa, p_min, p_max):
    """A 14-step run with learning: 40% of the rollouts finish before L_detect, nearly all of them correct with
    confident last-token scores; the long ones pass 25% of the time. Cold start 2 steps. The realised keep rate
    among the decided rollouts after the cold start stays within 0.03 of kappa and is reported cumulatively."""
    gen = torch.Generator().manual_seed(11)
    cal = BinnedCalibrator(kappa=kappa, p_min=p_min, p_max=p_max, cold_start_steps=2, buffer_size=4096)
    trainer = QualityHeadTrainer(_identity_head(), lr=1e-12)
    callback = OnlinePruningCallback(trainer, cal, l_detect=4, min_survivors_per_group=2, rng=0)
    groups, mu = 64, _mu(0.8)
    kept = decided = 0
    for step in range(14):
        n = groups * G
        early = torch.rand(n, generator=gen) < 0.4
        correct = torch.where(early, torch.rand(n, generator=gen) < 0.9, torch.rand(n, generator=gen) < 0.25)
        detect = mu * correct.float() + torch.randn(n, generator=gen)
        last = 4.0 * (2 * correct.float() - 1) + torch.randn(n, generator=gen)
        lengths = torch.where(
            early, torch.randint(2, 4, (n,), generator=gen), torch.randint(6, 9, (n,), generator=gen)
        )
        lengths_list = lengths.tolist()

        def state(i: int, k: int, detect=detect, last=last, lengths_list=lengths_list) -> torch.Tensor:
            return last[i : i + 1] if k == lengths_list[i] else detect[i : i + 1]

        result = _run(callback, _requests(groups, G, tag=f"s{step}-"), lengths_list, state)
        if step >= 2:
            assert not any(d.cold_start for d in callback.decisions)
            kept += sum(not d.pruned for d in callback.decisions)
            decided += len(callback.decisions)
        callback.observe(correct.float().tolist(), result.request_ids)
    realised = kept / decided
    print(f"\nkappa {kappa}: realised keep rate {realised:.4f} over {decided} decided rollouts")
    assert abs(realised - kappa) < 0.03
    assert callback.metrics()["pruning/realised_keep_rate"] == pytest.approx(realised)


# ---------------------------------------------------------------------------------------------------------------
# The gate (issue 13): prune only while the head ranks within groups
def _gated_run(auc: float, steps: int = 6) -> list[dict]:
    """``steps`` generations of 24 groups x G through a callback whose head has within-group AUC ``auc`` (identity
    head, frozen), gate threshold 0.6 over a 2-step window, 1 cold-start step; every rollout reaches L_detect."""
    from efficient_rlvr.pruning import HeadGate

    gen = torch.Generator().manual_seed(5)
    cal = BinnedCalibrator(kappa=KAPPA, cold_start_steps=1, buffer_size=4096)
    gate = HeadGate(0.6, window=2, min_groups=8)
    callback = OnlinePruningCallback(
        QualityHeadTrainer(_identity_head(), lr=1e-12), cal, l_detect=2, min_survivors_per_group=2, rng=0, gate=gate
    )
    out = []
    for step in range(steps):
        labels, logits = _world(24, 0.5, auc, gen)
        rows = list(logits.flatten().view(-1, 1).unbind(0))
        result = _run(callback, _requests(24, G, tag=f"s{step}-"), [4] * labels.numel(), lambda i, n, r=rows: r[i])
        metrics = callback.metrics()
        out.append(
            {
                "pruned": sum(result.aborted),
                "gated": metrics["pruning/gated"],
                "all_gated": all(d.gated for d in callback.decisions),
                "cold": not cal.ready,
            }
        )
        callback.observe(labels.flatten().float().tolist(), result.request_ids)
        out[-1]["gate_auc"] = callback.metrics()["pruning/gate_auc"]
        out[-1]["within"] = callback.metrics()["pruning/head_within_group_auc"]
    return out


def test_gate_stops_pruning_with_a_head_that_does_not_rank_within_groups():
    steps = _gated_run(auc=0.5)
    after_cold = [s for s in steps if not s["cold"]]
    assert len(after_cold) >= 4
    assert all(s["pruned"] == 0 and s["gated"] == 1.0 and s["all_gated"] for s in after_cold)
    assert all(abs(s["gate_auc"] - 0.5) < 0.1 for s in steps)  # it saw the head's within-group AUC


def test_gate_lets_a_ranking_head_prune():
    steps = _gated_run(auc=0.9)
    after_cold = [s for s in steps if not s["cold"]]
    assert all(s["pruned"] > 0 and s["gated"] == 0.0 for s in after_cold)
    assert all(s["gate_auc"] > 0.8 for s in steps)


def test_gate_state_round_trips_and_zero_disables_it():
    from efficient_rlvr.pruning import HeadGate

    gate = HeadGate(0.6, window=3, min_groups=2)
    assert not gate.open  # no evidence yet
    gate.observe(torch.tensor([0.9, 0.1, 0.8, 0.2]), torch.tensor([1, 0, 1, 0]), ["a", "a", "b", "b"])
    assert gate.open and gate.auc == 1.0 and gate.metrics()["pruning/head_within_group_groups"] == 2.0
    restored = HeadGate()
    restored.load_state_dict(gate.state_dict())
    assert restored.open and restored.auc == gate.auc and restored.state_dict() == gate.state_dict()
    assert HeadGate(0.0).open
    with pytest.raises(ValueError, match="min_auc"):
        HeadGate(1.0)
