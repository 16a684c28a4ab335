"""The vLLM importance ratio from the loss's forward pass (cost/old_logprobs.py): TRL's old-log-prob pass never
runs, the training step stays TRL's."""

import math
from types import SimpleNamespace

import pytest
import torch
from grpo_args import VLLM_COLOCATE, cpu_grpo_kwargs, verifier_trainer

from efficient_rlvr import EfficientGRPOConfig
from efficient_rlvr.cost.old_logprobs import vllm_importance_ratio


def _kwargs(output_dir: str, **overrides) -> dict:
    base = dict(
        per_device_train_batch_size=32,
        gradient_accumulation_steps=2,
        num_generations=4,
        max_completion_length=40,
        max_steps=1,
        optim="sgd",  # the parameter change is the gradient (lr 1), see test_skip.py
        learning_rate=1.0,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        **VLLM_COLOCATE,
    )
    return cpu_grpo_kwargs(output_dir, **{**base, **overrides})


@pytest.mark.parametrize(
    "extra",
    [{}, {"skip_zero_advantage": True, "vllm_importance_sampling_mode": "token_truncate"}],
    ids=["sequence_mask", "token_truncate_with_skip"],  # TRL's default mode; a per-token one
)
def test_the_ratio_from_the_loss_leaves_the_step_unchanged_without_the_old_pass(
    base_model_dir, chain_sum_splits, tmp_path, extra
):
    train_ds, _ = chain_sum_splits
    runs = {}
    for name, fold in (("trl", {}), ("fold", {"old_logprobs_from_loss": True})):
        trainer = verifier_trainer(base_model_dir, train_ds, _kwargs(str(tmp_path / name), **extra, **fold))
        no_grad_rows, ratios = [], []
        original = trainer._get_per_token_logps_and_entropies

        def counting(model, input_ids, *args, _original=original, _rows=no_grad_rows, **kw):
            if not torch.is_grad_enabled():
                _rows.append(int(input_ids.shape[0]))
            return _original(model, input_ids, *args, **kw)

        trainer._get_per_token_logps_and_entropies = counting
        loss = trainer._compute_loss

        def recording(model, inputs, _loss=loss, _ratios=ratios):
            out = _loss(model, inputs)
            real = inputs["completion_mask"].bool()  # [n, C]
            ratio = inputs["importance_sampling_ratio"]  # TRL's, or put there by the component: [n, C] or [n, 1]
            _ratios.append(ratio[real] if ratio.shape == real.shape else ratio[real.any(dim=1)].flatten())
            return out

        trainer._compute_loss = recording
        trainer.train()
        params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        logs = [h for h in trainer.state.log_history if "loss" in h]
        runs[name] = (logs, params, no_grad_rows, torch.cat(ratios), trainer)
    (logs_a, params_a, rows_a, ratio_a, _), (logs_b, params_b, rows_b, ratio_b, fold) = runs["trl"], runs["fold"]
    assert sum(rows_a) > 0 and rows_b == []  # TRL's old-log-prob pass ran for vanilla only
    generated = 32 * 2  # one generation batch: per_device_train_batch_size x gradient_accumulation_steps
    assert fold.components["OldLogprobsFromLoss"].metrics()["cost/old_logprob_rows_skipped_total"] == generated
    # The ratios are vLLM's sampling mismatch in both runs (synced float32 weights: ~1), and the step is the same.
    assert ratio_b.numel() == ratio_a.numel() > 0
    torch.testing.assert_close(ratio_b.sort().values, ratio_a.sort().values, rtol=1e-4, atol=1e-5)
    assert logs_b[0]["loss"] == pytest.approx(logs_a[0]["loss"], abs=1e-6)
    for n, p in params_a.items():
        torch.testing.assert_close(params_b[n], p, rtol=1e-5, atol=1e-6, msg=n)
    for key in ("sampling/sampling_logp_difference/max", "sampling/importance_sampling_ratio/mean"):
        assert logs_b[0][key] == pytest.approx(logs_a[0][key], abs=1e-4), key  # logged from the loss instead
    assert fold.vllm_importance_sampling_correction is True  # switched off during generation only


def test_ratio_follows_trls_modes_and_clipping():
    logps = torch.tensor([[0.0, -1.0, -2.0]])  # [1, 3]
    sampling = torch.tensor([[-1.0, -1.0, float("nan")]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    args = dict(vllm_importance_sampling_clip_min=0.5, vllm_importance_sampling_clip_max=2.0)
    token = SimpleNamespace(vllm_importance_sampling_mode="token_truncate", **args)
    torch.testing.assert_close(vllm_importance_ratio(token, logps, sampling, mask), torch.tensor([[2.0, 1.0, 1.0]]))
    masked = SimpleNamespace(vllm_importance_sampling_mode="token_mask", **args)
    torch.testing.assert_close(vllm_importance_ratio(masked, logps, sampling, mask), torch.tensor([[0.0, 1.0, 1.0]]))
    seq = SimpleNamespace(
        vllm_importance_sampling_mode="sequence_truncate", **{**args, "vllm_importance_sampling_clip_max": 3.0}
    )
    torch.testing.assert_close(vllm_importance_ratio(seq, logps, sampling, mask), torch.tensor([[math.e]]))
    seq_mask = SimpleNamespace(vllm_importance_sampling_mode="sequence_mask", **args)
    torch.testing.assert_close(vllm_importance_ratio(seq_mask, logps, sampling, mask), torch.tensor([[0.0]]))


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"num_iterations": 2}, "num_iterations"),
        ({"gradient_accumulation_steps": 3, "steps_per_generation": 2}, "steps_per_generation"),
        ({"use_liger_kernel": True}, "use_liger_kernel"),
    ],
)
def test_settings_where_old_logprobs_differ_from_the_loss_are_refused(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        EfficientGRPOConfig(**_kwargs(str(tmp_path), old_logprobs_from_loss=True, **overrides))
