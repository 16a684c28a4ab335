"""DAPO-style dynamic sampling: a post-rollout gate that drops groups whose rewards have zero variance.

A group whose G rewards are all equal has GRPO advantage 0 for every rollout and teaches nothing; DAPO drops such
groups after rollout and draws more prompts until the batch is full ("refill"); a refill never repeats a prompt
already in the step (`DynamicSamplingStage._draw_fresh` in stage.py). The gate decides on the range
max(r) - min(r) of a group's valid rewards (`None`/NaN ignored): the group is kept if the range is > `tolerance`.
With `tolerance = 0` this is exactly "variance > 0" and, unlike a computed standard deviation, has no rounding.
A group with fewer than two valid rewards has no variance to learn from and is dropped.

This gate spends the rollouts first and then discards them; HIVE's stages 1 and 2 (history.py, entropy.py) try to
avoid rolling such groups out at all. The gate's metrics show how much is still wasted.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import RewardGroups, iter_groups

_COUNTERS = ("groups", "groups_dropped", "refills")


class ZeroVarianceGate:
    """Keeps the groups whose reward range exceeds `tolerance` (>= 0), and counts drops and refills.

    Metrics (`selection/dynamic/...`): the counts of the most recent step that gated anything (closed by
    `on_step_end`) and cumulative totals.
    """

    def __init__(self, tolerance: float = 0.0):
        if not tolerance >= 0.0:
            raise ValueError(f"tolerance must be >= 0, got {tolerance}.")
        self.tolerance = float(tolerance)
        self._window = dict.fromkeys(_COUNTERS, 0)
        self._last = dict.fromkeys(_COUNTERS, 0)
        self._totals = dict.fromkeys(_COUNTERS, 0)

    def keep_mask(self, group_rewards: RewardGroups) -> torch.Tensor:
        """Boolean `[N]` (CPU): True for the groups with reward range > tolerance."""
        keep = [len(r) >= 2 and max(r) - min(r) > self.tolerance for r in iter_groups(group_rewards)]
        dropped = keep.count(False)
        self._add("groups", len(keep))
        self._add("groups_dropped", dropped)
        return torch.tensor(keep, dtype=torch.bool)

    def refill_needed(self, kept_groups: int, target_groups: int) -> int:
        """How many more groups the batch needs (`target - kept`, at least 0); a positive answer counts a refill."""
        if kept_groups < 0 or target_groups < 0:
            raise ValueError(f"kept_groups and target_groups must be >= 0, got {kept_groups}, {target_groups}.")
        missing = max(0, target_groups - kept_groups)
        if missing:
            self._add("refills", 1)
        return missing

    def _add(self, name: str, value: int) -> None:
        self._window[name] += value
        self._totals[name] += value

    def on_step_end(self) -> None:
        if self._window["groups"] > 0:
            self._last = self._window
        self._window = dict.fromkeys(_COUNTERS, 0)

    def state_dict(self) -> dict[str, Any]:
        return {"window": dict(self._window), "last": dict(self._last), "totals": dict(self._totals)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._window = dict(state["window"])
        self._last = dict(state["last"])
        self._totals = dict(state["totals"])

    def metrics(self) -> dict[str, float]:
        prefix = "selection/dynamic/"
        out = {prefix + name: float(value) for name, value in self._last.items()}
        out.update({prefix + name + "_total": float(value) for name, value in self._totals.items()})
        return out
