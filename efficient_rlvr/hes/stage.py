"""HES trajectory selection wired into `EfficientGRPOTrainer`: Pos-High / Neg-Rand before the loss (a batch stage).

`HESSelectionStage.process(trainer, rows, batch, rewards)` runs last among the batch stages:

1. Rewards and groups per row: from the ``rollout_rewards`` / ``rollout_groups`` entries a row-adding stage (V0.5's
   `BudgetStage`) attaches, else from the trainer's ``rewards`` (``[N_global]``, generation order; then the batch must
   still be in generation order and a group is G = ``num_generations`` consecutive rows).
2. HES per rollout, teacher-forced through the current policy (`hes.score.token_entropies`: one extra no-grad forward
   of ``accelerator.unwrap_model(trainer.model)`` over prompt + completion, eval mode, ``per_device_train_batch_size``
   rows at a time, logits divided by the sampling ``temperature``) and `hes.score.high_entropy_sum` with
   ``hes_quantile`` (per sequence, over the completion mask). TRL computes no entropies while preparing the batch
   (its old log-probs pass has ``compute_entropy=False``, and without vLLM it is skipped entirely when
   ``gradient_accumulation_steps`` is a multiple of ``steps_per_generation * num_iterations``), so the pass is
   separate; its seconds are logged (``hes/seconds``). Only the rollouts the rule ranks, the correct ones, are
   scored unless ``score_incorrect=True`` (incorrect ones are drawn at random; their HES only feeds metrics).
3. Decision on the GLOBAL batch: rewards, HES, lengths and groups are all-gathered (``gather_object``; processes may
   hold different row counts), and `PosHighNegRand` (``keep_fraction = hes_keep_fraction``; its RNG seeded with
   ``args.seed``, identical on every process) keeps per group the ``ceil(f n_correct)`` highest-HES correct rollouts
   and ``ceil(f n_incorrect)`` random incorrect ones. Rollouts with an unknown (NaN) reward are dropped: their
   advantage is 0 anyway. Every process takes its own slice of the decision and drops its rows with
   `efficient_rlvr.batch.keep_rows` (``num_items_in_batch`` recounted globally). Every process keeps the same
   row count, at least ``steps_per_generation``: one that keeps fewer than the most any process keeps is topped up
   with some of its dropped rows as inert padding (mask and advantage 0), because TRL's loss all-gathers
   per-sequence metrics of every micro-batch and needs equal shapes on all processes. Advantages are not
   recomputed: kept rollouts keep the baseline of their whole group.

A rollout is correct when its reward exceeds ``correct_threshold`` (default: the middle of ``budget_reward_min`` /
``budget_reward_max``, i.e. 0.5 for 0/1 rewards).

Metrics (``hes/``): the selector's (kept share, kept correct / incorrect, mean HES of kept vs dropped rollouts,
overall and among the correct ones, HES-length Pearson correlation and mean lengths; NaN-aware, over scored rows),
the scoring pass's seconds and rows, and cumulative totals of rollouts and completion tokens dropped from the loss
(backward work saved) and scoring seconds (work added).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from trl.models import unwrap_model_for_generation

from ..batch import ROLLOUT_GROUPS, ROLLOUT_REWARDS, keep_rows, local_row_count
from .score import high_entropy_sum, token_entropies
from .selector import PosHighNegRand


class HESSelectionStage:
    """Pos-High / Neg-Rand trajectory selection as a batch stage (see the module docstring).

    Args:
        trainer: the `EfficientGRPOTrainer` (TRL's init done).
        args: its `EfficientGRPOConfig`: reads ``hes_keep_fraction``, ``hes_quantile``, ``seed`` and the reward range.
        correct_threshold: a rollout is correct when its reward exceeds this (default: middle of the reward range).
        score_incorrect: also score incorrect rollouts (metrics only; costs their share of the forward pass).
    """

    def __init__(self, trainer: Any, args: Any, correct_threshold: float | None = None, score_incorrect: bool = False):
        if not 0.0 <= float(args.hes_quantile) < 1.0:
            raise ValueError(f"hes_quantile must be in [0, 1), got {args.hes_quantile}.")
        if correct_threshold is None:
            correct_threshold = 0.5 * (float(args.budget_reward_min) + float(args.budget_reward_max))
        self.quantile = float(args.hes_quantile)
        self.num_generations = int(trainer.num_generations)
        self.score_incorrect = bool(score_incorrect)
        self.selector = PosHighNegRand(
            keep_fraction=float(args.hes_keep_fraction), seed=int(args.seed), correct_threshold=correct_threshold
        )
        self.last_selection: dict[str, torch.Tensor] = {}
        self._last: dict[str, float] = {}
        self._totals = {"rollouts_dropped": 0, "tokens_dropped": 0, "rollouts_seen": 0, "scoring_seconds": 0.0}

    def _row_rewards_and_groups(
        self, trainer: Any, rows: list[dict[str, Any]], batch: dict[str, Any], rewards: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Local ``[n]`` rewards (NaN = unknown) and global group ids of the batch's rows."""
        if ROLLOUT_REWARDS in batch and ROLLOUT_GROUPS in batch:
            return batch[ROLLOUT_REWARDS].detach().float().cpu(), batch[ROLLOUT_GROUPS].detach().long().cpu()
        n = local_row_count(batch)
        if n != len(rows):
            raise ValueError(
                f"HESSelectionStage needs the batch in generation order ({len(rows)} rows per process) or per-row "
                f"'{ROLLOUT_REWARDS}'/'{ROLLOUT_GROUPS}' entries; got {n} rows without them."
            )
        if rewards is None:
            rewards = trainer.last_rewards()
        start = trainer.accelerator.process_index * n
        local = rewards.detach().float().cpu().reshape(-1)[start : start + n]
        return local, torch.arange(start, start + n) // self.num_generations

    def process(
        self, trainer: Any, rows: list[dict[str, Any]], batch: dict[str, Any], rewards: torch.Tensor | None
    ) -> dict[str, Any]:
        """Score, decide on the global batch, drop this process's unselected rows (module docstring)."""
        from accelerate.utils import gather_object

        accelerator = trainer.accelerator
        local_rewards, local_groups = self._row_rewards_and_groups(trainer, rows, batch, rewards)
        n = local_rewards.numel()
        mask = batch["completion_mask"]  # [n, C]
        lengths = mask.sum(dim=1).float().cpu()  # [n]
        correct = torch.isfinite(local_rewards) & (local_rewards > self.selector.correct_threshold)
        score = torch.isfinite(local_rewards) if self.score_incorrect else correct
        hes = torch.full((n,), float("nan"))
        start = time.perf_counter()
        idx = torch.nonzero(score).flatten()
        # TRL's generation context on every process (under ZeRO-3 the parameter gather is collective, so a process
        # with nothing to score still enters it); otherwise it is the unwrapped (PEFT-adapted) model.
        with unwrap_model_for_generation(trainer.model_wrapped, accelerator) as model:
            if idx.numel():
                dev = batch["completion_ids"].device
                ent = token_entropies(
                    model,
                    batch["prompt_ids"][idx.to(dev)],
                    batch["prompt_mask"][idx.to(dev)],
                    batch["completion_ids"][idx.to(dev)],
                    mask[idx.to(mask.device)],
                    batch_size=trainer.args.per_device_train_batch_size,
                    temperature=float(getattr(trainer, "temperature", 1.0)),
                )  # [s, C]
                keep_mask = mask[idx.to(mask.device)].to(ent.device).bool()
                hes[idx] = high_entropy_sum(ent, keep_mask, self.quantile).cpu()
        seconds = time.perf_counter() - start

        # Global decision (every process gathers the same lists, in process order).
        gathered = gather_object([(local_rewards.tolist(), hes.tolist(), lengths.tolist(), local_groups.tolist())])
        counts = [len(g[0]) for g in gathered]
        g_rewards = torch.tensor([x for g in gathered for x in g[0]], dtype=torch.float32)
        g_hes = torch.tensor([x for g in gathered for x in g[1]], dtype=torch.float32)
        g_lengths = torch.tensor([x for g in gathered for x in g[2]], dtype=torch.float32)
        g_groups = torch.tensor([x for g in gathered for x in g[3]], dtype=torch.long)
        known = torch.isfinite(g_rewards)
        keep = torch.zeros(g_rewards.numel(), dtype=torch.bool)
        kidx = torch.nonzero(known).flatten()
        if kidx.numel():
            keep[kidx] = self.selector.select(
                g_rewards[kidx], g_hes[kidx], lengths=g_lengths[kidx], groups=g_groups[kidx]
            ).cpu()
        rank = accelerator.process_index
        offsets = [sum(counts[:r]) for r in range(len(counts) + 1)]
        local_keep = keep[offsets[rank] : offsets[rank] + n]
        # Every process ends with the same row count (TRL's loss all-gathers per-sequence metrics of each
        # micro-batch): a process keeping fewer rows than the most any keeps is topped up with inert dropped rows.
        most = max(int(keep[offsets[r] : offsets[r + 1]].sum()) for r in range(len(counts)))
        out = keep_rows(batch, local_keep, accelerator, min_rows=max(trainer.args.steps_per_generation, most))

        self.last_selection = {
            "rewards": g_rewards,
            "hes": g_hes,
            "lengths": g_lengths,
            "groups": g_groups,
            "keep": keep,
        }
        dropped_tokens = float(g_lengths[~keep].sum())
        scored = torch.isfinite(g_hes)
        self._last = {
            "hes/seconds": seconds,
            "hes/scored_rollouts": float(scored.sum()),
            "hes/dropped_rollouts": float((~keep).sum()),
            "hes/dropped_tokens": dropped_tokens,
            "hes/mean": float(g_hes[scored].mean()) if bool(scored.any()) else float("nan"),
        }
        self._totals["rollouts_dropped"] += int((~keep).sum())
        self._totals["tokens_dropped"] += int(dropped_tokens)
        self._totals["rollouts_seen"] += int(keep.numel())
        self._totals["scoring_seconds"] += seconds
        return out

    def metrics(self) -> dict[str, float]:
        """``hes/``: the selector's metrics of the last step, the scoring pass, cumulative totals."""
        out = self.selector.metrics()
        out.update(self._last)
        out.update({f"hes/total_{k}": float(v) for k, v in self._totals.items()})
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"selector": self.selector.state_dict(), "last": dict(self._last), "totals": dict(self._totals)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.selector.load_state_dict(state["selector"])
        self._last = dict(state["last"])
        self._totals = dict(state["totals"])
