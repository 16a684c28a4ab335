"""The prompt-selector interface shared by the HIVE stages, and the chain that runs them in order.

A selector sees a list of `Candidate`s (a stable prompt key plus the dataset index) before any rollout and returns
the ones to keep. After rollouts it is told each rolled-out group's rewards (`observe`), and after every optimizer
step it may update itself (`on_step_end`). Everything it needs to repeat its next decisions exactly, RNG state
included, is in `state_dict()`; `metrics()` returns floats under the `selection/` namespace.

Reward groups are accepted in the shapes the trainer has at hand: a `[N, G]` tensor, a list of `N` tensors or lists
(groups may differ in size, e.g. after rollout pruning). `None` and NaN rewards are unknown (a pruned rollout, or one
dropped before scoring): `iter_groups` drops them, `iter_group_entries` also says how many entries the group had, so
a selector can tell a complete group from one with unknown rollouts (SPEC: a visit is classified on all G rollouts).
A group without any valid reward is treated as not observed.
"""

from __future__ import annotations

import hashlib
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

RewardGroups = torch.Tensor | Sequence[torch.Tensor | Sequence[float | None]]


@dataclass(frozen=True, slots=True)
class Candidate:
    """A prompt that may be rolled out: `key` identifies the prompt across epochs, `index` is its dataset row."""

    key: str
    index: int


def prompt_key(prompt: Any) -> str:
    """A stable key for a prompt: BLAKE2b (16-byte hex digest) of the text, or of the canonical JSON of a
    conversational prompt (a list of `{"role": ..., "content": ...}` messages). Identical on every process."""
    text = prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def valid_rewards(group: torch.Tensor | Sequence[float | None]) -> list[float]:
    """The finite rewards of one group as Python floats (`None` and NaN dropped)."""
    if isinstance(group, torch.Tensor):
        group = group.detach().reshape(-1).float().cpu().tolist()
    return [float(r) for r in group if r is not None and not math.isnan(float(r))]


def iter_groups(group_rewards: RewardGroups) -> list[list[float]]:
    """Split `group_rewards` (`[N, G]` tensor or a sequence of N groups) into N lists of valid rewards."""
    if isinstance(group_rewards, torch.Tensor):
        if group_rewards.dim() != 2:
            raise ValueError(f"group_rewards as a tensor must be [N, G], got shape {tuple(group_rewards.shape)}.")
        group_rewards = group_rewards.detach().float().cpu()  # [N, G]
    return [valid_rewards(group) for group in group_rewards]


def iter_group_entries(group_rewards: RewardGroups) -> list[tuple[list[float], int]]:
    """Like `iter_groups`, with each group's number of entries (valid or not): N pairs (valid rewards, entries)."""
    if isinstance(group_rewards, torch.Tensor):
        if group_rewards.dim() != 2:
            raise ValueError(f"group_rewards as a tensor must be [N, G], got shape {tuple(group_rewards.shape)}.")
        group_rewards = group_rewards.detach().float().cpu()  # [N, G]
    out = []
    for group in group_rewards:
        entries = group.numel() if isinstance(group, torch.Tensor) else len(group)
        out.append((valid_rewards(group), int(entries)))
    return out


def rollouts_saved(skipped_prompts: int, num_generations: int) -> int:
    """Rollouts not generated because `skipped_prompts` prompts were not rolled out: `skipped_prompts * G`."""
    if skipped_prompts < 0:
        raise ValueError(f"skipped_prompts must be >= 0, got {skipped_prompts}.")
    if num_generations < 1:
        raise ValueError(f"num_generations must be >= 1, got {num_generations}.")
    return skipped_prompts * num_generations


class Selector(ABC):
    """A pre-rollout prompt filter. Subclasses implement `select`; the other hooks default to no-ops."""

    @abstractmethod
    def select(self, candidates: Sequence[Candidate]) -> list[Candidate]:
        """Return the candidates to keep, in their input order."""

    def observe(self, keys: Sequence[str], group_rewards: RewardGroups) -> None:  # noqa: B027
        """Record the rewards of finished groups (`keys[i]` owns `group_rewards[i]`)."""

    def on_step_end(self) -> None:  # noqa: B027
        """Called once after every optimizer step."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027
        pass

    def metrics(self) -> dict[str, float]:
        return {}


class SelectorChain(Selector):
    """Runs its stages in order (stage 1's survivors are stage 2's candidates) and forwards every other hook.

    Metrics are the union of the stages' metrics (their keys must not collide) plus, for the whole chain,
    `selection/candidates` and `selection/selected` (last `select` call), `selection/rejected_total` and, when
    `num_generations` is given, `selection/rollouts_saved_total` = rejected prompts x `num_generations`: the
    rollouts a trainer that rolls out every drawn candidate would have generated on top.
    """

    def __init__(self, stages: Sequence[Selector], num_generations: int | None = None):
        if len(stages) == 0:
            raise ValueError("stages must hold at least one Selector, got none.")
        for stage in stages:
            if not isinstance(stage, Selector):
                raise ValueError(f"stages must be Selector instances, got {type(stage).__name__}.")
        if num_generations is not None and num_generations < 1:
            raise ValueError(f"num_generations must be >= 1 or None, got {num_generations}.")
        self.stages = list(stages)
        self.num_generations = num_generations
        self._last_candidates = 0
        self._last_selected = 0
        self._rejected_total = 0

    def select(self, candidates: Sequence[Candidate]) -> list[Candidate]:
        kept = list(candidates)
        for stage in self.stages:
            kept = stage.select(kept) if kept else []
        self._last_candidates = len(candidates)
        self._last_selected = len(kept)
        self._rejected_total += len(candidates) - len(kept)
        return kept

    def observe(self, keys: Sequence[str], group_rewards: RewardGroups) -> None:
        for stage in self.stages:
            stage.observe(keys, group_rewards)

    def on_step_end(self) -> None:
        for stage in self.stages:
            stage.on_step_end()

    def state_dict(self) -> dict[str, Any]:
        return {
            "stages": [stage.state_dict() for stage in self.stages],
            "rejected_total": self._rejected_total,
            "last_candidates": self._last_candidates,
            "last_selected": self._last_selected,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["stages"]) != len(self.stages):
            raise ValueError(f"state has {len(state['stages'])} stages, this chain has {len(self.stages)}.")
        for stage, stage_state in zip(self.stages, state["stages"], strict=True):
            stage.load_state_dict(stage_state)
        self._rejected_total = int(state["rejected_total"])
        self._last_candidates = int(state["last_candidates"])
        self._last_selected = int(state["last_selected"])

    def metrics(self) -> dict[str, float]:
        merged: dict[str, float] = {}
        for stage in self.stages:
            stage_metrics = stage.metrics()
            clash = merged.keys() & stage_metrics.keys()
            if clash:
                raise ValueError(f"two stages report the same metric keys: {sorted(clash)}.")
            merged.update(stage_metrics)
        merged["selection/candidates"] = float(self._last_candidates)
        merged["selection/selected"] = float(self._last_selected)
        merged["selection/rejected_total"] = float(self._rejected_total)
        if self.num_generations is not None:
            merged["selection/rollouts_saved_total"] = float(
                rollouts_saved(self._rejected_total, self.num_generations)
            )
        return merged
