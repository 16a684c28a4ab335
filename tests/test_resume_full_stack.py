"""Checkpoint and resume with every method on: a run stopped at step 2 and resumed repeats the uninterrupted run.

The uninterrupted run trains 4 steps and saves a checkpoint at step 2; a second trainer resumes from that checkpoint
(TRL/transformers restore the model, optimizer, scheduler and RNG states; `EfficientGRPOTrainer` restores every
component: history, pool, quality head + Adam + calibrator + decision RNG, V0.5 prior, HES and cost-sampler RNGs).
Steps 3-4 must repeat exactly: the selected prompts, the pruning decisions, the budget's rollout counts, the HES keep
mask, the cost-aware draws and the losses.
"""

import pytest
import torch
from grpo_args import FULL_STACK, VLLM_COLOCATE, cpu_grpo_kwargs, verifier_trainer

# Every method; V0.5 as the fused baseline only (no extra "rollout more" rounds).
RESUMED_STACK = {**FULL_STACK, "budget_adaptive": False}


def _record(trainer) -> list[dict]:
    steps: list[dict] = []
    selection, sampler = trainer.prompt_selection, trainer.minibatch_sampler
    select, split = selection.select, sampler.split

    def recording_select(trainer_, rows):
        out = select(trainer_, rows)
        steps.append({"step": trainer_.state.global_step, "keys": list(selection.last_keys)})
        return out

    def recording_split(trainer_, batch, n):
        chunks = split(trainer_, batch, n)
        pruning, budget, hes = trainer_.batch_stages
        steps[-1].update(
            aborted=list(pruning.history[-1]["aborted"]),
            budget_counts=budget.last_step["counts"].tolist(),
            hes_keep=hes.last_selection["keep"].tolist(),
            draws=sampler.last_draw["rows"].tolist(),
            weights=sampler.last_draw["weights"].tolist(),
        )
        return chunks

    selection.select, sampler.split = recording_select, recording_split
    return steps


@pytest.mark.slow
def test_resumed_run_repeats_the_uninterrupted_one(base_model_dir, chain_sum_splits, tmp_path):
    train_ds, _ = chain_sum_splits
    kwargs = cpu_grpo_kwargs(
        str(tmp_path / "full"),
        per_device_train_batch_size=32,
        gradient_accumulation_steps=2,
        num_generations=4,
        max_completion_length=40,
        max_steps=4,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="steps",
        save_steps=2,
        **VLLM_COLOCATE,
        **RESUMED_STACK,
    )
    full = verifier_trainer(base_model_dir, train_ds, kwargs)
    full_steps = _record(full)
    full.train()
    full_losses = [h["loss"] for h in full.state.log_history if "loss" in h]

    resumed = verifier_trainer(base_model_dir, train_ds, {**kwargs, "output_dir": str(tmp_path / "resumed")})
    resumed_steps = _record(resumed)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    resumed_losses = [h["loss"] for h in resumed.state.log_history if "loss" in h]

    assert [s["step"] for s in full_steps] == [0, 1, 2, 3]
    assert [s["step"] for s in resumed_steps] == [2, 3]
    assert any(any(s["aborted"]) for s in full_steps[2:]), "steps 3-4 must prune something"
    for a, b in zip(full_steps[2:], resumed_steps, strict=True):
        assert a["keys"] == b["keys"]
        assert a["aborted"] == b["aborted"]
        assert a["budget_counts"] == b["budget_counts"]
        assert a["hes_keep"] == b["hes_keep"]
        assert a["draws"] == b["draws"]
        torch.testing.assert_close(torch.tensor(a["weights"]), torch.tensor(b["weights"]))
    assert resumed_losses[2:] == pytest.approx(full_losses[2:], abs=1e-6)  # [:2] come from the checkpoint
    # A stage that had not restored its state would repeat the first steps' picks instead.
    assert full_steps[2]["keys"] != full_steps[0]["keys"]
