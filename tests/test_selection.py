"""Tests of HIVE prompt selection (efficient_rlvr.selection): GRESO skip rule, prompt entropy, median filter,
dynamic-sampling gate, candidate pool. Expected values are computed by hand in the comments."""

from __future__ import annotations

import io
import math
import time

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from efficient_rlvr.selection import (
    Candidate,
    CandidatePool,
    EntropyMedianFilter,
    HistorySampler,
    SelectorChain,
    ZeroVarianceGate,
    gather_candidates,
    prompt_entropy,
    prompt_key,
    prompt_position_mask,
    rollouts_saved,
    token_entropy,
)
from efficient_rlvr.selection.history import EASY, HARD, MIXED

ALL_RIGHT = [1.0, 1.0, 1.0, 1.0]
ALL_WRONG = [0.0, 0.0, 0.0, 0.0]
SOME_RIGHT = [1.0, 0.0, 1.0, 0.0]


def visit(sampler: HistorySampler, key: str, *groups: list[float]) -> None:
    for group in groups:
        sampler.observe([key], [group])


def cands(*keys: str) -> list[Candidate]:
    return [Candidate(key=k, index=i) for i, k in enumerate(keys)]


def torch_roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# ------------------------------------------------------------------------------------------------------------------
# Stage 1: the GRESO rule
def test_skip_probability_easy_rule_z_0_1_3():
    s = HistorySampler()  # p_easy = p_hard = 0.5, p_floor = 0.01
    assert s.skip_probability("unseen") == 0.0  # z = 0 never skips
    visit(s, "a", ALL_RIGHT)
    assert s.record("a") == (EASY, 1)
    assert s.skip_probability("a") == pytest.approx(0.5)  # 1 - 0.5**1
    visit(s, "a", ALL_RIGHT, ALL_RIGHT)
    assert s.record("a") == (EASY, 3)
    assert s.skip_probability("a") == pytest.approx(0.875)  # 1 - 0.5**3
    visit(s, "a", SOME_RIGHT)  # a mixed visit resets the run: behaves as unseen
    assert s.record("a") == (MIXED, 0)
    assert s.skip_probability("a") == 0.0


def test_skip_probability_hard_rule_z_1_3_and_only_after_a_hard_visit():
    s = HistorySampler()
    s.p_easy, s.p_hard = 0.5, 0.8  # distinct values show which rule applies
    visit(s, "h", ALL_WRONG)
    assert s.skip_probability("h") == pytest.approx(1 - 0.8)
    visit(s, "h", ALL_WRONG, ALL_WRONG)
    assert s.record("h") == (HARD, 3)
    assert s.skip_probability("h") == pytest.approx(1 - 0.8**3)  # 0.488
    # hard, hard, easy: last visit easy -> easy rule with z = 1; the two hard visits do not count
    visit(s, "x", ALL_WRONG, ALL_WRONG, ALL_RIGHT)
    assert s.skip_probability("x") == pytest.approx(1 - 0.5)
    # easy, easy, hard: hard rule with z = 1
    visit(s, "y", ALL_RIGHT, ALL_RIGHT, ALL_WRONG)
    assert s.skip_probability("y") == pytest.approx(1 - 0.8)
    # hard, mixed: last visit not hard -> no hard rule
    visit(s, "z", ALL_WRONG, SOME_RIGHT)
    assert s.skip_probability("z") == 0.0


def test_p_floor_caps_the_skip_probability():
    s = HistorySampler()
    visit(s, "a", *[ALL_RIGHT] * 10)
    assert s.skip_probability("a") == pytest.approx(0.99)  # 0.5**10 = 0.000977 < 0.01 -> 1 - 0.01
    visit(s, "b", *[ALL_RIGHT] * 6)
    assert s.skip_probability("b") == pytest.approx(1 - 0.5**6)  # 0.015625 > 0.01: floor not reached
    s0 = HistorySampler(p_floor=0.0)
    visit(s0, "a", *[ALL_RIGHT] * 10)
    assert s0.skip_probability("a") == pytest.approx(1 - 0.5**10)


def test_custom_thresholds_for_other_reward_scales():
    # GRESO's 0 / 0.1 / 1 scale: easy if mean >= 0.98, hard if mean <= 0.11
    s = HistorySampler(easy_threshold=0.98, hard_threshold=0.11)
    visit(s, "wrong_format_ok", [0.1, 0.1, 0.1, 0.1])
    visit(s, "almost", [1.0, 1.0, 1.0, 0.1])  # mean 0.775: mixed
    assert s.record("wrong_format_ok") == (HARD, 1)
    assert s.record("almost") == (MIXED, 0)


def test_observe_treats_none_and_nan_rewards_as_unknown():
    """SPEC: a visit is classified on all G rollouts; with unknown ones it is mixed if the known rewards differ, else
    unknown (not recorded, not counted). tests/test_selection_fidelity.py covers the pruning cases in detail."""
    s = HistorySampler(adapt_warmup_steps=0)
    s.observe(["a", "b", "c"], [[1.0, None, float("nan"), 1.0], [None, float("nan")], [0.0, None, 1.0]])
    assert s.record("a") == (MIXED, 0)  # two unknown rewards could be wrong: unknown, not easy
    assert s.record("b") == (MIXED, 0)  # no valid reward: not a visit
    assert s.record("c") == (MIXED, 0)  # known rewards differ: mixed
    rewards = torch.tensor([[0.0, float("nan"), 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])  # [N=3, G=3]
    s.observe(["d", "a", "e"], rewards)
    assert s.record("d") == (MIXED, 0)  # unknown
    assert s.record("a") == (EASY, 1)
    assert s.record("e") == (HARD, 1)
    s.on_step_end()
    # the adaptation saw 3 classified groups ("b" is no visit, the two unknown ones do not count): 1 easy, 1 hard
    assert s.metrics()["selection/history/easy_ratio"] == pytest.approx(1 / 3)
    assert s.metrics()["selection/history/hard_ratio"] == pytest.approx(1 / 3)
    assert s.metrics()["selection/history/unknown_total"] == 2
    with pytest.raises(ValueError, match="same length"):
        s.observe(["a"], [ALL_RIGHT, ALL_RIGHT])


def test_select_skips_at_the_stated_rate_and_unseen_prompts_use_no_randomness():
    s = HistorySampler(seed=3)
    visit(s, "easy3", ALL_RIGHT, ALL_RIGHT, ALL_RIGHT)  # skip 0.875
    visit(s, "hard1", ALL_WRONG)  # skip 0.5
    rng_before = s.state_dict()["rng"]
    assert len(s.select(cands(*["new"] * 50))) == 50
    assert s.state_dict()["rng"] == rng_before  # probability-0 candidates consume no draw
    kept = s.select(cands(*["easy3"] * 4000, *["hard1"] * 4000))
    kept_easy = sum(c.key == "easy3" for c in kept) / 4000
    kept_hard = sum(c.key == "hard1" for c in kept) / 4000
    assert kept_easy == pytest.approx(0.125, abs=0.02)
    assert kept_hard == pytest.approx(0.5, abs=0.03)
    s.on_step_end()
    m = s.metrics()
    assert m["selection/history/candidates"] == 8050
    assert m["selection/history/kept"] == len(kept) + 50
    assert m["selection/history/skipped_easy"] == 4000 - round(kept_easy * 4000)
    assert m["selection/history/skipped_hard"] == 4000 - round(kept_hard * 4000)
    assert m["selection/history/skipped_total"] == 8050 - m["selection/history/kept"]


# ------------------------------------------------------------------------------------------------------------------
# Stage 1: adaptive p
def test_target_split_one_third_easy_two_thirds_hard():
    s = HistorySampler()
    assert s.target_easy == pytest.approx(0.25 / 3)
    assert s.target_hard == pytest.approx(0.25 * 2 / 3)


def test_p_adaptation_steps():
    s = HistorySampler(adapt_warmup_steps=0)  # adapt from the first step (the default waits for a revisit)
    # 12 groups: 2 easy (ratio 0.167 >= 0.083 -> p_easy down), 1 hard (0.083 < 0.167 -> p_hard up)
    s.observe([f"k{i}" for i in range(12)], [ALL_RIGHT] * 2 + [ALL_WRONG] + [SOME_RIGHT] * 9)
    s.on_step_end()
    assert (s.p_easy, s.p_hard) == (pytest.approx(0.49), pytest.approx(0.51))
    s.on_step_end()  # no group observed since: no information, p unchanged
    assert (s.p_easy, s.p_hard) == (pytest.approx(0.49), pytest.approx(0.51))
    # counts were reset: this step sees only mixed groups -> both ratios 0 < target -> both p up
    s.observe(["m0", "m1"], [SOME_RIGHT, SOME_RIGHT])
    s.on_step_end()
    assert (s.p_easy, s.p_hard) == (pytest.approx(0.50), pytest.approx(0.52))
    # ratio exactly at the target counts as ">=": target_easy = 0.4 * 0.25 = 0.1, 1 easy group of 10
    t = HistorySampler(target_zero_variance=0.4, easy_target_share=0.25, adapt_warmup_steps=0)
    t.observe([f"k{i}" for i in range(10)], [ALL_RIGHT] + [SOME_RIGHT] * 9)
    t.on_step_end()
    assert t.p_easy == pytest.approx(0.49)


def test_p_clamps_at_both_ends():
    low = HistorySampler(p_init=0.06, adapt_warmup_steps=0)
    for _ in range(3):  # every group easy and hard targets missed: p_easy 0.06 -> 0.05 -> 0.05 -> 0.05
        low.observe(["a"], [ALL_RIGHT])
        low.on_step_end()
    assert low.p_easy == pytest.approx(0.05)
    assert low.p_hard == pytest.approx(0.09)  # no hard group: up by 0.01 each step
    high = HistorySampler(p_init=0.94, adapt_warmup_steps=0)
    for _ in range(3):
        high.observe(["a"], [SOME_RIGHT])
        high.on_step_end()
    assert high.p_easy == pytest.approx(0.95)
    assert high.p_hard == pytest.approx(0.95)


def test_adapt_warmup_steps_delays_adaptation():
    s = HistorySampler(adapt_warmup_steps=2)
    for expected in (0.5, 0.5, 0.49):
        s.observe(["a"], [ALL_RIGHT])
        s.on_step_end()
        assert s.p_easy == pytest.approx(expected)


# ------------------------------------------------------------------------------------------------------------------
# Stage 1: memory and resume
def test_history_record_is_constant_size_per_prompt():
    s = HistorySampler()
    for _ in range(1000):
        visit(s, "a", ALL_RIGHT)
    assert s.record("a") == (EASY, 1000)
    assert s.num_records == 1
    assert s.state_dict()["records"] == {"a": (EASY, 1000)}  # two ints, whatever the number of visits
    visit(s, "b", ALL_WRONG)
    visit(s, "a", SOME_RIGHT)  # mixed: the record is dropped (it would behave as unseen)
    assert s.num_records == 1 and s.metrics()["selection/history/tracked_prompts"] == 1


def test_history_memory_is_bounded_least_recently_updated_evicted_first():
    s = HistorySampler(max_records=2)
    visit(s, "a", ALL_RIGHT)
    visit(s, "b", ALL_WRONG)
    visit(s, "a", ALL_RIGHT)  # a is now the most recently updated: (EASY, 2)
    visit(s, "c", ALL_WRONG)  # third record: b (least recently updated) is evicted
    assert s.num_records == 2
    assert s.record("b") == (MIXED, 0) and s.skip_probability("b") == 0.0  # evicted = unseen, always a candidate
    assert s.record("a") == (EASY, 2) and s.record("c") == (HARD, 1)
    assert s.metrics()["selection/history/evicted_total"] == 1
    for i in range(100):
        visit(s, f"k{i}", ALL_WRONG)
    assert s.num_records == 2 and s.metrics()["selection/history/evicted_total"] == 101
    assert list(s.state_dict()["records"]) == ["k98", "k99"]
    # the eviction order survives a checkpoint round trip
    restored = HistorySampler(max_records=2)
    restored.load_state_dict(torch_roundtrip(s.state_dict()))
    visit(restored, "k98", ALL_WRONG)
    visit(restored, "new", ALL_WRONG)  # evicts k99, not k98
    assert list(restored.state_dict()["records"]) == ["k98", "new"]
    assert restored.record("k98") == (HARD, 2)


def _reward_pattern(row: int, step: int) -> list[float]:
    """Rows divisible by 3 are always solved; the others are unsolved except every fourth step."""
    if row % 3 == 0:
        return ALL_RIGHT
    return SOME_RIGHT if (row + step) % 4 == 0 else ALL_WRONG


def _run_steps(sampler: HistorySampler, steps: int, start: int) -> list[list[str]]:
    """Deterministic training-like loop: select from 40 keys, observe rewards that depend on key and step."""
    picks = []
    for step in range(start, start + steps):
        kept = sampler.select(cands(*[f"p{i}" for i in range(40)]))
        picks.append([c.key for c in kept])
        groups = [_reward_pattern(c.index, step) for c in kept]
        sampler.observe([c.key for c in kept], groups)
        sampler.on_step_end()
    return picks


def test_history_resume_repeats_the_next_picks_exactly():
    reference = HistorySampler(seed=11)
    _run_steps(reference, 5, start=0)
    state = torch_roundtrip(reference.state_dict())
    expected = _run_steps(reference, 6, start=5)
    restored = HistorySampler(seed=999)  # the seed is overwritten by the saved generator state
    restored.load_state_dict(state)
    assert _run_steps(restored, 6, start=5) == expected
    assert restored.metrics() == reference.metrics()
    assert any(len(p) < 40 for p in expected)  # the comparison covers random skips, not only keep-all steps


# ------------------------------------------------------------------------------------------------------------------
# Stage 2: prompt entropy
def test_token_entropy_hand_values():
    v = 64
    assert token_entropy(torch.zeros(v)).item() == pytest.approx(math.log(v), abs=1e-6)  # uniform: log V
    two = torch.full((v,), float("-inf"))
    two[:2] = 0.0
    assert token_entropy(two).item() == pytest.approx(math.log(2), abs=1e-6)  # -inf logits: p = 0 terms vanish
    peaked = torch.zeros(v)
    peaked[0] = 100.0
    assert token_entropy(peaked).item() == pytest.approx(0.0, abs=1e-6)
    q = torch.tensor([0.0, math.log(3.0)])  # p = [1/4, 3/4]
    assert token_entropy(q).item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), abs=1e-6)
    p2 = torch.tensor([1.0, math.sqrt(3.0)]) / (1 + math.sqrt(3.0))  # temperature 2: p proportional to [1, 3**0.5]
    expected = -(p2 * p2.log()).sum().item()
    assert token_entropy(q, temperature=2.0).item() == pytest.approx(expected, abs=1e-6)
    assert token_entropy(torch.zeros(2, 3, v, dtype=torch.bfloat16)).dtype == torch.float32


def test_prompt_position_mask_all_and_last_k_with_left_and_right_padding():
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert prompt_position_mask(left, "all").tolist() == left.bool().tolist()
    assert prompt_position_mask(left, 2).int().tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 1, 1]]
    right = torch.tensor([[1, 1, 1, 0, 0]])
    assert prompt_position_mask(right, 2).int().tolist() == [[0, 1, 1, 0, 0]]
    assert prompt_position_mask(left, 10).tolist() == left.bool().tolist()  # k > n: all n positions
    for bad in (0, -1, "last", 1.5, True):
        with pytest.raises(ValueError, match="positions"):
            prompt_position_mask(left, bad)


@pytest.fixture(scope="module")
def tiny_model() -> Qwen2ForCausalLM:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # sharpen the random model so that entropies differ clearly between positions
        model.lm_head.weight.mul_(20.0)
    return model.eval()


def pad_left(prompts: list[list[int]], width: int, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


PROMPTS = [[5, 9, 17], [3, 8, 13, 21, 34], [60, 2, 7, 7, 7, 40, 1]]


def reference_entropies(model: Qwen2ForCausalLM, prompt: list[int]) -> torch.Tensor:
    """Per-position next-token entropies of one unpadded prompt, from the logits directly: `[n]`."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0].double()  # [n, V]
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).float()


def test_prompt_entropy_uniform_model_gives_log_v(tiny_model):
    model = Qwen2ForCausalLM(tiny_model.config)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # logits 0 everywhere: uniform over V at every position
    ids, mask = pad_left(PROMPTS, 8)
    for positions in ("all", 1, 3):
        h = prompt_entropy(model, ids, mask, positions=positions)
        assert h.shape == (3,) and h.dtype == torch.float32
        torch.testing.assert_close(h, torch.full((3,), math.log(64)), atol=1e-6, rtol=0)


def test_prompt_entropy_all_vs_last_k_matches_the_hand_reference(tiny_model):
    refs = [reference_entropies(tiny_model, p) for p in PROMPTS]
    assert max(r.max() - r.min() for r in refs) > 0.1  # positions differ, so "all" and "last k" are distinguishable
    ids, mask = pad_left(PROMPTS, 9)
    h_all = prompt_entropy(tiny_model, ids, mask, positions="all")
    h_last1 = prompt_entropy(tiny_model, ids, mask, positions=1)
    h_last4 = prompt_entropy(tiny_model, ids, mask, positions=4)
    torch.testing.assert_close(h_all, torch.stack([r.mean() for r in refs]), atol=1e-5, rtol=0)
    torch.testing.assert_close(h_last1, torch.stack([r[-1] for r in refs]), atol=1e-5, rtol=0)
    # last 4: the 3-token prompt has only 3 positions, so it averages all of them
    torch.testing.assert_close(h_last4, torch.stack([r[-4:].mean() for r in refs]), atol=1e-5, rtol=0)
    assert not torch.allclose(h_all, h_last1, atol=1e-3)


def test_prompt_entropy_is_padding_invariant(tiny_model):
    prompt = PROMPTS[1]
    alone = prompt_entropy(tiny_model, torch.tensor([prompt]), torch.ones(1, 5, dtype=torch.long))
    ids, mask = pad_left([prompt, PROMPTS[2]], 11, pad=33)  # 6 pads (a real token id, masked out)
    padded = prompt_entropy(tiny_model, ids, mask)
    torch.testing.assert_close(padded[0], alone[0], atol=1e-5, rtol=0)
    right_ids = torch.tensor([prompt + [0, 0, 0]])
    right_mask = torch.tensor([[1] * 5 + [0] * 3])
    for positions in ("all", 2):
        a = prompt_entropy(tiny_model, torch.tensor([prompt]), torch.ones(1, 5, dtype=torch.long), positions)
        r = prompt_entropy(tiny_model, right_ids, right_mask, positions)
        torch.testing.assert_close(r, a, atol=1e-5, rtol=0)
    # micro-batching changes nothing, and the model's training flag is restored
    ids, mask = pad_left(PROMPTS, 7)
    tiny_model.train()
    one_by_one = prompt_entropy(tiny_model, ids, mask, batch_size=1)
    assert tiny_model.training
    tiny_model.eval()
    torch.testing.assert_close(one_by_one, prompt_entropy(tiny_model, ids, mask), atol=1e-5, rtol=0)


def test_prompt_entropy_rejects_bad_inputs(tiny_model):
    ids, mask = pad_left(PROMPTS, 7)
    with pytest.raises(ValueError, match="batch_size"):
        prompt_entropy(tiny_model, ids, mask, batch_size=0)
    with pytest.raises(ValueError, match="temperature"):
        prompt_entropy(tiny_model, ids, mask, temperature=0.0)
    with pytest.raises(ValueError, match="at least one real token"):
        prompt_entropy(tiny_model, ids, torch.cat([mask[:2], torch.zeros(1, 7, dtype=torch.long)]))


# ------------------------------------------------------------------------------------------------------------------
# Stage 2: the median filter
def test_median_filter_even_odd_and_ties():
    f = EntropyMedianFilter()
    c4 = cands("a", "b", "c", "d")
    assert [c.key for c in f.select_with_entropies(c4, [4.0, 1.0, 3.0, 2.0])] == ["a", "c"]  # median 2.5
    m = f.metrics()
    assert m["selection/entropy/threshold"] == pytest.approx(2.5)
    assert m["selection/entropy/kept_mean"] == pytest.approx(3.5)
    assert m["selection/entropy/dropped_mean"] == pytest.approx(1.5)
    # ties at the median are all kept: median of [1, 2, 2, 3] is 2 -> 3 of 4 kept
    assert [c.key for c in f.select_with_entropies(c4, [2.0, 1.0, 3.0, 2.0])] == ["a", "c", "d"]
    assert [c.key for c in f.select_with_entropies(c4, [5.0] * 4)] == ["a", "b", "c", "d"]
    assert "selection/entropy/dropped_mean" not in f.metrics()
    # odd pool: median is the middle value and is kept
    assert [c.key for c in f.select_with_entropies(cands("a", "b", "c"), [3.0, 1.0, 2.0])] == ["a", "c"]
    # keep_ratio 0.25 over 1..8: 0.75 quantile = 6 + 0.25 * (7 - 6) = 6.25 -> keep 7 and 8
    q = EntropyMedianFilter(keep_ratio=0.25)
    kept = q.select_with_entropies(cands(*"abcdefgh"), [1.0, 2, 3, 4, 5, 6, 7, 8])
    assert [c.key for c in kept] == ["g", "h"]


def test_fixed_count_mode_keeps_exactly_n_with_ties_broken_by_order():
    f = EntropyMedianFilter(n_keep=2)
    kept = f.select_with_entropies(cands("a", "b", "c", "d"), [1.0, 3.0, 3.0, 3.0])
    assert [c.key for c in kept] == ["b", "c"]
    assert f.metrics()["selection/entropy/threshold"] == 3.0
    kept = f.select_with_entropies(cands("a", "b", "c", "d"), [0.5, 0.1, 0.9, 0.7])
    assert [c.key for c in kept] == ["c", "d"]  # returned in input order
    assert len(f.select_with_entropies(cands("a"), [0.3])) == 1  # fewer candidates than n_keep: all


def test_filter_times_the_entropy_callable_and_validates():
    calls = []

    def slow_entropy(candidates: list[Candidate]) -> torch.Tensor:
        calls.append(len(candidates))
        time.sleep(0.05)
        return torch.tensor([float(c.index) for c in candidates])

    f = EntropyMedianFilter(slow_entropy)
    assert [c.index for c in f.select(cands(*"abcd"))] == [2, 3]
    assert calls == [4]
    assert f.metrics()["selection/entropy/seconds"] >= 0.05
    assert f.select([]) == [] and calls == [4]  # an empty pool needs no forward pass
    with pytest.raises(ValueError, match="finite"):
        f.select_with_entropies(cands("a", "b"), [1.0, float("nan")])
    with pytest.raises(ValueError, match="entropies for"):
        f.select_with_entropies(cands("a", "b"), [1.0])
    with pytest.raises(ValueError, match="entropy_fn"):
        EntropyMedianFilter().select(cands("a"))


# ------------------------------------------------------------------------------------------------------------------
# Chain, dynamic gate, pool
def test_chain_runs_stage1_then_stage2_and_merges_metrics():
    history = HistorySampler(p_floor=0.0, p_init=0.05)
    visit(history, "k0", *[ALL_RIGHT] * 30)  # skip probability 1 - 0.05**30 == 1.0 in float64
    entropy = EntropyMedianFilter(lambda cs: [float(c.index) for c in cs])
    chain = SelectorChain([history, entropy], num_generations=8)
    kept = chain.select(cands(*[f"k{i}" for i in range(9)]))
    # stage 1 drops k0; stage 2 keeps indices >= median of 1..8 (4.5)
    assert [c.index for c in kept] == [5, 6, 7, 8]
    chain.observe([c.key for c in kept], [ALL_WRONG] * 4)
    assert history.record("k5") == (HARD, 1)
    chain.on_step_end()
    m = chain.metrics()
    assert m["selection/history/skipped_easy"] == 1 and m["selection/entropy/kept"] == 4
    assert m["selection/candidates"] == 9 and m["selection/selected"] == 4
    assert m["selection/rejected_total"] == 5
    assert m["selection/rollouts_saved_total"] == 40  # 5 prompts x 8 rollouts
    restored = SelectorChain([HistorySampler(), EntropyMedianFilter(entropy.entropy_fn)], num_generations=8)
    restored.load_state_dict(torch_roundtrip(chain.state_dict()))
    assert restored.metrics() == m
    with pytest.raises(ValueError, match="same metric keys"):
        SelectorChain([HistorySampler(), HistorySampler()]).metrics()


def test_rollouts_saved():
    assert rollouts_saved(3, 8) == 24
    assert rollouts_saved(0, 16) == 0
    with pytest.raises(ValueError, match="num_generations"):
        rollouts_saved(3, 0)


def test_zero_variance_gate():
    gate = ZeroVarianceGate()
    rewards = [ALL_RIGHT, SOME_RIGHT, ALL_WRONG, [0.5, float("nan"), 0.5, None], [1.0, None]]
    assert gate.keep_mask(rewards).tolist() == [False, True, False, False, False]  # the last has one valid reward
    t = torch.tensor([[0.0, 1.0, float("nan")], [0.3, 0.3, 0.3]])  # [N=2, G=3]
    assert gate.keep_mask(t).tolist() == [True, False]
    assert gate.refill_needed(kept_groups=2, target_groups=4) == 2
    assert gate.refill_needed(kept_groups=4, target_groups=4) == 0
    gate.on_step_end()
    m = gate.metrics()
    assert m["selection/dynamic/groups"] == 7 and m["selection/dynamic/groups_dropped"] == 5
    assert m["selection/dynamic/refills"] == 1
    tol = ZeroVarianceGate(tolerance=0.1)
    assert tol.keep_mask([[0.5, 0.55], [0.0, 1.0]]).tolist() == [False, True]
    restored = ZeroVarianceGate()
    restored.load_state_dict(torch_roundtrip(gate.state_dict()))
    assert restored.metrics() == m


def test_pool_is_deterministic_and_epoch_wise_without_replacement():
    a, b, other = CandidatePool(10, seed=7), CandidatePool(10, seed=7), CandidatePool(10, seed=8)
    draws = [a.draw(4), a.draw(4), a.draw(4)]
    assert draws == [b.draw(4), b.draw(4), b.draw(4)]  # same seed, same sequence (every process agrees)
    assert [other.draw(4), other.draw(4), other.draw(4)] != draws
    flat = sum(draws, [])
    assert sorted(flat[:10]) == list(range(10))  # epoch 0: each index exactly once
    assert flat[:10] == a.permutation(0).tolist()
    assert flat[10:] == a.permutation(1)[:2].tolist()  # the third draw crossed into epoch 1
    assert a.permutation(0).tolist() != a.permutation(1).tolist()
    assert a.epoch == 1 and a.metrics()["selection/pool/epoch"] == pytest.approx(1.2)
    assert a.draw(0) == []


def test_pool_resume_repeats_the_next_draws():
    pool = CandidatePool(13, seed=2)
    pool.draw(7)
    state = torch_roundtrip(pool.state_dict())
    expected = [pool.draw(6), pool.draw(9)]
    restored = CandidatePool(13, seed=2)
    restored.load_state_dict(state)
    assert [restored.draw(6), restored.draw(9)] == expected
    with pytest.raises(ValueError, match="seed"):
        CandidatePool(13, seed=3).load_state_dict(state)


def test_gather_candidates_fills_the_target_and_reports_a_dry_pool():
    history = HistorySampler(p_floor=0.0, p_init=0.05)
    for i in range(0, 10, 2):  # even rows: skipped with probability 1.0
        visit(history, f"row{i}", *[ALL_RIGHT] * 30)
    pool = CandidatePool(10, seed=0)
    make = lambda i: Candidate(key=f"row{i}", index=i)  # noqa: E731
    got = gather_candidates(pool, history, make, target=5)
    assert sorted(c.index for c in got.candidates) == [1, 3, 5, 7, 9]
    assert not got.dry and got.topped_up == 0 and got.drawn >= 5
    # every row now skipped for sure: a whole epoch's worth of draws yields nothing -> dry, topped up
    for i in range(1, 10, 2):
        visit(history, f"row{i}", *[ALL_RIGHT] * 30)
    got = gather_candidates(pool, history, make, target=4)
    assert got.dry and got.drawn == 10 and got.topped_up == 4 and len(got.candidates) == 4
    assert gather_candidates(pool, history, make, target=4, top_up=False).candidates == []
    pool.on_step_end()
    assert pool.metrics()["selection/pool/dry"] == 2 and pool.metrics()["selection/pool/dry_total"] == 2


# ------------------------------------------------------------------------------------------------------------------
# Validation and keys
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"easy_threshold": 0.0, "hard_threshold": 0.0}, "hard_threshold"),
        ({"p_min": 0.0}, "p_min"),
        ({"p_init": 0.99}, "p_init"),
        ({"p_floor": 1.0}, "p_floor"),
        ({"p_step": 0.0}, "p_step"),
        ({"target_zero_variance": 1.5}, "target_zero_variance"),
        ({"easy_target_share": -0.1}, "easy_target_share"),
        ({"adapt_warmup_steps": -1}, "adapt_warmup_steps"),
        ({"seed": -1}, "seed"),
        ({"max_records": 0}, "max_records"),
    ],
)
def test_history_sampler_validates_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        HistorySampler(**kwargs)


def test_other_constructors_validate_arguments():
    with pytest.raises(ValueError, match="keep_ratio"):
        EntropyMedianFilter(keep_ratio=0.0)
    with pytest.raises(ValueError, match="n_keep"):
        EntropyMedianFilter(n_keep=0)
    with pytest.raises(ValueError, match="tolerance"):
        ZeroVarianceGate(tolerance=-1.0)
    with pytest.raises(ValueError, match="dataset_size"):
        CandidatePool(0)
    with pytest.raises(ValueError, match="num_generations"):
        SelectorChain([HistorySampler()], num_generations=0)


def test_prompt_key_is_stable_and_distinguishes_prompts():
    chat = [{"role": "user", "content": "2+3?"}]
    assert prompt_key("2+3?") == prompt_key("2+3?") and len(prompt_key("2+3?")) == 32
    assert prompt_key("2+3?") != prompt_key("2+4?")
    assert prompt_key(chat) == prompt_key([{"content": "2+3?", "role": "user"}])  # key order does not matter
    assert prompt_key(chat) != prompt_key("2+3?")


# ---------------------------------------------------------------------------------------------------------------
# The history skip checks that it pays (issue 15): it stands down when skip-eligible prompts are no likelier flat
def _history_epochs(persistent: bool, epochs: int = 8, prompts: int = 64) -> HistorySampler:
    """Epochs over `prompts` keys, G = 4. Persistent world: a prompt's class never changes (flat prompts stay flat).
    Anti-persistent world: a flat visit is always followed by a mixed one (the history predicts the opposite)."""
    sampler = HistorySampler(p_init=0.5, p_min=0.5, p_max=0.5, min_lift=0.0, seed=0, group_size=4)
    gen = torch.Generator().manual_seed(0)
    last_flat: dict[str, bool] = {}
    for _ in range(epochs):
        kept = sampler.select(cands(*[f"p{i}" for i in range(prompts)]))
        keys, groups = [], []
        for c in kept:
            if persistent:
                flat = int(c.key[1:]) % 2 == 0
            else:
                flat = not last_flat.get(c.key, False) and bool(torch.rand(1, generator=gen) < 0.5)
            last_flat[c.key] = flat
            keys.append(c.key)
            groups.append([1.0, 1.0, 1.0, 1.0] if flat else [1.0, 0.0, 1.0, 0.0])
        sampler.observe(keys, groups)
        sampler.on_step_end()
    return sampler


def test_history_skip_stands_down_when_eligible_prompts_are_no_likelier_flat():
    sampler = _history_epochs(persistent=False)
    metrics = sampler.metrics()
    assert metrics["selection/history/skip_precision"] == 0.0  # explored eligible prompts all came back mixed
    assert metrics["selection/history/fresh_flat_rate"] > 0.3
    assert sampler.standing_down and metrics["selection/history/standing_down"] == 1.0
    before = sampler.counts()
    kept = sampler.select(cands(*[f"p{i}" for i in range(64)]))
    assert len(kept) == 64 and sampler.counts()["skipped_easy"] == before["skipped_easy"]  # nothing skipped
    restored = HistorySampler(p_init=0.5, p_min=0.5, p_max=0.5, min_lift=0.0, seed=0, group_size=4)
    restored.load_state_dict(sampler.state_dict())
    assert restored.standing_down and restored.lift == sampler.lift


def test_history_skip_keeps_skipping_when_it_pays():
    sampler = _history_epochs(persistent=True)
    metrics = sampler.metrics()
    assert metrics["selection/history/skip_precision"] == 1.0 and metrics["selection/history/lift"] > 0.4
    assert not sampler.standing_down and sampler.counts()["skipped_easy"] > 0
    with pytest.raises(ValueError, match="min_lift"):
        HistorySampler(min_lift=2.0)
