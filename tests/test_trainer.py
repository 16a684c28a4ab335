"""EfficientGRPOTrainer with every method off is trl.GRPOTrainer: same losses, same final parameters."""

import pytest
import torch
from transformers import AutoModelForCausalLM
from trl import GRPOConfig, GRPOTrainer

from efficient_rlvr import EfficientGRPOConfig, EfficientGRPOTrainer
from efficient_rlvr.rewards import verifier_reward
from efficient_rlvr.run import load_tokenizer_for


def _train(trainer_cls, config_cls, model_dir, train_ds, kwargs):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = trainer_cls(
        model=model,
        reward_funcs=[verifier_reward],
        args=config_cls(**kwargs),
        train_dataset=train_ds,
        processing_class=load_tokenizer_for(model_dir),
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    params = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    return trainer, losses, rewards, params


def test_methods_off_matches_trl_exactly(base_model_dir, chain_sum_splits, grpo_kwargs):
    """Same seed, same data, transformers generation: the two trainers take identical steps.

    Tolerance 0 (bitwise): with every method off the trainer runs TRL's own code path, one torch thread and the
    seeded RNG, so any difference at all means the subclass changed behaviour.
    """
    train_ds, _ = chain_sum_splits
    kwargs = grpo_kwargs(max_steps=3, learning_rate=5e-4)
    _, trl_losses, trl_rewards, trl_params = _train(GRPOTrainer, GRPOConfig, base_model_dir, train_ds, kwargs)
    trainer, losses, rewards, params = _train(
        EfficientGRPOTrainer, EfficientGRPOConfig, base_model_dir, train_ds, kwargs
    )
    assert len(losses) == 3
    assert losses == trl_losses
    assert rewards == trl_rewards
    assert any(r > 0 for r in rewards), "the base model should solve some prompts"
    initial = AutoModelForCausalLM.from_pretrained(base_model_dir).state_dict()
    assert any(not torch.equal(params[n], initial[n]) for n in params), "training must have moved the weights"
    for name in trl_params:
        torch.testing.assert_close(params[name], trl_params[name], rtol=0, atol=0, msg=name)
    assert "efficient-rlvr" in trainer._tag_names


def test_subclass_hooks_keep_working(base_model_dir, chain_sum_splits, grpo_kwargs):
    """Code that subclasses the trainer and overrides TRL's hooks still runs them, with the same results."""
    calls = {"generate": 0, "loss": 0}

    class Counting(EfficientGRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            calls["generate"] += 1
            return super()._generate_and_score_completions(inputs)

        def _compute_loss(self, model, inputs):
            calls["loss"] += 1
            return super()._compute_loss(model, inputs)

    train_ds, _ = chain_sum_splits
    kwargs = grpo_kwargs(max_steps=2, gradient_accumulation_steps=2)
    _, plain_losses, _, _ = _train(EfficientGRPOTrainer, EfficientGRPOConfig, base_model_dir, train_ds, kwargs)
    _, losses, _, _ = _train(Counting, EfficientGRPOConfig, base_model_dir, train_ds, kwargs)
    assert calls == {"generate": 2, "loss": 4}  # one generation per optimizer step, 2 micro-batches each
    assert losses == plain_losses


def test_vllm_dtype_validation(grpo_kwargs):
    with pytest.raises(ValueError, match="vllm_dtype"):
        EfficientGRPOConfig(**grpo_kwargs(vllm_dtype="fp8"))
    assert EfficientGRPOConfig(**grpo_kwargs()).resolved_vllm_dtype() == "float32"
    assert EfficientGRPOConfig(**grpo_kwargs(vllm_dtype="bfloat16")).resolved_vllm_dtype() == "bfloat16"
