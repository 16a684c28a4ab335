"""Drop-in: code written for `trl.GRPOTrainer` runs after changing the import alone.

`EfficientGRPOTrainer(args=trl.GRPOConfig(...))` takes the plain config as an `EfficientGRPOConfig` with the same
field values (every efficiency method off), logs one line saying so, and trains exactly like `trl.GRPOTrainer`.
"""

from __future__ import annotations

import logging
from dataclasses import MISSING, fields

import torch
from transformers import AutoModelForCausalLM
from trl import GRPOConfig, GRPOTrainer

from efficient_rlvr import EfficientGRPOConfig, EfficientGRPOTrainer
from efficient_rlvr.rewards import verifier_reward
from efficient_rlvr.run import load_tokenizer_for


def _new_fields() -> list:
    base = {f.name for f in fields(GRPOConfig)}
    return [f for f in fields(EfficientGRPOConfig) if f.name not in base]


def _trainer(trainer_cls, model_dir, train_ds, args):
    return trainer_cls(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        reward_funcs=[verifier_reward],
        args=args,
        train_dataset=train_ds,
        processing_class=load_tokenizer_for(model_dir),
    )


def test_plain_grpo_config_becomes_the_same_values_with_every_method_off(
    tiny_model_dir, chain_sum_splits, grpo_kwargs, caplog
):
    # derived / rewritten fields: steps_per_generation and generation_batch_size from gradient_accumulation_steps,
    # scale_rewards from a bool, report_to from "none"
    plain = GRPOConfig(**grpo_kwargs(gradient_accumulation_steps=2, scale_rewards=False))
    with caplog.at_level(logging.INFO):
        trainer = _trainer(EfficientGRPOTrainer, tiny_model_dir, chain_sum_splits[0], plain)
    args = trainer.args
    assert isinstance(args, EfficientGRPOConfig)
    assert args is not plain
    for f in fields(GRPOConfig):
        assert getattr(args, f.name) == getattr(plain, f.name), f.name
    assert (args.steps_per_generation, args.generation_batch_size, args.scale_rewards) == (2, 64, "none")
    for f in _new_fields():
        default = f.default if f.default is not MISSING else f.default_factory()
        assert getattr(args, f.name) == default, f.name
    assert args.methods == []
    assert trainer.components == {}
    lines = [r.getMessage() for r in caplog.records if "GRPOConfig" in r.getMessage()]
    assert len(lines) == 1 and "every efficiency method off" in lines[0], lines
    assert "\n" not in lines[0]
    assert type(plain) is GRPOConfig  # the caller's config is left as it was


def test_plain_grpo_config_trains_exactly_like_grpo_trainer(base_model_dir, chain_sum_splits, grpo_kwargs):
    """Same GRPOConfig object type, same seed and data: bitwise the same losses, rewards and weights as TRL."""
    train_ds, _ = chain_sum_splits
    kwargs = grpo_kwargs(max_steps=2, per_device_train_batch_size=16, learning_rate=5e-4)
    results = []
    for cls in (GRPOTrainer, EfficientGRPOTrainer):
        trainer = _trainer(cls, base_model_dir, train_ds, GRPOConfig(**kwargs))
        trainer.train()
        history = trainer.state.log_history
        results.append(
            (
                [h["loss"] for h in history if "loss" in h],
                [h["reward"] for h in history if "reward" in h],
                {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
            )
        )
    (trl_losses, trl_rewards, trl_params), (losses, rewards, params) = results
    assert len(losses) == 2
    assert losses == trl_losses and rewards == trl_rewards
    assert any(r > 0 for r in rewards), "the base model should solve some prompts"
    initial = AutoModelForCausalLM.from_pretrained(base_model_dir).state_dict()
    assert any(not torch.equal(params[n], initial[n]) for n in params), "training must have moved the weights"
    for name, value in trl_params.items():
        torch.testing.assert_close(params[name], value, rtol=0, atol=0, msg=name)
