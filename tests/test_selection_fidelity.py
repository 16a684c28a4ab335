"""SPEC section 1 fidelity of HIVE stage 1 and of DAPO dynamic sampling (issue 12, items 3-5).

- A visit is classified on all G rollouts: with pruned (NaN / None) rollouts it is "mixed" if its known rewards
  differ and otherwise unknown (not recorded, not counted in easy_ratio / hard_ratio).
- p_easy / p_hard adapt only once revisits happen (default: from the first step at which a revisited prompt is
  drawn; `selection_adapt_warmup_steps` = n: after n optimizer steps), and that state survives a resume.
- A dynamic-sampling refill never repeats a prompt already in the step (selected or refilled earlier).
"""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM
from trl import GRPOTrainer

from efficient_rlvr import EfficientGRPOConfig, EfficientGRPOTrainer
from efficient_rlvr.embedded import load_tokenizer
from efficient_rlvr.rewards import verifier_reward
from efficient_rlvr.selection import Candidate, CandidatePool, HistorySampler, gather_candidates, prompt_key
from efficient_rlvr.selection.history import EASY, HARD, MIXED
from efficient_rlvr.selection.stage import DynamicSamplingStage, PromptSelectionStage

NAN = float("nan")
ALL_RIGHT = [1.0, 1.0, 1.0, 1.0]
ALL_WRONG = [0.0, 0.0, 0.0, 0.0]
SOME_RIGHT = [1.0, 0.0, 1.0, 0.0]


def torch_roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def make_trainer(model_dir, train_ds, kwargs) -> EfficientGRPOTrainer:
    return EfficientGRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        reward_funcs=[verifier_reward],
        args=EfficientGRPOConfig(**kwargs),
        train_dataset=train_ds,
        processing_class=load_tokenizer(model_dir),
    )


def generation_rows(dataset, indices, G):
    """A generation batch as TRL's repeat sampler delivers it: each row G times in a row."""
    return [dict(dataset[i]) for i in indices for _ in range(G)]


# ------------------------------------------------------------------------------------------------------------------
# Item 3: classification of visits with pruned rollouts
def test_a_group_whose_correct_rollouts_were_pruned_is_not_hard():
    s = HistorySampler(adapt_warmup_steps=0)
    groups = torch.tensor([[0.0, 0.0, NAN, NAN], [1.0, 1.0, NAN, NAN], [1.0, NAN, 0.0, NAN]])  # [3, G=4]
    s.observe(["pruned_right", "pruned_wrong", "mixed_known"], groups)
    # "pruned_right" lost its correct rollouts, "pruned_wrong" its wrong ones. Before the fix they were classified on
    # the survivors: (HARD, 1) and (EASY, 1).
    assert s.record("pruned_right") == (MIXED, 0)  # unknown: not recorded
    assert s.record("pruned_wrong") == (MIXED, 0)
    assert s.record("mixed_known") == (MIXED, 0)  # known rewards differ: mixed whatever the pruned ones were
    assert s.num_records == 0
    # an unknown visit leaves an existing record unchanged (a run of 1 stays 1), a mixed one drops it
    s.observe(["h", "e", "x"], [ALL_WRONG, ALL_RIGHT, ALL_WRONG])
    s.observe(["h", "e", "x"], [[0.0, None, None, None], [1.0, 1.0, 1.0, NAN], [None, 1.0, 0.0, None]])
    assert (s.record("h"), s.record("e"), s.record("x")) == ((HARD, 1), (EASY, 1), (MIXED, 0))
    # a complete group is classified on its mean as before
    s.observe(["h"], [ALL_WRONG])
    assert s.record("h") == (HARD, 2)


def test_unknown_visits_are_not_counted_in_the_ratios():
    s = HistorySampler(adapt_warmup_steps=0)
    # 4 groups: unknown (only wrong survivors), unknown (only right survivors), mixed, hard
    s.observe(
        ["u1", "u2", "m", "h"], torch.tensor([[0.0, NAN, 0.0, NAN], [NAN, 1.0, NAN, 1.0], SOME_RIGHT, ALL_WRONG])
    )
    s.on_step_end()
    m = s.metrics()
    # Before the fix: easy 1/4, hard 2/4. Now over the 2 classified groups: easy 0/2, hard 1/2.
    assert m["selection/history/easy_ratio"] == pytest.approx(0.0)
    assert m["selection/history/hard_ratio"] == pytest.approx(0.5)
    assert m["selection/history/unknown_total"] == 2
    # ratios 0 < 0.083 (p_easy up) and 0.5 >= 0.167 (p_hard down)
    assert (s.p_easy, s.p_hard) == (pytest.approx(0.51), pytest.approx(0.49))


def test_group_size_marks_short_groups_as_incomplete():
    s = HistorySampler(group_size=4)
    s.observe(["short_wrong", "short_mixed", "full"], [[0.0, 0.0], [0.0, 1.0], ALL_WRONG])
    assert s.record("short_wrong") == (MIXED, 0)  # 2 of 4 known, equal: unknown
    assert s.record("short_mixed") == (MIXED, 0)
    assert s.record("full") == (HARD, 1)
    assert s.num_records == 1
    with pytest.raises(ValueError, match="group_size"):
        HistorySampler(group_size=0)


def test_prompt_selection_stage_does_not_record_pruned_groups_as_hard(tiny_model_dir, chain_sum_splits, grpo_kwargs):
    train_ds, _ = chain_sum_splits
    trainer = make_trainer(
        tiny_model_dir,
        train_ds,
        grpo_kwargs(per_device_train_batch_size=16, num_generations=4, selection_history=True),
    )
    stage = trainer.prompt_selection
    rows = generation_rows(train_ds, range(4), 4)
    stage.select(trainer, rows)
    keys = list(stage.last_keys)
    rewards = torch.tensor([0.0, NAN, 0.0, NAN] + [1.0, NAN, 0.0, NAN] + ALL_WRONG + ALL_RIGHT)  # [B * G]
    stage.observe(trainer, rows, rewards)
    # Before the fix the first group was recorded HARD (2 records + 1 = 3 tracked prompts).
    assert stage.history.record(keys[0]) == (MIXED, 0)
    assert stage.history.record(keys[1]) == (MIXED, 0)
    assert stage.history.record(keys[2]) == (HARD, 1)
    assert stage.history.record(keys[3]) == (EASY, 1)
    assert stage.metrics()["selection/tracked_prompts"] == 2


# ------------------------------------------------------------------------------------------------------------------
# Item 4: adapt p only once revisits happen
def _groups_of(index: int) -> list[float]:
    """28% zero-variance groups, fixed per prompt: 8% all-correct, 20% all-wrong, the rest mixed."""
    r = index % 25
    return ALL_RIGHT if r < 2 else ALL_WRONG if r < 7 else SOME_RIGHT


def _simulate(sampler: HistorySampler, pool: CandidatePool, steps: int, b: int = 8) -> list[tuple]:
    """`steps` optimizer steps of stage 1 on the pool: (picked keys, p_easy, p_hard, adapting) after each step."""
    out = []
    for _ in range(steps):
        got = gather_candidates(pool, sampler, lambda i: Candidate(key=f"p{i}", index=i), b)
        keys = [c.key for c in got.candidates]
        sampler.observe(keys, [_groups_of(c.index) for c in got.candidates])
        sampler.on_step_end()
        out.append((keys, sampler.p_easy, sampler.p_hard, sampler.metrics().get("selection/history/adapting")))
    return out


def test_p_stays_at_p_init_until_a_revisited_prompt_is_drawn():
    """200 prompts, 8 per step: epoch 1 is steps 1-25 and no prompt can be skipped in it. Before the fix both p
    adapted from step 1 (here 0.51 / 0.51 after step 1, 0.57 / 0.65 after step 25)."""
    sampler, pool = HistorySampler(seed=0), CandidatePool(200, seed=0)
    first_epoch = _simulate(sampler, pool, 25)
    for step, (_, p_easy, p_hard, adapting) in enumerate(first_epoch, start=1):
        assert (p_easy, p_hard, adapting) == (0.5, 0.5, 0.0), f"step {step}"
    # a prompt with one all-correct visit is skipped with GRESO's 1 - 0.5 = 50% at the start of epoch 2
    easy_once = next(f"p{i}" for i in range(200) if _groups_of(i) is ALL_RIGHT)
    assert sampler.skip_probability(easy_once) == pytest.approx(0.5)
    ((_, p_easy, p_hard, adapting),) = _simulate(sampler, pool, 1)  # step 26 draws epoch 2: revisits
    assert adapting == 1.0
    assert abs(p_easy - 0.5) == pytest.approx(0.01) and abs(p_hard - 0.5) == pytest.approx(0.01)
    for *_, adapting in _simulate(sampler, pool, 5):  # once started, adaptation goes on
        assert adapting == 1.0


def test_a_revisit_seen_only_by_observe_starts_adaptation():
    """Refill groups reach the history through `observe` alone (no `select`): a revisit there counts too."""
    s = HistorySampler()
    s.observe(["a"], [ALL_RIGHT])
    s.on_step_end()
    assert s.p_easy == 0.5 and s.metrics()["selection/history/adapting"] == 0.0
    s.observe(["a"], [ALL_RIGHT])
    s.on_step_end()
    assert s.p_easy == pytest.approx(0.49) and s.metrics()["selection/history/adapting"] == 1.0


def test_integer_warmup_adapts_after_that_many_steps_without_revisits():
    s = HistorySampler(adapt_warmup_steps=3)
    seen = []
    for step in range(5):
        s.observe([f"fresh{step}"], [ALL_RIGHT])  # never a revisit
        s.on_step_end()
        seen.append((round(s.p_easy, 6), s.metrics()["selection/history/adapting"]))
    assert seen == [(0.5, 0.0), (0.5, 0.0), (0.5, 0.0), (0.49, 1.0), (0.48, 1.0)]
    assert HistorySampler(adapt_warmup_steps=None).adapt_warmup_steps is None
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="adapt_warmup_steps"):
            HistorySampler(adapt_warmup_steps=bad)


def test_resume_before_adaptation_starts_repeats_picks_and_the_start_step():
    reference, pool = HistorySampler(seed=5), CandidatePool(200, seed=1)
    head = _simulate(reference, pool, 10)
    assert all(tuple(p) == (0.5, 0.5, 0.0) for _, *p in head)  # saved before any adaptation
    state = torch_roundtrip(reference.state_dict())
    pool_state = pool.state_dict()
    expected = _simulate(reference, pool, 30)
    restored, restored_pool = HistorySampler(seed=77), CandidatePool(200, seed=1)
    restored.load_state_dict(state)
    restored_pool.load_state_dict(pool_state)
    got = _simulate(restored, restored_pool, 30)
    assert got == expected
    assert [a for *_, a in expected].index(1.0) == 15  # step 26 = the 16th step after the checkpoint at step 10
    assert restored.state_dict() == reference.state_dict()
    assert restored.metrics() == reference.metrics()


def test_config_field_selection_adapt_warmup_steps(tmp_path, tiny_model_dir, chain_sum_splits, grpo_kwargs):
    from grpo_args import cpu_grpo_kwargs

    base = cpu_grpo_kwargs(str(tmp_path), per_device_train_batch_size=8, num_generations=4)
    assert EfficientGRPOConfig(**base).selection_adapt_warmup_steps is None
    assert EfficientGRPOConfig(**base, selection_adapt_warmup_steps=0).selection_adapt_warmup_steps == 0
    with pytest.raises(ValueError, match=r"selection_adapt_warmup_steps.*-1"):
        EfficientGRPOConfig(**base, selection_adapt_warmup_steps=-1)
    for bad in (1.5, True):
        with pytest.raises(ValueError, match="selection_adapt_warmup_steps"):
            EfficientGRPOConfig(**base, selection_adapt_warmup_steps=bad)
    train_ds, _ = chain_sum_splits
    kwargs = grpo_kwargs(per_device_train_batch_size=16, num_generations=4, selection_history=True)
    trainer = make_trainer(tiny_model_dir, train_ds, {**kwargs, "selection_adapt_warmup_steps": 7})
    stage = trainer.prompt_selection
    assert isinstance(stage, PromptSelectionStage) and stage.history.adapt_warmup_steps == 7
    m = stage.metrics()
    assert m["selection/adapting"] == 0.0 and m["selection/p_easy"] == 0.5 and m["selection/p_hard"] == 0.5
    assert m["selection/stage1_skipped_total"] == 0.0
    assert stage.state_dict()["history"]["adapting"] is False


# ------------------------------------------------------------------------------------------------------------------
# Item 5: a refill never repeats a prompt of the step
def record_generations(monkeypatch, G: int) -> list[list[str]]:
    """Prompt keys (one per group) of every generation call, in order: the step's batch first, then each refill."""
    calls: list[list[str]] = []
    generate = GRPOTrainer._generate_and_score_completions

    def recording(self, inputs):
        calls.append([prompt_key(row["prompt"]) for row in inputs[::G]])
        return generate(self, inputs)

    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", recording)
    return calls


def test_refills_with_selection_on_never_repeat_the_steps_prompts(
    monkeypatch, tiny_model_dir, chain_sum_splits, grpo_kwargs
):
    """The random model solves nothing, so every group is dropped and all 3 refill rounds run (4 prompts each).
    Before the fix the dynamic pool, seeded like the selection pool, refilled with the step's own 4 prompts first."""
    train_ds, _ = chain_sum_splits
    kwargs = grpo_kwargs(
        per_device_train_batch_size=16,
        num_generations=4,
        max_completion_length=8,
        selection_history=True,
        dynamic_sampling=True,
        dynamic_sampling_max_rounds=3,
    )
    trainer = make_trainer(tiny_model_dir, train_ds, kwargs)
    calls = record_generations(monkeypatch, 4)
    trainer.model.train()
    selection = trainer.prompt_selection
    trainer._generate_and_score_completions(selection.select(trainer, generation_rows(train_ds, range(4), 4)))
    assert calls[0] == selection.last_keys
    assert [len(c) for c in calls] == [4, 4, 4, 4]
    step = [k for c in calls for k in c]
    assert len(set(step)) == len(step), "a refill repeated a prompt of the step"
    dynamic = trainer.batch_stages[0]
    assert dynamic.metrics()["selection/dynamic/rounds"] == 3


def test_refills_without_selection_skip_the_batch_prompts(monkeypatch, tiny_model_dir, chain_sum_splits, grpo_kwargs):
    """The step's batch is exactly the dynamic pool's first 4 draws: before the fix the first refill repeated it."""
    train_ds, _ = chain_sum_splits
    kwargs = grpo_kwargs(
        per_device_train_batch_size=16,
        num_generations=4,
        max_completion_length=8,
        dynamic_sampling=True,
        dynamic_sampling_max_rounds=2,
    )
    trainer = make_trainer(tiny_model_dir, train_ds, kwargs)
    calls = record_generations(monkeypatch, 4)
    trainer.model.train()
    original = CandidatePool(len(train_ds), seed=0).draw(4)
    trainer._generate_and_score_completions(generation_rows(train_ds, original, 4))
    step = [k for c in calls for k in c]
    assert [len(c) for c in calls] == [4, 4, 4]
    assert len(set(step)) == len(step)
    # the refills are the pool's next fresh draws, in pool order: draws 5-12 (the first 4 are the batch)
    expected = [prompt_key(train_ds[i]["prompt"]) for i in CandidatePool(len(train_ds), seed=0).draw(12)[4:]]
    assert step[4:] == expected


def test_refills_stop_when_the_step_holds_every_prompt(monkeypatch, tiny_model_dir, chain_sum_splits, grpo_kwargs):
    """6 prompts, 4 in the step: only 2 fresh prompts exist, so one refill of 2 and then a shortfall."""
    train_ds = chain_sum_splits[0].select(range(6))
    kwargs = grpo_kwargs(
        per_device_train_batch_size=16,
        num_generations=4,
        max_completion_length=8,
        selection_history=True,
        dynamic_sampling=True,
        dynamic_sampling_max_rounds=3,
    )
    trainer = make_trainer(tiny_model_dir, train_ds, kwargs)
    calls = record_generations(monkeypatch, 4)
    trainer.model.train()
    selection = trainer.prompt_selection
    batch = trainer._generate_and_score_completions(selection.select(trainer, generation_rows(train_ds, range(4), 4)))
    step = [k for c in calls for k in c]
    assert [len(c) for c in calls] == [4, 2]
    assert set(step) == {prompt_key(train_ds[i]["prompt"]) for i in range(6)}
    m = trainer.batch_stages[0].metrics()
    assert m["selection/dynamic/shortfall"] == 4 and batch["completion_ids"].shape[0] == 1  # one inert row


def test_fresh_draws_are_deterministic_and_resume(chain_sum_splits):
    train_ds = chain_sum_splits[0].select(range(20))
    trainer = SimpleNamespace(train_dataset=train_ds, num_generations=4)
    args = SimpleNamespace(dynamic_sampling_max_rounds=3, seed=3)
    a, b = DynamicSamplingStage(trainer, args), DynamicSamplingStage(trainer, args)
    used = {prompt_key(train_ds[i]["prompt"]) for i in a.pool.permutation(0)[:5].tolist()}
    first = a._draw_fresh(train_ds, 4, set(used), multiple=1)
    assert first == a.pool.permutation(0)[5:9].tolist()  # the 5 prompts of the step are skipped
    state = torch_roundtrip(a.state_dict())
    b.load_state_dict(state)
    step_used = {prompt_key(train_ds[i]["prompt"]) for i in range(10)}
    assert a._draw_fresh(train_ds, 6, set(step_used), multiple=2) == b._draw_fresh(
        train_ds, 6, set(step_used), multiple=2
    )
    # asking for more fresh prompts than exist returns what an epoch's worth of draws found, cut to the multiple
    got = a._draw_fresh(train_ds, 20, set(step_used), multiple=3)
    assert len(got) % 3 == 0 and len(got) <= 10 and not {prompt_key(train_ds[i]["prompt"]) for i in got} & step_used
    assert len(set(got)) == len(got)
