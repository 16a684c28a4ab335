"""The methods composed in one trainer: the stages run in the documented order and hand each other consistent rows.

Each stage's input and output is recorded (a wrapper around `process` / `split`, nothing replaced), and the tests
check what every stage promises to the next: pruned rows never reach a later stage, per-row rewards and groups stay
aligned with the rows through drops and merges, no zero-variance group reaches the loss where a gate removed them,
cost-aware draws only rows with a non-zero advantage, and every namespace logs its savings.
"""

import math

import pytest
import torch
from grpo_args import FULL_STACK, VLLM_COLOCATE, cpu_grpo_kwargs, verifier_trainer

from efficient_rlvr import EfficientGRPOConfig
from efficient_rlvr.batch import ROLLOUT_GROUPS, ROLLOUT_REWARDS
from efficient_rlvr.config import PRESETS


def _kwargs(output_dir: str, **overrides) -> dict:
    base = dict(
        per_device_train_batch_size=32,  # 8 prompts x 4 generations per micro-step
        gradient_accumulation_steps=2,
        num_generations=4,
        max_completion_length=40,
        max_steps=4,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        **VLLM_COLOCATE,
    )
    return cpu_grpo_kwargs(output_dir, **{**base, **overrides})


def _record_stages(trainer) -> list[dict]:
    """Wrap every batch stage's `process` and the minibatch sampler's `split`: [{stage, in, out}] per call."""
    calls: list[dict] = []
    for stage in trainer.batch_stages:
        original, name = stage.process, type(stage).__name__

        def process(tr, rows, batch, rewards, _original=original, _name=name):
            out = _original(tr, rows, batch, rewards)
            calls.append({"stage": _name, "in": batch, "out": out, "step": tr.state.global_step})
            return out

        stage.process = process
    sampler = trainer.minibatch_sampler
    if sampler is not None:
        original_split = sampler.split

        def split(tr, batch, n, _original=original_split):
            chunks = _original(tr, batch, n)
            calls.append({"stage": "CostAwareStage", "in": batch, "out": chunks, "step": tr.state.global_step})
            return chunks

        sampler.split = split
    return calls


def _real(batch: dict) -> torch.Tensor:
    return batch["completion_mask"].sum(1).cpu() > 0  # [n] False = inert padding row


@pytest.fixture(scope="module")
def full_stack_run(base_model_dir, chain_sum_splits, tmp_path_factory):
    train_ds, _ = chain_sum_splits
    trainer = verifier_trainer(base_model_dir, train_ds, _kwargs(str(tmp_path_factory.mktemp("full")), **FULL_STACK))
    calls = _record_stages(trainer)
    trainer.train()
    return trainer, calls


def test_stages_run_in_the_documented_order(full_stack_run):
    trainer, calls = full_stack_run
    names = [type(s).__name__ for s in trainer.batch_stages]
    assert names == ["PruningStage", "BudgetStage", "HESSelectionStage"]
    assert type(trainer.prompt_selection).__name__ == "PromptSelectionStage"
    order = [c["stage"] for c in calls if c["step"] == calls[-1]["step"]]
    assert order == ["PruningStage", "BudgetStage", "HESSelectionStage", "CostAwareStage"]


def test_each_stage_receives_what_the_previous_one_returned(full_stack_run):
    _, calls = full_stack_run
    for previous, current in zip(calls, calls[1:], strict=False):
        if previous["step"] != current["step"] or previous["stage"] == "CostAwareStage":
            continue
        assert current["in"] is previous["out"], (previous["stage"], current["stage"])


def test_pruned_rollouts_never_reach_a_later_stage(full_stack_run):
    trainer, calls = full_stack_run
    pruned_any = False
    for call in (c for c in calls if c["stage"] == "PruningStage"):
        out = call["out"]
        real = _real(out)
        rewards = out[ROLLOUT_REWARDS].cpu()
        # Kept rows are the survivors: their rewards are known; inert padding rows carry NaN and no token.
        assert torch.isfinite(rewards[real]).all() or torch.isnan(rewards[real]).sum() == 0
        assert torch.isnan(rewards[~real]).all()
        assert (out["advantages"].cpu()[~real] == 0).all()
        pruned_any |= call["in"]["completion_ids"].shape[0] > int(real.sum())
    assert pruned_any, "the cold start is 1 step: later steps must prune something"
    assert trainer.rollout_generation.metrics()["pruning/rollouts_pruned_total"] > 0


def test_budget_uses_the_survivors_and_aligns_rows(full_stack_run):
    _, calls = full_stack_run
    for call in (c for c in calls if c["stage"] == "BudgetStage"):
        out = call["out"]
        rewards, groups = out[ROLLOUT_REWARDS].cpu(), out[ROLLOUT_GROUPS].cpu()
        assert rewards.shape == groups.shape == (out["completion_ids"].shape[0],)
        # Rows of the same group share the baseline: advantages order like rewards within each group.
        for g in groups.unique():
            rows = (groups == g) & torch.isfinite(rewards)
            r, a = rewards[rows], out["advantages"].cpu()[rows]
            if r.numel() >= 2 and r.max() > r.min():
                assert a[r == r.max()].min() > a[r == r.min()].max()
        # The first round's survivors are still there, with their rewards.
        first = call["in"]
        kept_first = torch.isfinite(first[ROLLOUT_REWARDS].cpu())
        assert int(torch.isfinite(rewards).sum()) >= int(kept_first.sum())


def test_hes_only_drops_rows(full_stack_run):
    _, calls = full_stack_run
    for call in (c for c in calls if c["stage"] == "HESSelectionStage"):
        before = {
            (int(g), float(r), tuple(ids.tolist()))
            for g, r, ids in zip(
                call["in"][ROLLOUT_GROUPS].cpu(),
                call["in"][ROLLOUT_REWARDS].cpu(),
                call["in"]["completion_ids"].cpu(),
                strict=True,
            )
            if not math.isnan(float(r))
        }
        out = call["out"]
        real = _real(out)
        for g, r, ids, keep in zip(
            out[ROLLOUT_GROUPS].cpu(), out[ROLLOUT_REWARDS].cpu(), out["completion_ids"].cpu(), real, strict=True
        ):
            if keep:
                assert (int(g), float(r), tuple(ids.tolist())) in before


def test_cost_aware_draws_only_informative_rows(full_stack_run):
    _, calls = full_stack_run
    for call in (c for c in calls if c["stage"] == "CostAwareStage"):
        for chunk in call["out"]:
            real = _real(chunk)
            assert "sample_weights" in chunk
            assert (chunk["advantages"].cpu()[real] != 0).all()


def test_every_namespace_logs_its_savings(full_stack_run):
    trainer, _ = full_stack_run
    logged = {k for record in trainer.state.log_history for k in record}
    for key in (
        "selection/prompts_skipped_total",
        "selection/entropy_seconds",
        "pruning/rollouts_pruned_total",
        "pruning/tokens_not_generated_total",
        "budget/total_rollouts",
        "budget/total_rollouts_fixed",
        "hes/total_rollouts_dropped",
        "cost/tokens_saved_cumulative",
    ):
        assert key in logged, key


def test_pruning_dynamic_sampling_hes_and_cost_compose(base_model_dir, chain_sum_splits, tmp_path):
    """Dynamic sampling after pruning gates groups on their survivors; its refills carry new group ids for HES."""
    train_ds, _ = chain_sum_splits
    kwargs = _kwargs(
        str(tmp_path),
        max_steps=3,
        pruning=True,
        pruning_l_detect=12,
        pruning_cold_start_steps=1,
        pruning_gate_min_auc=0.0,
        dynamic_sampling=True,
        hes_selection=True,
        cost_aware_sampling=True,
    )
    trainer = verifier_trainer(base_model_dir, train_ds, kwargs)
    calls = _record_stages(trainer)
    trainer.train()
    G = trainer.num_generations
    target_groups = kwargs["per_device_train_batch_size"] * kwargs["gradient_accumulation_steps"] // G
    for call in (c for c in calls if c["stage"] == "DynamicSamplingStage"):
        out = call["out"]
        real = _real(out)
        rewards, groups = out[ROLLOUT_REWARDS].cpu()[real], out[ROLLOUT_GROUPS].cpu()[real]
        assert groups.unique().numel() <= target_groups
        for g in groups.unique():  # every kept group has reward variance among its known rollouts
            r = rewards[(groups == g) & torch.isfinite(rewards)]
            assert r.numel() >= 2 and r.max() > r.min()
    assert any(c["stage"] == "DynamicSamplingStage" for c in calls)


def test_dynamic_sampling_before_v05_is_refused_at_construction(tmp_path):
    with pytest.raises(ValueError, match="dynamic_sampling"):
        EfficientGRPOConfig(**_kwargs(str(tmp_path), dynamic_sampling=True, budget_baseline=True))


def test_efficient_preset_and_recipe_agree(tmp_path):
    import yaml

    config = EfficientGRPOConfig.from_preset("efficient", **_kwargs(str(tmp_path)))
    for key, value in PRESETS["efficient"].items():
        assert getattr(config, key) == value
    assert EfficientGRPOConfig.from_preset("efficient", selection_history=False, **_kwargs(str(tmp_path))).methods == [
        "skip_zero_advantage",
        "old_logprobs_from_loss",
    ]
    with open("examples/recipes/efficient.yaml") as f:
        recipe = yaml.safe_load(f)
    for key, value in PRESETS["efficient"].items():
        assert recipe[key] == value, key
    with pytest.raises(ValueError, match="preset"):
        EfficientGRPOConfig.from_preset("fastest", **_kwargs(str(tmp_path)))
