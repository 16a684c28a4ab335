"""ARRoL online pruning decisions as a :class:`~efficient_rlvr.pruning.engine.RolloutCallback`.

Algorithm (ARRoL, arXiv 2603.24840, Algorithm 1 and section 4; SPEC section 2), per generation call:

- When a rollout first has ``L_detect`` generated tokens (and did not finish in that step), the quality head scores
  the hidden state from which its ``L_detect``-th token was sampled; the calibrator maps the score to a survival
  probability ``p``; the rollout is pruned (aborted, so it stops with exactly ``L_detect`` tokens) with probability
  ``1 - p``. Rollouts that finish before or at ``L_detect`` are never pruned. Each rollout is decided once.
- A group never drops below ``min_survivors_per_group`` unpruned rollouts (rollouts that finished early count as
  survivors); a prune that would break this is turned into a keep ("forced keep").
- Cold start: while ``calibrator.ready`` is false nothing is pruned (every decision is a keep); the head and the
  calibrator still learn from every finished rollout.
- Candidates reaching ``L_detect`` in the same engine step are scored in one batch, in prompt order, and the uniform
  draws come from the callback's own ``torch.Generator``, so decisions are reproducible and resumable.

Learning (:meth:`OnlinePruningCallback.observe`, once per training step after rewards are known): the finished,
unpruned rollouts of the last generation give BCE training pairs to the head at generated lengths
``min(L_detect, len)`` and ``len`` (hidden states recorded during generation, no extra forward pass); their
detect-position scores under the head *before* this update (out of sample, as the pruning decisions saw them) and
their labels go to the calibrator's buffer, then the calibrator refits. Pruned rollouts are never used.

Notes on the rule as specified: ``p = clip(kappa + delta + lambda (rho - q), ...)`` does not look at the group, so it
always favours rollouts with low ``q``: it moves a group's expected kept positive ratio toward ``rho`` when the
group's mean ``q`` is above ``rho`` (Lemma 4.1's case) and away from it when below. Lemma 4.1 itself needs the prune
not to overshoot ``rho`` (e.g. ``q = (1.0, 0.2)``, ``rho = 0.5``: dropping the first moves the mean from 0.6 to 0.2).
"""

from __future__ import annotations

import copy
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from efficient_rlvr.pruning.calibration import BinnedCalibrator
from efficient_rlvr.pruning.engine import RolloutCallback, RolloutRequest, RolloutResult, RolloutStep
from efficient_rlvr.pruning.head import QualityHead, QualityHeadTrainer, roc_auc

__all__ = ["OnlinePruningCallback", "PruneDecision"]


@dataclass(frozen=True)
class PruneDecision:
    """One pruning decision (taken when the rollout first reached ``L_detect`` tokens)."""

    request_id: str
    index: int
    group_id: Hashable
    length: int
    score: float
    posterior: float
    survival_probability: float
    draw: float
    pruned: bool
    forced_keep: bool
    cold_start: bool


class OnlinePruningCallback(RolloutCallback):
    """Online rollout pruning of ARRoL (see the module docstring).

    Args:
        head: the quality head, or a :class:`QualityHeadTrainer` wrapping it (required for :meth:`observe`).
        calibrator: the :class:`BinnedCalibrator` giving survival probabilities.
        l_detect: generated length at which a rollout is scored and maybe pruned (>= 1; 512 in the paper).
        min_survivors_per_group: unpruned rollouts every group keeps at least (>= 1; at least 2 keep a group's
            advantage defined).
        rng: a CPU ``torch.Generator``, an int seed, or None (seed 0).
        reward_threshold: labels for :meth:`observe` are ``reward > reward_threshold`` (used when ``head`` is a bare
            :class:`QualityHead`; a trainer brings its own).
        mode: ``"arrol"`` (survival probability from the calibrated head) or ``"random"`` (every candidate survives
            with probability ``calibrator.kappa``: the paper's random-pruning ablation; the head still learns).
    """

    needs_hidden_states = True

    def __init__(
        self,
        head: QualityHead | QualityHeadTrainer,
        calibrator: BinnedCalibrator,
        l_detect: int = 512,
        min_survivors_per_group: int = 2,
        rng: torch.Generator | int | None = None,
        reward_threshold: float = 0.5,
        mode: str = "arrol",
    ):
        if isinstance(head, QualityHeadTrainer):
            self.trainer: QualityHeadTrainer | None = head
            self.head = head.head
        elif isinstance(head, QualityHead):
            self.trainer = None
            self.head = head
        else:
            raise ValueError(f"head must be a QualityHead or QualityHeadTrainer, got {type(head).__name__}")
        if not isinstance(calibrator, BinnedCalibrator):
            raise ValueError(f"calibrator must be a BinnedCalibrator, got {type(calibrator).__name__}")
        if not isinstance(l_detect, int) or l_detect < 1:
            raise ValueError(f"l_detect must be an int >= 1, got {l_detect!r}")
        if not isinstance(min_survivors_per_group, int) or min_survivors_per_group < 1:
            raise ValueError(f"min_survivors_per_group must be an int >= 1, got {min_survivors_per_group!r}")
        if isinstance(rng, torch.Generator):
            if rng.device.type != "cpu":
                raise ValueError(f"rng must be a CPU torch.Generator, got one on {rng.device}")
            self.rng = rng
        elif rng is None or isinstance(rng, int):
            self.rng = torch.Generator().manual_seed(0 if rng is None else rng)
        else:
            raise ValueError(f"rng must be a torch.Generator, an int seed or None, got {type(rng).__name__}")
        if mode not in ("arrol", "random"):
            raise ValueError(f"mode must be 'arrol' or 'random', got {mode!r}")
        self.mode = mode
        self.calibrator = calibrator
        self.l_detect = l_detect
        self.min_survivors_per_group = min_survivors_per_group
        self.reward_threshold = float(reward_threshold if self.trainer is None else self.trainer.reward_threshold)
        self.num_generations = 0
        self.num_observed_steps = 0
        self.total_pruned = 0
        self.total_rollouts = 0
        self._reset_generation()
        self._generation_metrics: dict[str, float] = {}
        self._observe_metrics: dict[str, float] = {}
        self.last_scores = torch.zeros(0)  # [N] out-of-sample detect scores of the last learn() call
        self.last_labels = torch.zeros(0)  # [N] their labels

    # ------------------------------------------------------------------------------------------------------------
    def _reset_generation(self) -> None:
        self._requests: dict[str, RolloutRequest] = {}
        self._alive: dict[Hashable, int] = {}
        self._decisions: dict[str, PruneDecision] = {}
        self._detect_states: dict[str, torch.Tensor] = {}  # request id -> [H]
        self._last_states: dict[str, torch.Tensor] = {}  # request id -> [H]
        self._lengths: dict[str, int] = {}

    @property
    def decisions(self) -> list[PruneDecision]:
        """Decisions of the current / last generation, in the order they were taken."""
        return list(self._decisions.values())

    @property
    def pruned_ids(self) -> set[str]:
        """Request ids pruned in the current / last generation."""
        return {d.request_id for d in self._decisions.values() if d.pruned}

    def on_generation_start(self, requests: Sequence[RolloutRequest]) -> None:
        """Remember the requests and their groups; forget the previous generation."""
        self._reset_generation()
        for request in requests:
            self._requests[request.request_id] = request
            self._alive[request.group_id] = self._alive.get(request.group_id, 0) + 1

    def on_step(self, step: RolloutStep) -> list[str]:
        """Record hidden states, decide rollouts that reached ``L_detect``; return the ids to abort."""
        candidates = []
        for rollout in step.rollouts:
            request_id = rollout.request_id
            if request_id not in self._requests:
                continue
            length = len(rollout.token_ids)
            if rollout.finished:
                state = self._require_state(rollout.hidden_state, request_id)
                self._last_states[request_id] = state.clone()
                self._detect_states.setdefault(request_id, self._last_states[request_id])
                self._lengths[request_id] = length
            elif length >= self.l_detect and request_id not in self._decisions:
                candidates.append(rollout)
        if not candidates:
            return []
        candidates.sort(key=lambda r: r.index)
        states = torch.stack([self._require_state(r.hidden_state, r.request_id) for r in candidates])  # [M, H]
        scores = self.head.score(states)  # [M]
        cold = not self.calibrator.ready
        posterior = self.calibrator.posterior(scores)  # [M]
        if cold:
            survival = torch.ones_like(scores)
        elif self.mode == "random":
            survival = torch.full_like(scores, self.calibrator.kappa)
        else:
            survival = self.calibrator.survival_probabilities(scores)  # [M]
        draws = torch.rand(len(candidates), generator=self.rng, dtype=torch.float64)  # [M]
        to_abort = []
        for j, rollout in enumerate(candidates):
            request = self._requests[rollout.request_id]
            prune = bool(draws[j].item() >= survival[j].item())
            forced = prune and self._alive[request.group_id] - 1 < self.min_survivors_per_group
            prune = prune and not forced
            if prune:
                self._alive[request.group_id] -= 1
                to_abort.append(rollout.request_id)
            self._detect_states[rollout.request_id] = states[j].clone()
            self._decisions[rollout.request_id] = PruneDecision(
                request_id=rollout.request_id,
                index=rollout.index,
                group_id=request.group_id,
                length=len(rollout.token_ids),
                score=float(scores[j]),
                posterior=float(posterior[j]),
                survival_probability=float(survival[j]),
                draw=float(draws[j]),
                pruned=prune,
                forced_keep=forced,
                cold_start=cold,
            )
        return to_abort

    @staticmethod
    def _require_state(state: torch.Tensor | None, request_id: str) -> torch.Tensor:
        if state is None:
            raise RuntimeError(f"no hidden state for {request_id}: the engine must capture hidden states")
        return state.detach()

    def on_generation_end(self, result: RolloutResult) -> None:
        """Summarise the generation into ``pruning/`` metrics."""
        self.num_generations += 1
        decisions = list(self._decisions.values())
        pruned = [d for d in decisions if d.pruned]
        num = len(result.request_ids)
        self.total_pruned += len(pruned)
        self.total_rollouts += num
        lengths = {rid: len(c) for rid, c in zip(result.request_ids, result.completion_ids, strict=True)}
        saved = self._tokens_not_generated(decisions, lengths)
        generated = result.num_generated_tokens
        self._generation_metrics = {
            "pruning/pruned_fraction": len(pruned) / num if num else 0.0,
            "pruning/decided_fraction": len(decisions) / num if num else 0.0,
            "pruning/keep_rate": 1.0 - len(pruned) / len(decisions) if decisions else 1.0,
            "pruning/forced_keeps": float(sum(d.forced_keep for d in decisions)),
            "pruning/mean_survival_probability": (
                sum(d.survival_probability for d in decisions) / len(decisions) if decisions else float("nan")
            ),
            "pruning/mean_score": sum(d.score for d in decisions) / len(decisions) if decisions else float("nan"),
            "pruning/tokens_generated": float(generated),
            "pruning/tokens_not_generated_estimate": saved,
            "pruning/tokens_saved_fraction_estimate": saved / (saved + generated) if saved + generated else 0.0,
            "pruning/hook_seconds": float(result.hook_seconds),
            "pruning/callback_seconds": float(result.callback_seconds),
            "pruning/generation_seconds": float(result.seconds),
            "pruning/cold_start": float(not self.calibrator.ready),
        }

    def _tokens_not_generated(self, decisions: list[PruneDecision], lengths: Mapping[str, int]) -> float:
        # A pruned rollout would have run as long as the kept rollouts of its group that passed L_detect (mean final
        # length); without any, as those of the whole batch; without any, up to its max_tokens.
        kept_long = [d for d in decisions if not d.pruned and d.request_id in lengths]
        by_group: dict[Hashable, list[int]] = {}
        for d in kept_long:
            by_group.setdefault(d.group_id, []).append(lengths[d.request_id])
        all_kept = [lengths[d.request_id] for d in kept_long]
        saved = 0.0
        for d in decisions:
            if not d.pruned:
                continue
            pool = by_group.get(d.group_id) or all_kept
            if pool:
                estimate = sum(pool) / len(pool)
            else:
                max_tokens = self._requests[d.request_id].max_tokens
                estimate = float(max_tokens) if max_tokens is not None else float(d.length)
            saved += max(0.0, estimate - d.length)
        return saved

    # ------------------------------------------------------------------------------------------------------------
    def training_batch(
        self, rewards: Mapping[str, float] | Sequence[float], request_ids: Sequence[str] | None = None
    ) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]:
        """The finished, unpruned rollouts of the last generation that have a (non-NaN) reward.

        Args:
            rewards: reward per request id (a mapping), or a sequence aligned with ``request_ids``.
            request_ids: required when ``rewards`` is a sequence (e.g. ``result.request_ids``).

        Returns:
            ``(ids, detect_states [N, H], last_states [N, H], rewards [N] float32)``.
        """
        if not isinstance(rewards, Mapping):
            if request_ids is None or len(request_ids) != len(rewards):
                raise ValueError("a reward sequence needs request_ids of the same length")
            rewards = dict(zip(request_ids, rewards, strict=True))
        ids = [
            rid
            for rid in self._requests
            if rid in self._last_states
            and rid in rewards
            and rewards[rid] is not None
            and rewards[rid] == rewards[rid]  # not NaN
        ]
        if not ids:
            width = self.head.hidden_size
            empty = torch.zeros(0, width)
            return [], empty, empty.clone(), torch.zeros(0)
        detect = torch.stack([self._detect_states[rid] for rid in ids])  # [N, H]
        last = torch.stack([self._last_states[rid] for rid in ids])  # [N, H]
        values = torch.tensor([float(rewards[rid]) for rid in ids], dtype=torch.float32)  # [N]
        return ids, detect, last, values

    def observe(
        self, rewards: Mapping[str, float] | Sequence[float], request_ids: Sequence[str] | None = None
    ) -> dict[str, float]:
        """Learn from the last generation's rewards: train the head, fill the calibrator, refit it.

        Call once per training step (after the rewards of the generation are known, before the next generation).
        Needs ``head`` to be a :class:`QualityHeadTrainer`. Same as ``learn(*training_batch(...)[1:])``.
        """
        if self.trainer is None:
            raise RuntimeError("observe() trains the head: construct the callback with a QualityHeadTrainer")
        _, detect, last, values = self.training_batch(rewards, request_ids)
        return self.learn(detect, last, values)

    def learn(self, detect_states: torch.Tensor, last_states: torch.Tensor, rewards: torch.Tensor) -> dict[str, float]:
        """Learn from given finished rollouts (e.g. gathered from every process): head step, buffer, refit.

        Args:
            detect_states: ``[N, H]`` hidden states at generated length ``min(L_detect, len)``.
            last_states: ``[N, H]`` hidden states at the last generated token.
            rewards: ``[N]`` rewards (labels are ``reward > reward_threshold``).

        The detect-position scores under the head *before* this update (out of sample) and the labels go to the
        calibrator; they are also kept in :attr:`last_scores` / :attr:`last_labels` and summarised as
        ``pruning/head_auc``. The calibrator is refitted (one refit per call, also with ``N == 0``).
        """
        if self.trainer is None:
            raise RuntimeError("learn() trains the head: construct the callback with a QualityHeadTrainer")
        values = torch.as_tensor(rewards).detach().reshape(-1).float().cpu()
        metrics: dict[str, float] = {"pruning/head_examples": float(values.numel())}
        self.last_scores = torch.zeros(0)
        self.last_labels = torch.zeros(0)
        if values.numel():
            scores = self.head.score(detect_states).cpu()  # [N], before the update
            labels = self.trainer.labels(values)  # [N]
            metrics.update(self.trainer.observe(detect_states, last_states, values))
            metrics["pruning/head_auc"] = roc_auc(scores, labels)
            self.calibrator.observe(scores, labels)
            self.last_scores, self.last_labels = scores, labels
        self.calibrator.refit()
        self.num_observed_steps += 1
        metrics.update(self.calibrator.metrics())
        self._observe_metrics = metrics
        return dict(metrics)

    # ------------------------------------------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """Metrics of the last generation and the last :meth:`observe` (``pruning/`` namespace)."""
        out = {
            **self._generation_metrics,
            **self._observe_metrics,
            "pruning/total_pruned_fraction": self.total_pruned / self.total_rollouts if self.total_rollouts else 0.0,
        }
        out.update(self.calibrator.metrics())
        return out

    def state_dict(self) -> dict[str, Any]:
        """RNG, counters, head (and its optimizer) and calibrator: everything the next decisions depend on.

        Meant to be taken between training steps; the hidden states recorded during a generation are not included.
        """
        return {
            "rng_state": self.rng.get_state(),
            "l_detect": self.l_detect,
            "min_survivors_per_group": self.min_survivors_per_group,
            "num_generations": self.num_generations,
            "num_observed_steps": self.num_observed_steps,
            "total_pruned": self.total_pruned,
            "total_rollouts": self.total_rollouts,
            "head": self.trainer.state_dict() if self.trainer is not None else copy.deepcopy(self.head.state_dict()),
            "calibrator": self.calibrator.state_dict(),
            "last_decisions": [asdict(d) for d in self._decisions.values()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.rng.set_state(state["rng_state"])
        self.l_detect = int(state["l_detect"])
        self.min_survivors_per_group = int(state["min_survivors_per_group"])
        self.num_generations = int(state["num_generations"])
        self.num_observed_steps = int(state["num_observed_steps"])
        self.total_pruned = int(state["total_pruned"])
        self.total_rollouts = int(state["total_rollouts"])
        if self.trainer is not None:
            self.trainer.load_state_dict(state["head"])
        else:
            self.head.load_state_dict(state["head"])
        self.calibrator.load_state_dict(state["calibrator"])
        self._reset_generation()
