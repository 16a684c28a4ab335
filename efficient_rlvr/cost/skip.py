"""Exact skipping of zero-advantage rollouts before the loss (namespace `cost/`).

Cost-Aware GRPO (SPEC 3; arXiv 2604.28020) gives a rollout with A_i = 0 the sampling probability p_i = 0: its
policy-gradient term is exactly zero, yet vanilla GRPO still runs its forward and backward pass. This stage is the
deterministic limit of that rule: after every other batch stage, rows whose advantage is 0 at every token (groups
with zero reward variance, survivors of such groups after pruning) are dropped, and every other row is kept once
with weight 1. The loss normaliser of the token-level losses (`dapo`, `cispo`, `vespo`: the generation batch's
completion-token count ``num_items_in_batch``) is kept as it was, so the loss value and the gradient equal
TRL's (up to floating-point summation order) while the policy-optimization compute shrinks by the zero-advantage
share (25-45% of the rows on the embedded task).

Refused (ValueError naming the field, at config construction): other loss types (their normaliser counts the rows
of the micro-batch, so dropping rows would rescale the step), ``beta != 0`` (the KL term of a zero-advantage row is
not zero), an entropy bonus (``entropy_coef`` / ``use_adaptive_entropy``) and ``top_entropy_quantile < 1`` (the
token mask depends on the micro-batch's entropy quantile).

Old log-probs (`after_generation`): TRL runs the policy over every rollout for ``old_per_token_logps`` (the vLLM
importance-sampling correction, or misaligned generation and optimizer steps) before any batch stage runs, so a
zero-advantage row would still cost that forward pass. When this stage is the first batch stage (no earlier stage can
drop, reorder or re-weight rows), the trainer hands it each training generation right after `_generate`: it scores
the rollouts there (TRL's own `_calculate_rewards`, whose result the trainer then hands back to TRL instead of
scoring twice), computes TRL's advantages with TRL's formula (`survivor_advantages` with every rollout kept) and
leaves the rows whose advantage is exactly 0 (and, under ``mask_truncated_completions``, the truncated rows, whose
loss mask TRL zeroes) out of the old-log-prob pass (`efficient_rlvr.logprobs`), filled with their sampling log-probs.
`process` checks that no row so filled reaches the loss (non-zero advantage and loss mask in TRL's output) and
raises otherwise, so the filled values can never reach the loss. Not used (every row gets TRL's pass) when the
prompts passed to `_generate` are not the rows' own ``prompt`` objects (environments, multimodal rewrites, refills),
with a ``rollout_func`` that returns extra fields, with ``multi_objective_aggregation="normalize_then_sum"``, or
under ZeRO-3 / FSDP with several processes (each process must run as many forwards as the others); with several
processes, one process's "no" is everyone's. Not needed with ``old_logprobs_from_loss`` (cost/old_logprobs.py): TRL's
pass then does not run for any row.

Every process keeps the same row count (`efficient_rlvr.batch.keep_rows` tops up with inert rows), at least
``steps_per_generation``. Metrics: rows and completion tokens skipped this step and in total; rows left out of the
old-log-prob pass this step and in total (``cost/zero_adv_logprob_rows_skipped``).
"""

from __future__ import annotations

from typing import Any

import torch

from ..batch import keep_rows, local_row_count
from ..logprobs import PartialLogprobPass, partial_pass_allowed

EXACT_LOSS_TYPES = ("dapo", "cispo", "vespo")


def check_skip_config(args: Any) -> None:
    """Raise ValueError (naming the field) if skipping zero-advantage rows would change the loss under `args`."""
    if args.loss_type not in EXACT_LOSS_TYPES:
        raise ValueError(
            f"skip_zero_advantage=True needs a loss normalised by the generation batch's token count: loss_type must "
            f"be one of {EXACT_LOSS_TYPES}, got {args.loss_type!r}."
        )
    if args.beta != 0.0:
        raise ValueError(f"skip_zero_advantage=True needs beta=0.0 (a KL term is not zero at A=0), got {args.beta}.")
    if args.entropy_coef != 0.0 or args.use_adaptive_entropy:
        raise ValueError(
            "skip_zero_advantage=True needs entropy_coef=0.0 and use_adaptive_entropy=False (an entropy bonus is not "
            f"zero at A=0), got entropy_coef={args.entropy_coef}, use_adaptive_entropy={args.use_adaptive_entropy}."
        )
    if args.top_entropy_quantile < 1.0:
        raise ValueError(
            f"skip_zero_advantage=True needs top_entropy_quantile=1.0 (its token mask depends on which rows share a "
            f"micro-batch), got {args.top_entropy_quantile}."
        )


class ZeroAdvantageSkip:
    """A batch stage that drops the rows whose advantage is 0 everywhere, keeping the loss normaliser."""

    def __init__(self, trainer: Any, args: Any):
        check_skip_config(args)
        self._last: dict[str, float] = {}
        self._totals = {"rows_skipped": 0, "tokens_skipped": 0, "logprob_rows_skipped": 0}
        self._pass: PartialLogprobPass | None = None
        self._filled: torch.Tensor | None = None  # [n] bool: rows left out of this generation's old-log-prob pass

    def after_generation(self, trainer: Any, inputs: list[dict[str, Any]] | None, prompts: list, generated: tuple):
        """Score this generation's rollouts now and leave the zero-advantage rows out of TRL's old-log-prob pass.

        ``generated`` is TRL 1.16 `_generate`'s output; the rewards are kept on the trainer for TRL's own scoring
        call (`EfficientGRPOTrainer._calculate_rewards`). Does nothing where the module docstring says so.
        """
        self._release()
        _, completion_ids, _, completions, sampling_logps, extra_fields, _, _ = generated
        eligible = not (
            inputs is None
            or len(inputs) != len(prompts)
            or any(p is not x.get("prompt") for p, x in zip(prompts, inputs, strict=True))
            or extra_fields
            or trainer.multi_objective_aggregation != "sum_then_normalize"
            or not partial_pass_allowed(trainer)
        )
        if trainer.accelerator.num_processes > 1:  # scoring gathers: every process must take the same branch
            flag = torch.tensor([float(eligible)], device=trainer.accelerator.device)
            eligible = bool(trainer.accelerator.gather(flag).min() > 0)
        if not eligible:
            return
        from ..pruning.stage import survivor_advantages

        per_func = trainer._calculate_rewards(inputs, prompts, completions, completion_ids)  # [N_global, F]
        trainer._early_rewards = (completions, per_func)
        G = trainer.num_generations
        keep = torch.ones(per_func.shape[0], dtype=torch.bool, device=per_func.device)
        _, advantages = survivor_advantages(
            per_func, trainer.reward_weights, keep, G, trainer.scale_rewards, trainer.multi_objective_aggregation
        )  # [N_global]
        n, rank = len(prompts), trainer.accelerator.process_index
        zero = (advantages[rank * n : (rank + 1) * n] == 0).cpu()  # [n]
        if trainer.mask_truncated_completions:  # TRL masks a truncated row's whole loss: its log-probs are unused too
            eos_and_pad = {*trainer.eos_token_ids, trainer._tokenizer.pad_token_id}
            zero |= torch.tensor([not c or c[-1] not in eos_and_pad for c in completion_ids], dtype=torch.bool)
        if not bool(zero.any()):
            return
        if sampling_logps is None:  # no importance ratio to keep: the filled values are never read
            fill = [[0.0] * len(c) for c in completion_ids]
        else:
            fill = [[float("nan") if x is None else float(x) for x in row] for row in sampling_logps]
        self._pass = PartialLogprobPass(trainer, [list(c) for c in completion_ids], fill, zero.tolist())
        self._filled = zero

    def _release(self) -> int:
        """Remove this stage's pass; the number of rows it left out of the model."""
        skipped = 0
        if self._pass is not None:
            skipped = self._pass.rows_skipped
            self._pass.remove()
            self._pass = None
        return skipped

    def process(
        self, trainer: Any, rows: list[dict[str, Any]], batch: dict[str, Any], rewards: torch.Tensor | None
    ) -> dict[str, Any]:
        advantages = batch["advantages"]
        n = local_row_count(batch)
        logprob_skipped = self._release()
        filled, self._filled = self._filled, None
        mask = batch["completion_mask"]  # [n, C]
        real = (mask.sum(dim=1) > 0).cpu()  # [n] False: an inert padding row of an earlier stage
        informative = (advantages.reshape(n, -1) != 0).any(dim=1).cpu() & real  # [n]
        if filled is not None and (filled.numel() != n or bool((filled & informative).any())):
            raise RuntimeError(
                "ZeroAdvantageSkip: a row left out of the old-log-prob pass reaches the loss (non-zero advantage and "
                "loss mask in TRL's batch); its importance ratio would be wrong. Please report this with your config."
            )
        zero = (real & ~informative).to(mask.device)
        skipped = torch.stack([zero.sum(), mask[zero].sum()]).to(mask.device, torch.float64)
        skipped = trainer.accelerator.gather(skipped.reshape(1, 2)).sum(dim=0)  # [2]: global rows, tokens
        out = keep_rows(
            batch, informative, trainer.accelerator, min_rows=trainer.args.steps_per_generation, recount=False
        )
        rows_skipped, tokens_skipped = int(skipped[0]), int(skipped[1])
        logprob_skipped = int(trainer.accelerator.gather(torch.tensor([logprob_skipped], device=mask.device)).sum())
        self._last = {
            "cost/zero_adv_rows_skipped": float(rows_skipped),
            "cost/zero_adv_tokens_skipped": tokens_skipped,
            "cost/zero_adv_logprob_rows_skipped": float(logprob_skipped),
        }
        self._totals["rows_skipped"] += rows_skipped
        self._totals["tokens_skipped"] += tokens_skipped
        self._totals["logprob_rows_skipped"] += logprob_skipped
        return out

    def metrics(self) -> dict[str, float]:
        """``cost/zero_adv_*``: rows and completion tokens skipped, rows left out of the old-log-prob pass; last and total."""
        out = dict(self._last)
        out["cost/zero_adv_rows_skipped_total"] = float(self._totals["rows_skipped"])
        out["cost/zero_adv_tokens_skipped_total"] = float(self._totals["tokens_skipped"])
        out["cost/zero_adv_logprob_rows_skipped_total"] = float(self._totals["logprob_rows_skipped"])
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"last": dict(self._last), "totals": dict(self._totals)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._last = dict(state["last"])
        self._totals = {"logprob_rows_skipped": 0, **state["totals"]}  # checkpoints before the old-log-prob skip
