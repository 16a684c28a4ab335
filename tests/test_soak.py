"""Soak test: long synthetic streams through every component that keeps history; memory must stay flat.

For each component a stream of observations far longer than its cap runs under `tracemalloc`. The traced memory
after a warm-up that fills the structure and runs it past its cap (A) and after the whole stream (B) must agree: B - A <= 5% of A + 64 KiB
(a leak of one small object per observation would add megabytes). The structure's own size must sit at its cap and
the pickled `state_dict` must not grow either. Caps are scaled down here so the whole file runs in seconds;
`test_production_caps_are_finite_constants_wired_into_the_stages` checks the caps the trainer actually uses.

Streams: HistorySampler 51k distinct prompt keys (10x its cap) plus as many revisits over 400 select/observe/adapt
steps; HistoryPrior 50k keys (10x); CandidatePool 10 epochs of a 20k-row dataset plus 1M draws of a 1M-row one;
BinnedCalibrator 64k scored rollouts (16x its buffer) with 25 refits.
"""

from __future__ import annotations

import gc
import pickle
import random
import time
import tracemalloc
from collections.abc import Callable

import torch

from efficient_rlvr.budget.prior import HistoryPrior
from efficient_rlvr.pruning.calibration import BinnedCalibrator
from efficient_rlvr.selection.base import Candidate
from efficient_rlvr.selection.history import HistorySampler
from efficient_rlvr.selection.pool import CandidatePool

SLACK_BYTES = 64 * 1024
SLACK_SHARE = 0.05


def _key(i: int) -> str:
    return f"{i:032x}"  # the width of `prompt_key` (a 16-byte BLAKE2b hex digest)


def _traced(warm_up: Callable[[], None], rest: Callable[[], None]) -> tuple[int, int]:
    """Traced bytes alive after `warm_up()` and after `rest()` (allocations before the calls are not counted)."""
    gc.collect()
    tracemalloc.start()
    try:
        warm_up()
        gc.collect()
        after_warm_up = tracemalloc.get_traced_memory()[0]
        rest()
        gc.collect()
        after_stream = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return after_warm_up, after_stream


def _assert_flat(name: str, after_warm_up: int, after_stream: int) -> None:
    growth = after_stream - after_warm_up
    assert growth <= SLACK_SHARE * after_warm_up + SLACK_BYTES, (
        f"{name}: traced memory grew by {growth} bytes after warm-up ({after_warm_up} bytes)"
    )


def _state_bytes(component) -> int:
    return len(pickle.dumps(component.state_dict()))


def test_history_sampler_stays_at_its_cap():
    cap, batch = 5_000, 256
    history = HistorySampler(max_records=cap, seed=0, p_init=0.5)
    rng = random.Random(0)
    groups = ([1.0] * 4, [0.0] * 4, [1.0, 0.0, 0.0, 0.0])  # easy, hard, mixed
    step = [0]

    def run(steps: int) -> None:
        for _ in range(steps):
            s = step[0]
            fresh = [_key(s * batch + j) for j in range(batch // 2)]
            seen = [_key(rng.randrange(max(s * batch, 1))) for _ in range(batch // 2)]  # revisits (some evicted)
            kept = history.select([Candidate(k, 0) for k in fresh + seen])
            history.observe([c.key for c in kept], [groups[j % 3] for j in range(len(kept))])
            history.on_step_end()
            step[0] += 1

    sizes = {}

    def warm_up() -> None:
        run(80)  # 10k fresh keys (2x the cap): full, evicting, and past the dict's table resize
        sizes["warm"] = (history.num_records, _state_bytes(history))

    a, b = _traced(warm_up, lambda: run(320))  # 51k fresh keys (10x the cap) and as many revisits in all
    _assert_flat("HistorySampler", a, b)
    assert sizes["warm"][0] == history.num_records == cap
    assert _state_bytes(history) <= 1.05 * sizes["warm"][1]
    assert history.metrics()["selection/history/evicted_total"] > 20_000
    assert history.counts()["candidates"] == batch * 400


def test_history_prior_stays_at_its_cap():
    cap, batch = 5_000, 500
    prior = HistoryPrior(max_prompts=cap, ema=0.1)
    generator = torch.Generator().manual_seed(0)
    step = [0]

    def run(calls: int) -> None:
        for _ in range(calls):
            keys = [_key(step[0] * batch + j) for j in range(batch)]
            prior.prior(keys)
            prior.observe(keys, (torch.rand(batch, 4, generator=generator) > 0.5).float())  # [B, G]
            step[0] += 1

    sizes = {}

    def warm_up() -> None:
        run(20)  # 10k keys (2x the cap)
        sizes["warm"] = (len(prior), _state_bytes(prior))

    a, b = _traced(warm_up, lambda: run(80))  # 50k keys (10x the cap) in all
    _assert_flat("HistoryPrior", a, b)
    assert sizes["warm"][0] == len(prior) == cap
    assert _state_bytes(prior) <= 1.05 * sizes["warm"][1]
    assert prior.metrics()["budget/prior_evicted"] == 100 * batch - cap


def test_candidate_pool_keeps_one_permutation():
    pool = CandidatePool(20_000, seed=0)
    a, b = _traced(lambda: [pool.draw(1_000) for _ in range(40)], lambda: [pool.draw(1_000) for _ in range(160)])
    _assert_flat("CandidatePool", a, b)
    assert pool.epoch == 10
    # a million-row dataset over a million draws: one permutation (8 bytes a row), a state of a few counters
    big = CandidatePool(1_000_000, seed=0)
    state_size = _state_bytes(big)
    for _ in range(250):
        big.draw(4_096)
    assert big.metrics()["selection/pool/drawn_total"] == 1_024_000 and big.epoch == 1
    assert big._perm.nbytes == 8 * 1_000_000
    assert _state_bytes(big) <= state_size + 16


def test_calibrator_buffer_stays_at_its_size():
    buffer_size = 4_096
    calibrator = BinnedCalibrator(
        num_bins=128, buffer_size=buffer_size, kappa=0.5, p_min=0.25, p_max=0.75, lam=0.5, rho=0.5, cold_start_steps=0
    )
    generator = torch.Generator().manual_seed(0)

    def run(steps: int) -> None:
        for s in range(steps):
            scores = torch.rand(256, generator=generator)  # [N]
            calibrator.observe(scores, scores > 0.5)
            if s % 10 == 0:
                calibrator.refit()

    sizes = {}

    def warm_up() -> None:
        run(30)  # 7.7k scored rollouts
        sizes["warm"] = _state_bytes(calibrator)

    a, b = _traced(warm_up, lambda: run(220))  # 64k in all (16x the buffer)
    _assert_flat("BinnedCalibrator", a, b)
    assert len(calibrator) == buffer_size
    assert _state_bytes(calibrator) <= 1.05 * sizes["warm"]
    assert calibrator.num_refits == 25


def test_production_caps_are_finite_constants_wired_into_the_stages(tiny_model_dir, chain_sum_splits, grpo_kwargs):
    """The stages build their history structures with the documented caps (a cap of None would be unbounded)."""
    from transformers import AutoModelForCausalLM

    from efficient_rlvr import EfficientGRPOConfig, EfficientGRPOTrainer
    from efficient_rlvr.budget.stage import HISTORY_MAX_PROMPTS
    from efficient_rlvr.pruning.stage import HISTORY_LENGTH
    from efficient_rlvr.rewards import verifier_reward
    from efficient_rlvr.run import load_tokenizer_for
    from efficient_rlvr.selection.stage import HISTORY_MAX_RECORDS

    trainer = EfficientGRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
        reward_funcs=[verifier_reward],
        args=EfficientGRPOConfig(**grpo_kwargs(selection_history=True, budget_baseline=True)),
        train_dataset=chain_sum_splits[0],
        processing_class=load_tokenizer_for(tiny_model_dir),
    )
    assert trainer.prompt_selection.history.max_records == HISTORY_MAX_RECORDS == 200_000
    budget = next(stage for stage in trainer.batch_stages if type(stage).__name__ == "BudgetStage")
    assert budget.prior.max_prompts == HISTORY_MAX_PROMPTS == 200_000
    assert HISTORY_LENGTH == 64  # PruningStage's per-step history deques (maxlen)


def test_history_sampler_eviction_is_least_recently_updated():
    """The key updated most recently survives a flood of new keys; the oldest untouched one is evicted."""
    cap = 1_000
    history = HistorySampler(max_records=cap, seed=0)
    start = time.perf_counter()
    history.observe([_key(i) for i in range(cap)], [[1.0] * 4] * cap)
    history.observe([_key(0)], [[1.0] * 4])  # touch key 0: now the most recent
    history.observe([_key(cap + i) for i in range(cap - 1)], [[0.0] * 4] * (cap - 1))
    assert history.record(_key(0))[1] == 2  # kept: two easy visits in a row
    assert history.record(_key(1))[1] == 0  # evicted: no record
    assert history.num_records == cap
    assert time.perf_counter() - start < 5.0
