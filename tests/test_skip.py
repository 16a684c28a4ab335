"""Exact zero-advantage skipping (cost/skip.py): fewer rows reach the loss, the training steps stay TRL's."""

import pytest
import torch
from grpo_args import VLLM_COLOCATE, cpu_grpo_kwargs, verifier_trainer

from efficient_rlvr import EfficientGRPOConfig


def _kwargs(output_dir: str, **overrides) -> dict:
    base = dict(
        per_device_train_batch_size=32,
        gradient_accumulation_steps=2,
        num_generations=4,
        max_completion_length=40,
        max_steps=3,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
    )
    return cpu_grpo_kwargs(output_dir, **{**base, **overrides})


def test_skipping_zero_advantage_rows_leaves_the_training_steps_unchanged(base_model_dir, chain_sum_splits, tmp_path):
    train_ds, _ = chain_sum_splits
    runs = {}
    # One optimizer step (two micro-batches): TRL shuffles the rows with the global RNG before splitting them, so
    # with fewer rows the next step's samples would differ; within a step the partition does not matter for dapo.
    # Plain SGD makes the parameter change proportional to the gradient (Adam's first step, g / (|g| + eps), would
    # amplify rounding differences of near-zero gradient entries).
    for name, extra in (("off", {}), ("skip", {"skip_zero_advantage": True})):
        kwargs = _kwargs(str(tmp_path / name), max_steps=1, optim="sgd", learning_rate=1.0, **extra)
        trainer = verifier_trainer(base_model_dir, train_ds, kwargs)
        rows = []
        original = trainer._compute_loss

        def counting(model, inputs, _original=original, _rows=rows):
            _rows.append(int((inputs["completion_mask"].sum(1) > 0).sum()))
            return _original(model, inputs)

        trainer._compute_loss = counting
        trainer.train()
        params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        runs[name] = (losses, params, rows, trainer)
    (loss_a, params_a, rows_a, _), (loss_b, params_b, rows_b, skip) = runs["off"], runs["skip"]
    # Fewer rows reach the loss (zero-variance groups exist at this accuracy) ...
    assert sum(rows_b) < sum(rows_a)
    metrics = skip.components["ZeroAdvantageSkip"].metrics()
    assert metrics["cost/zero_adv_rows_skipped_total"] == sum(rows_a) - sum(rows_b)
    # ... and the steps are the same up to summation order (the dapo normaliser is the batch's token count).
    assert loss_b == pytest.approx(loss_a, abs=1e-6)
    for n, p in params_a.items():
        torch.testing.assert_close(params_b[n], p, rtol=1e-5, atol=1e-6, msg=n)  # lr 1: the gradients agree
    from transformers import AutoModelForCausalLM

    base = dict(AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32).named_parameters())
    assert any(not torch.allclose(base[n], p) for n, p in params_a.items())  # the step did move the weights


def test_zero_advantage_rows_skip_the_old_logprob_pass(base_model_dir, chain_sum_splits, tmp_path):
    """With vLLM, TRL runs a no-grad pass over every rollout for the importance ratio; zero-advantage rows skip it,
    the rollouts are scored once, and every row that reaches the loss carries the model's own old log-probs."""
    train_ds, _ = chain_sum_splits
    kwargs = _kwargs(str(tmp_path), max_steps=2, skip_zero_advantage=True, **VLLM_COLOCATE)
    trainer = verifier_trainer(base_model_dir, train_ds, kwargs)
    no_grad_rows, reward_calls, checked = [], [], []
    original = trainer._get_per_token_logps_and_entropies

    def counting(model, input_ids, *args, **kw):
        if not torch.is_grad_enabled():
            no_grad_rows.append(int(input_ids.shape[0]))
        return original(model, input_ids, *args, **kw)

    trainer._get_per_token_logps_and_entropies = counting
    reward = trainer.reward_funcs[0]

    def counted_reward(*args, **kw):
        reward_calls.append(1)
        return reward(*args, **kw)

    counted_reward.__name__ = reward.__name__
    trainer.reward_funcs[0] = counted_reward
    loss = trainer._compute_loss

    def checking(model, inputs):
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)  # [n, P + C]
        mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        C = inputs["completion_ids"].shape[1]
        with torch.no_grad():
            fresh, _, _ = original(model, ids, mask, C)  # [n, C]: the weights have not moved within the step
        real = inputs["completion_mask"].bool()
        torch.testing.assert_close(inputs["old_per_token_logps"][real], fresh[real], rtol=1e-4, atol=1e-5)
        checked.append(int(real.any(dim=1).sum()))
        return loss(model, inputs)

    trainer._compute_loss = checking
    trainer.train()
    metrics = trainer.components["ZeroAdvantageSkip"].metrics()
    generated = 2 * kwargs["per_device_train_batch_size"] * kwargs["gradient_accumulation_steps"]
    skipped = metrics["cost/zero_adv_logprob_rows_skipped_total"]
    assert skipped == metrics["cost/zero_adv_rows_skipped_total"] > 0
    assert sum(no_grad_rows) == generated - skipped  # the pass ran on the informative rows only
    assert sum(checked) == generated - skipped
    assert len(reward_calls) == 2  # one scoring call per generation batch, not two
    assert vars(trainer)["_get_per_token_logps_and_entropies"] is counting  # the stage's wrapper is gone
    # A row left out of the pass that would reach the loss is refused, never trained on with a filled ratio.
    stage = trainer.components["ZeroAdvantageSkip"]
    stage._filled = torch.tensor([True, False])
    batch = {
        "completion_ids": torch.ones(2, 3, dtype=torch.long),
        "completion_mask": torch.ones(2, 3, dtype=torch.long),
        "advantages": torch.tensor([0.5, 0.0]),
    }
    with pytest.raises(RuntimeError, match="old-log-prob pass reaches the loss"):
        stage.process(trainer, [{}, {}], batch, None)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("loss_type", "grpo", "loss_type"),
        ("beta", 0.04, "beta"),
        ("entropy_coef", 0.01, "entropy_coef"),
        ("top_entropy_quantile", 0.5, "top_entropy_quantile"),
    ],
)
def test_settings_that_make_a_zero_advantage_row_count_are_refused(tmp_path, field, value, match):
    with pytest.raises(ValueError, match=match):
        EfficientGRPOConfig(**_kwargs(str(tmp_path), skip_zero_advantage=True, **{field: value}))
