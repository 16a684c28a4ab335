"""The pruning gate: prune only while the quality head ranks the rollouts of one prompt (namespace `pruning/`).

ARRoL's pruning pays only if the head tells, among a prompt's rollouts, which will be right; a head that has learnt
prompt difficulty alone (high overall AUC, within-group AUC ~0.5) prunes at random, which costs rollouts and makes
groups less balanced. `HeadGate` keeps the within-group AUC (`efficient_rlvr.pruning.head.within_group_auc`) of the
head's out-of-sample ``L_detect`` scores on the finished, unpruned rollouts of the last ``window`` training steps
(every group with both labels counts once) and is open while their mean is at least ``min_auc`` and rests on at
least ``min_groups`` groups. While it is closed, `OnlinePruningCallback` keeps every rollout (``pruning/gated`` = 1);
the head and the calibrator go on learning, so the gate reopens when the head starts to rank. ``min_auc = 0``
disables the gate.

Bias to know: the rollouts it is measured on are the unpruned ones, i.e. those the head already favoured when it
pruned; while the gate is closed (no pruning) the estimate is unbiased.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch

from .head import within_group_auc

__all__ = ["HeadGate"]


class HeadGate:
    """Open while the head's smoothed within-group AUC is at least ``min_auc`` (module docstring).

    Args:
        min_auc: threshold in [0, 1); 0 = always open.
        window: training steps whose groups enter the estimate (>= 1).
        min_groups: mixed groups the estimate needs before the gate can open (>= 1).
    """

    def __init__(self, min_auc: float = 0.0, window: int = 10, min_groups: int = 8):
        if not 0.0 <= float(min_auc) < 1.0:
            raise ValueError(f"min_auc must be in [0, 1), got {min_auc}")
        if int(window) < 1 or int(min_groups) < 1:
            raise ValueError(f"window and min_groups must be >= 1, got {window} and {min_groups}")
        self.min_auc = float(min_auc)
        self.window = int(window)
        self.min_groups = int(min_groups)
        self._steps: deque[list[float]] = deque(maxlen=self.window)  # per step: the AUC of each mixed group
        self._last: dict[str, float] = {}
        self.closed_generations = 0

    @property
    def auc(self) -> float:
        """Mean within-group AUC over the window's mixed groups (NaN without any)."""
        values = [a for step in self._steps for a in step]
        return sum(values) / len(values) if values else float("nan")

    @property
    def groups(self) -> int:
        return sum(len(step) for step in self._steps)

    @property
    def open(self) -> bool:
        if self.min_auc == 0.0:
            return True
        return self.groups >= self.min_groups and self.auc >= self.min_auc

    def observe(self, scores: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor | list) -> None:
        """Add one training step's finished rollouts: out-of-sample ``L_detect`` scores, labels, group ids."""
        mean, se, n, per_group = within_group_auc(scores, labels, groups)
        self._steps.append(per_group)
        self._last = {
            "pruning/head_within_group_auc": mean,
            "pruning/head_within_group_auc_se": se,
            "pruning/head_within_group_groups": float(n),
        }

    def count_generation(self, gated: bool) -> None:
        self.closed_generations += int(gated)

    def metrics(self) -> dict[str, float]:
        """The step's within-group AUC and SE, the smoothed AUC the gate reads, and whether it is open."""
        return {
            **self._last,
            "pruning/gate_auc": self.auc,
            "pruning/gate_groups": float(self.groups),
            "pruning/gate_open": float(self.open),
            "pruning/gated_generations_total": float(self.closed_generations),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "min_auc": self.min_auc,
            "window": self.window,
            "min_groups": self.min_groups,
            "steps": [list(step) for step in self._steps],
            "last": dict(self._last),
            "closed_generations": self.closed_generations,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.min_auc, self.window, self.min_groups = (
            float(state["min_auc"]),
            int(state["window"]),
            int(state["min_groups"]),
        )
        self._steps = deque((list(step) for step in state["steps"]), maxlen=self.window)
        self._last = dict(state["last"])
        self.closed_generations = int(state["closed_generations"])
