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

Every process keeps the same row count (`efficient_rlvr.batch.keep_rows` tops up with inert rows), at least
``steps_per_generation``. Metrics: rows and completion tokens skipped this step and in total.
"""

from __future__ import annotations

from typing import Any

import torch

from ..batch import keep_rows, local_row_count

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
        self._totals = {"rows_skipped": 0, "tokens_skipped": 0}

    def process(
        self, trainer: Any, rows: list[dict[str, Any]], batch: dict[str, Any], rewards: torch.Tensor | None
    ) -> dict[str, Any]:
        advantages = batch["advantages"]
        n = local_row_count(batch)
        mask = batch["completion_mask"]  # [n, C]
        real = (mask.sum(dim=1) > 0).cpu()  # [n] False: an inert padding row of an earlier stage
        informative = (advantages.reshape(n, -1) != 0).any(dim=1).cpu() & real  # [n]
        zero = (real & ~informative).to(mask.device)
        skipped = torch.stack([zero.sum(), mask[zero].sum()]).to(mask.device, torch.float64)
        skipped = trainer.accelerator.gather(skipped.reshape(1, 2)).sum(dim=0)  # [2]: global rows, tokens
        out = keep_rows(
            batch, informative, trainer.accelerator, min_rows=trainer.args.steps_per_generation, recount=False
        )
        rows_skipped, tokens_skipped = int(skipped[0]), int(skipped[1])
        self._last = {
            "cost/zero_adv_rows_skipped": float(rows_skipped),
            "cost/zero_adv_tokens_skipped": tokens_skipped,
        }
        self._totals["rows_skipped"] += rows_skipped
        self._totals["tokens_skipped"] += tokens_skipped
        return out

    def metrics(self) -> dict[str, float]:
        """``cost/zero_adv_*``: rows and completion tokens skipped in the last generation batch and in total."""
        out = dict(self._last)
        out["cost/zero_adv_rows_skipped_total"] = float(self._totals["rows_skipped"])
        out["cost/zero_adv_tokens_skipped_total"] = float(self._totals["tokens_skipped"])
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"last": dict(self._last), "totals": dict(self._totals)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._last = dict(state["last"])
        self._totals = dict(state["totals"])
