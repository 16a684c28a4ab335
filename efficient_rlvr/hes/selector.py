"""Pos-High / Neg-Rand: keep the highest-HES correct rollouts and a random share of the incorrect ones.

HES paper (arXiv 2605.22389; SPEC section 5): in RL, training on the correct rollouts with the highest high-entropy
sum plus randomly chosen incorrect rollouts beat training on the full batch (21.30 vs 20.63). Rule used here:

- a rollout is correct when its reward > ``correct_threshold``;
- within each group (a prompt's rollouts; or the whole batch when no groups are given), keep the
  ``ceil(keep_fraction * n_correct)`` correct rollouts with the highest HES (ties: lower index first) and
  ``ceil(neg_fraction * n_incorrect)`` incorrect rollouts drawn uniformly without replacement from the object's own
  RNG; ``ceil`` keeps at least one rollout of each non-empty class, so a group's only correct answer is never lost.

Assumptions: the seed text gives no fraction; ``keep_fraction`` is ours (default 0.5) and ``neg_fraction`` defaults to
it. What the trainer does with the dropped rollouts (mask them from the loss, or leave them out of the batch) is the
caller's choice; the selector only decides.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .score import pearson


def _check_fraction(name: str, value: float) -> float:
    if not (isinstance(value, int | float) and 0.0 < value <= 1.0):
        raise ValueError(f"{name} must be in (0, 1], got {value!r}.")
    return float(value)


class PosHighNegRand:
    """Keep high-HES correct rollouts and random incorrect ones (see the module docstring).

    Args:
        keep_fraction: share of each group's correct rollouts to keep, in (0, 1].
        seed: seed of the RNG that draws the incorrect rollouts.
        neg_fraction: share of each group's incorrect rollouts to keep, in (0, 1]; default ``keep_fraction``.
        correct_threshold: a rollout is correct when its reward exceeds this.
    """

    def __init__(
        self,
        keep_fraction: float = 0.5,
        seed: int = 0,
        neg_fraction: float | None = None,
        correct_threshold: float = 0.5,
    ):
        self.keep_fraction = _check_fraction("keep_fraction", keep_fraction)
        self.neg_fraction = (
            self.keep_fraction if neg_fraction is None else _check_fraction("neg_fraction", neg_fraction)
        )
        if not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}.")
        if not math.isfinite(correct_threshold):
            raise ValueError(f"correct_threshold must be finite, got {correct_threshold}.")
        self.correct_threshold = float(correct_threshold)
        self.generator = torch.Generator().manual_seed(seed)
        self._metrics: dict[str, float] = {}

    def select(
        self, rewards: Tensor, hes: Tensor, lengths: Tensor | None = None, groups: int | Tensor | None = None
    ) -> Tensor:
        """Decide which rollouts to keep, ``[N]`` bool on the rewards' device.

        Args:
            rewards: ``[N]`` reward per rollout.
            hes: ``[N]`` HES per rollout (`high_entropy_sum`); only the correct rollouts' values are used for the
                decision, so incorrect ones may be NaN (unscored; left out of the HES metrics).
            lengths: optional ``[N]`` completion lengths, for the ``hes/length_corr`` and length metrics.
            groups: None (one group), an int G (rollouts come in consecutive groups of G, TRL's layout) or an ``[N]``
                tensor of group ids.
        """
        rewards = rewards.reshape(-1)
        hes_cpu = hes.detach().reshape(-1).float().cpu()
        N = rewards.numel()
        if hes_cpu.numel() != N:
            raise ValueError(f"hes must have one value per rollout ({N}), got {hes_cpu.numel()}.")
        if groups is None:
            gid = torch.zeros(N, dtype=torch.long)
        elif isinstance(groups, int):
            if groups < 1 or N % groups:
                raise ValueError(
                    f"groups as an int must be >= 1 and divide the number of rollouts ({N}), got {groups}."
                )
            gid = torch.arange(N) // groups
        else:
            gid = groups.reshape(-1).long().cpu()
            if gid.numel() != N:
                raise ValueError(f"groups must have one id per rollout ({N}), got {gid.numel()}.")
        correct = rewards.detach().float().cpu() > self.correct_threshold  # [N]
        keep = torch.zeros(N, dtype=torch.bool)
        for g in torch.unique(gid).tolist():  # sorted ids: a fixed order of RNG draws
            in_group = gid == g
            pos = (in_group & correct).nonzero().squeeze(1)
            neg = (in_group & ~correct).nonzero().squeeze(1)
            if pos.numel():
                n_pos = math.ceil(self.keep_fraction * pos.numel())
                order = torch.sort(hes_cpu[pos], descending=True, stable=True).indices
                keep[pos[order[:n_pos]]] = True
            if neg.numel():
                n_neg = math.ceil(self.neg_fraction * neg.numel())
                keep[neg[torch.randperm(neg.numel(), generator=self.generator)[:n_neg]]] = True
        self._record(keep, correct, hes_cpu, lengths)
        return keep.to(rewards.device)

    def _record(self, keep: Tensor, correct: Tensor, hes: Tensor, lengths: Tensor | None) -> None:
        def mean(x: Tensor) -> float:  # over the finite values (unscored rollouts carry NaN HES)
            x = x[torch.isfinite(x)]
            return float(x.mean()) if x.numel() else float("nan")

        m = {
            "hes/kept_fraction": mean(keep.float()),
            "hes/kept_correct": float((keep & correct).sum()),
            "hes/kept_incorrect": float((keep & ~correct).sum()),
            "hes/kept_hes_mean": mean(hes[keep]),
            "hes/dropped_hes_mean": mean(hes[~keep]),
            "hes/kept_correct_hes_mean": mean(hes[keep & correct]),
            "hes/dropped_correct_hes_mean": mean(hes[~keep & correct]),
        }
        if lengths is not None:
            length = lengths.detach().reshape(-1).float().cpu()
            scored = torch.isfinite(hes)
            m["hes/length_corr"] = pearson(hes[scored], length[scored])
            m["hes/kept_length_mean"] = mean(length[keep])
            m["hes/dropped_length_mean"] = mean(length[~keep])
        self._metrics = m

    def metrics(self) -> dict[str, float]:
        """Metrics of the last `select` (``hes/``; NaN where a set is empty)."""
        return dict(self._metrics)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.generator.get_state(), "metrics": dict(self._metrics)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["rng"])
        self._metrics = dict(state["metrics"])
