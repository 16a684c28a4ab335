"""The vLLM importance ratio from the loss's own forward pass: no separate old-log-prob pass (namespace `cost/`).

TRL 1.16 `GRPOTrainer._generate_and_score_completions` runs the policy once more over every rollout, without
gradients, for ``old_per_token_logps``. With generation and optimizer steps aligned (``num_iterations=1`` and
``gradient_accumulation_steps`` a multiple of ``steps_per_generation``) TRL itself needs them only for the vLLM
importance-sampling correction, ``exp(old - sampling)`` (truncated or masked), because the policy-gradient ratio then
uses the loss's own detached log-probs (TRL's loss: ``old_per_token_logps = per_token_logps.detach()`` when none are
given). In that case the parameters the old pass runs with are the ones every micro-batch of the generation is
trained with (they change only at the optimizer step, after the last micro-batch), so the old log-probs equal the
loss forward's log-probs, detached. This component computes the importance ratio there instead, with TRL's formula
and clipping, and TRL's separate pass never runs: one forward over every rollout saved per generation, for the same
loss and gradient (up to floating-point differences between two forward passes over differently batched rows).

How: during a training generation TRL's ``vllm_importance_sampling_correction`` reads False, so TRL computes neither
the old log-probs nor the ratio; during the loss, TRL's ``_get_per_token_logps_and_entropies`` is wrapped for its one
call with gradients, and the ratio computed from its result is put into the micro-batch
(``inputs["importance_sampling_ratio"]``), which TRL's loss reads after that call (every ``loss_type``; vespo takes
it as an argument). TRL's ``sampling/sampling_logp_difference/*`` and ``sampling/importance_sampling_ratio/*`` are
logged from there: over the rows that reach the loss (TRL: every row of the generation), one entry per micro-batch
(TRL: per generation), gathered over processes as TRL does.

Refused (ValueError naming the field, at config construction): ``num_iterations > 1`` or ``gradient_accumulation_steps``
not a multiple of ``steps_per_generation`` (old log-probs then come from an earlier policy), ``use_liger_kernel``
(its loss does not go through that call). Without vLLM or without the correction there is nothing to save: the
component does nothing. The pass is off for the whole training generation, the batch stages' extra generations
(dynamic-sampling refills, V0.5 rounds) included. Metric: ``cost/old_logprob_rows_skipped`` (rows of the generation
batch that TRL's pass would have run; extra generations not counted), last and total.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..logprobs import LOGPS_METHOD

SEQUENCE_MODES = ("sequence_mask", "sequence_truncate")


def check_old_logprobs_config(args: Any) -> None:
    """Raise ValueError (naming the field) where old log-probs may differ from the loss forward's under `args`."""
    if args.num_iterations != 1:
        raise ValueError(
            "old_logprobs_from_loss=True needs num_iterations=1 (later iterations train on a policy that has moved "
            f"since generation), got {args.num_iterations}."
        )
    if args.gradient_accumulation_steps % args.steps_per_generation != 0:
        raise ValueError(
            "old_logprobs_from_loss=True needs gradient_accumulation_steps to be a multiple of steps_per_generation "
            "(otherwise an optimizer step falls inside a generation), got "
            f"gradient_accumulation_steps={args.gradient_accumulation_steps}, "
            f"steps_per_generation={args.steps_per_generation}."
        )
    if args.use_liger_kernel:
        raise ValueError("old_logprobs_from_loss=True does not support use_liger_kernel=True (the Liger loss).")


def vllm_importance_ratio(trainer: Any, logps: torch.Tensor, sampling_logps: torch.Tensor, mask: torch.Tensor):
    """TRL 1.16's vLLM importance ratio (`_generate_and_score_completions`) from detached log-probs ``logps``.

    Shapes: ``logps``, ``sampling_logps``, ``mask`` `[B, T]`; returns `[B, T]` (token modes) or `[B, 1]` (sequence
    modes). NaN sampling log-probs (vLLM gave none) count as a difference of 0.
    """
    diff = torch.nan_to_num((logps - sampling_logps) * mask, nan=0.0)  # [B, T]
    mode = trainer.vllm_importance_sampling_mode
    if mode in SEQUENCE_MODES:
        diff = diff.sum(dim=-1, keepdim=True)  # [B, 1]
    ratio = torch.exp(diff)
    lo, hi = trainer.vllm_importance_sampling_clip_min, trainer.vllm_importance_sampling_clip_max
    if mode in ("sequence_truncate", "token_truncate"):
        return torch.clamp(ratio, min=lo, max=hi)
    if mode in ("sequence_mask", "token_mask"):
        lo = -math.inf if lo is None else lo
        hi = math.inf if hi is None else hi
        return ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)
    raise ValueError(f"Unknown vllm_importance_sampling_mode {mode!r}.")


class OldLogprobsFromLoss:
    """Computes the vLLM importance ratio inside the loss and switches off TRL's old-log-prob pass (module docstring)."""

    def __init__(self, trainer: Any, args: Any):
        check_old_logprobs_config(args)
        self._rows = 0
        self._totals = {"rows_skipped": 0}

    @staticmethod
    def active(trainer: Any) -> bool:
        """Whether there is a pass to save: training, with vLLM and TRL's importance-sampling correction."""
        return bool(trainer.model.training and trainer.use_vllm and trainer.vllm_importance_sampling_correction)

    @contextmanager
    def generation(self, trainer: Any, rows: int) -> Iterator[None]:
        """Run TRL's generate-and-score for `rows` rollouts of this process without its old-log-prob pass."""
        if not self.active(trainer):
            yield
            return
        trainer.vllm_importance_sampling_correction = False
        try:
            yield
        finally:
            trainer.vllm_importance_sampling_correction = True
        rows = int(trainer.accelerator.gather(torch.tensor([rows], device=trainer.accelerator.device)).sum())
        self._rows = rows
        self._totals["rows_skipped"] += rows

    def loss(self, trainer: Any, compute: Callable[[Any, dict[str, Any]], torch.Tensor]):
        """`compute` (TRL's `_compute_loss`) with the micro-batch's importance ratio taken from its forward pass."""
        if not self.active(trainer):
            return compute

        def with_ratio(model: Any, inputs: dict[str, Any]) -> torch.Tensor:
            if "importance_sampling_ratio" in inputs or "sampling_per_token_logps" not in inputs:
                return compute(model, inputs)  # a ratio TRL computed (evaluation batches), or none to compute
            original = getattr(trainer, LOGPS_METHOD)
            had = LOGPS_METHOD in vars(trainer)

            def forward(*args: Any, **kwargs: Any):
                out = original(*args, **kwargs)
                if torch.is_grad_enabled() and "importance_sampling_ratio" not in inputs:
                    self._put_ratio(trainer, inputs, out[0].detach())
                return out

            setattr(trainer, LOGPS_METHOD, forward)
            try:
                return compute(model, inputs)
            finally:
                if had:
                    setattr(trainer, LOGPS_METHOD, original)
                else:
                    delattr(trainer, LOGPS_METHOD)

        return with_ratio

    def _put_ratio(self, trainer: Any, inputs: dict[str, Any], logps: torch.Tensor) -> None:
        mask = inputs["completion_mask"]  # [B, T]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        sampling = inputs["sampling_per_token_logps"].to(logps.dtype)  # [B, T]
        ratio = vllm_importance_ratio(trainer, logps, sampling, mask)  # [B, T] or [B, 1]
        inputs["importance_sampling_ratio"] = ratio
        # TRL's sampling/* metrics, as `_generate_and_score_completions` logs them, over this micro-batch.
        device, metrics = logps.device, trainer._metrics["train"]
        bool_mask = mask.bool()
        delta = torch.abs(logps - sampling)[bool_mask]
        delta = delta[~torch.isnan(delta)]
        zero = torch.tensor(0.0, device=device)
        mean_delta = delta.mean() if delta.numel() else zero
        max_delta = delta.max() if delta.numel() else zero
        sequence_level = trainer.vllm_importance_sampling_mode in SEQUENCE_MODES
        flat = ratio.flatten() if sequence_level else ratio[bool_mask]
        stats = torch.stack(
            [mean_delta, max_delta] + ([flat.min(), flat.mean(), flat.max()] if flat.numel() else [zero, zero, zero])
        ).reshape(1, 5)
        gathered = trainer.accelerator.gather(stats)  # [P, 5]
        metrics["sampling/sampling_logp_difference/mean"].append(gathered[:, 0].mean().item())
        metrics["sampling/sampling_logp_difference/max"].append(gathered[:, 1].max().item())
        metrics["sampling/importance_sampling_ratio/min"].append(gathered[:, 2].min().item())
        metrics["sampling/importance_sampling_ratio/mean"].append(gathered[:, 3].mean().item())
        metrics["sampling/importance_sampling_ratio/max"].append(gathered[:, 4].max().item())

    def metrics(self) -> dict[str, float]:
        """``cost/old_logprob_rows_skipped``: rows TRL's old-log-prob pass did not run (all processes); last, total."""
        return {
            "cost/old_logprob_rows_skipped": float(self._rows),
            "cost/old_logprob_rows_skipped_total": float(self._totals["rows_skipped"]),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self._rows, "totals": dict(self._totals)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._rows = int(state["rows"])
        self._totals = dict(state["totals"])
