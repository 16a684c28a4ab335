"""ARRoL online pruning decisions as a :class:`~efficient_rlvr.pruning.engine.RolloutCallback`.

Algorithm (ARRoL, arXiv 2603.24840, Algorithm 1 and section 4; SPEC section 2 with its correction), per generation:

- When a rollout first has ``L_detect`` generated tokens (and did not finish in that step), the quality head scores
  the hidden state from which its ``L_detect``-th token was sampled. Rollouts that finish before or at ``L_detect``
  are never pruned. Each rollout is decided once, and decisions are taken per group: a group's waiting rollouts are
  decided together once none of its members is still running short of ``L_detect``. Members the scheduler did not
  run in this engine step (preempted, or not scheduled yet) are not waited for; they are decided alone when they
  reach ``L_detect``. All members start together, so a group normally reaches ``L_detect`` in one engine step; a
  member that lags by a few steps (e.g. its prefill was chunked into a later step) holds the group back that many
  steps, and the waiting rollouts keep generating meanwhile (a pruned one then stops a few tokens after
  ``L_detect``; its score is still the one at ``L_detect``). A waiting rollout that finishes is not pruned.
- Scorer (``scorer``): ``"head"`` as above; ``"confidence"`` scores the rollout by DeepConf's trace confidence of
  its sampled tokens so far (`efficient_rlvr.pruning.confidence`: exp of the lowest 4-token mean log-prob, from the
  log-probs vLLM returns with each step), in place of the head's score wherever the head's score is used below
  (decisions, group means, calibrator, gate); no hidden state is captured and nothing is trained. A deviation from
  ARRoL, which trains its head: on the embedded task the head does not rank the rollouts of one prompt and the
  trace confidence does (``docs/head/head.json``).
- Survival probability (calibrator's ``survival_rule``; default ``"group_relative"``):
  ``p_i = clip(kappa + delta + lambda sign(q_bar_g - rho) (q_bar_g - q_i), p_min, p_max)`` with ``q_i`` the calibrated
  posterior of the score and ``q_bar_g`` the mean ``q`` over the group's known members: those being decided and
  those decided before (scored at ``L_detect``) and the finished ones (scored at their last token); members not yet
  at ``L_detect`` and not running are left out. ``delta`` is solved by bisection over the rollouts decided in the same
  engine step so that their mean ``p`` is ``kappa``. ``"literal"`` uses the appendix's ``lambda (rho - q_i)``
  instead (``rho`` cancels there). The rollout is pruned (aborted) with probability ``1 - p``.
- A group never drops below ``min_survivors_per_group`` unpruned rollouts (rollouts that finished early count as
  survivors); a prune that would break this is turned into a keep ("forced keep"). The floor raises the realised
  keep rate above ``kappa`` where it binds (small groups, low ``kappa``).
- Cold start: while ``calibrator.ready`` is false nothing is pruned (every decision is a keep); the head and the
  calibrator still learn. ``mode="random"`` keeps every decided rollout with probability ``kappa``.
- Gate (``gate``, a :class:`~efficient_rlvr.pruning.gate.HeadGate`; ``mode="arrol"`` only): while the head's smoothed
  within-group AUC on recent finished rollouts is below the gate's threshold, every decided rollout is kept (like
  the cold start: ``PruneDecision.gated``, not counted in the realised keep rate) and ``pruning/gated`` is 1.
- Rollouts decided in the same engine step are scored in one batch, in prompt order, and the uniform draws come
  from the callback's own ``torch.Generator``, so decisions are reproducible and resumable.

Learning (:meth:`OnlinePruningCallback.observe`, once per training step after rewards are known): the finished,
unpruned rollouts of the last generation give BCE training pairs to the head at generated lengths
``min(L_detect, len)`` and ``len`` (hidden states recorded during generation, no extra forward pass). The calibrator's
buffer gets only those that reached ``L_detect`` (``len >= L_detect``), with their ``L_detect`` scores under the head
*before* this update (out of sample, as the pruning decisions saw them) and their labels; then it refits. Pruned
rollouts are never used (no label).

Metrics include ``pruning/realised_keep_rate``: survivors over decided rollouts (after the cold start), cumulative.
"""

from __future__ import annotations

import copy
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from efficient_rlvr.pruning.calibration import BinnedCalibrator
from efficient_rlvr.pruning.confidence import CONFIDENCE_FEATURES, confidence_features, confidence_score
from efficient_rlvr.pruning.engine import RolloutCallback, RolloutRequest, RolloutResult, RolloutStep
from efficient_rlvr.pruning.gate import HeadGate
from efficient_rlvr.pruning.head import QualityHead, QualityHeadTrainer, roc_auc, within_group_auc

__all__ = ["SCORERS", "OnlinePruningCallback", "PruneDecision"]

SCORERS = ("head", "confidence")


@dataclass(frozen=True)
class PruneDecision:
    """One pruning decision, taken once the rollout and its group reached ``L_detect`` (module docstring).

    ``length`` is the rollout's generated length at the decision (``L_detect`` unless its group waited for a
    lagging member; a pruned rollout stops there); ``score`` / ``posterior`` are its values at ``L_detect``;
    ``group_mean`` is the group's ``q_bar``; ``survival_probability`` the ``p`` the draw was compared with (1 in the
    cold start, ``kappa`` in random mode); ``arrol_probability`` the calibrated rule's ``p`` (also in the cold start
    and in random mode, for diagnostics); ``delta`` the bisection's ``delta`` of the decision batch; ``gated``: kept
    because the gate was closed.
    """

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
    group_mean: float = float("nan")
    arrol_probability: float = float("nan")
    delta: float = float("nan")
    gated: bool = False


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
        gate: a :class:`HeadGate` that stops ``"arrol"`` pruning while the head does not rank within groups; None:
            no gate. :meth:`learn` feeds it when given the rollouts' groups.
        scorer: ``"head"`` (the quality head on the hidden state) or ``"confidence"`` (DeepConf's trace confidence of
            the sampled tokens so far, `efficient_rlvr.pruning.confidence`: no hidden states are captured, the head is
            not trained, and the "states" recorded at ``L_detect`` and at the last token are the ``[2]``
            `confidence_features`; the calibrator, the survival rule and the gate are the same).
    """

    def __init__(
        self,
        head: QualityHead | QualityHeadTrainer,
        calibrator: BinnedCalibrator,
        l_detect: int = 512,
        min_survivors_per_group: int = 2,
        rng: torch.Generator | int | None = None,
        reward_threshold: float = 0.5,
        mode: str = "arrol",
        gate: HeadGate | None = None,
        scorer: str = "head",
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
        if scorer not in SCORERS:
            raise ValueError(f"scorer must be one of {SCORERS}, got {scorer!r}")
        self.scorer = scorer
        self.needs_hidden_states = scorer == "head"  # the engine captures hidden states only when asked
        self.gate = gate if gate is not None else HeadGate(0.0)
        self.calibrator = calibrator
        self.l_detect = l_detect
        self.min_survivors_per_group = min_survivors_per_group
        self.reward_threshold = float(reward_threshold if self.trainer is None else self.trainer.reward_threshold)
        self.num_generations = 0
        self.num_observed_steps = 0
        self.total_pruned = 0
        self.total_rollouts = 0
        self.total_decided = 0  # decisions after the cold start
        self.total_decided_kept = 0
        self._reset_generation()
        self._generation_metrics: dict[str, float] = {}
        self._observe_metrics: dict[str, float] = {}
        self.last_scores = torch.zeros(0)  # [N] out-of-sample detect scores of the last learn() call
        self.last_labels = torch.zeros(0)  # [N] their labels

    # ------------------------------------------------------------------------------------------------------------
    def _reset_generation(self) -> None:
        self._requests: dict[str, RolloutRequest] = {}
        self._members: dict[Hashable, list[str]] = {}  # group -> request ids in prompt order
        self._alive: dict[Hashable, int] = {}
        self._decisions: dict[str, PruneDecision] = {}
        self._detect_states: dict[str, torch.Tensor] = {}  # request id -> [H]
        self._last_states: dict[str, torch.Tensor] = {}  # request id -> [H]
        self._lengths: dict[str, int] = {}  # finished request id -> final length
        self._current: dict[str, int] = {}  # request id -> generated length so far
        self._waiting: dict[Hashable, list[str]] = {}  # group -> rollouts at L_detect, not decided, still running
        self._q: dict[str, float] = {}  # request id -> q entering its group's mean
        self._deltas: list[tuple[float, int]] = []  # (delta, rollouts) of each decision batch
        self._gated = False  # the gate was closed for this generation

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
            self._members.setdefault(request.group_id, []).append(request.request_id)
            self._alive[request.group_id] = self._alive.get(request.group_id, 0) + 1
        for members in self._members.values():
            members.sort(key=lambda rid: self._requests[rid].index)
        self._gated = self.mode == "arrol" and self.calibrator.ready and not self.gate.open

    def on_step(self, step: RolloutStep) -> list[str]:
        """Record hidden states, decide the groups whose running rollouts reached ``L_detect``; return ids to abort."""
        advanced = set()
        for rollout in step.rollouts:
            request_id = rollout.request_id
            request = self._requests.get(request_id)
            if request is None:
                continue
            advanced.add(request_id)
            length = len(rollout.token_ids)
            self._current[request_id] = length
            if rollout.finished:
                state = self._state(rollout)
                self._last_states[request_id] = state.clone()
                self._detect_states.setdefault(request_id, self._last_states[request_id])
                self._lengths[request_id] = length
                waiting = self._waiting.get(request.group_id)
                if waiting and request_id in waiting:
                    waiting.remove(request_id)  # finished while its group waited: never pruned
                    if not waiting:
                        del self._waiting[request.group_id]
            elif (
                length >= self.l_detect and request_id not in self._decisions and request_id not in self._detect_states
            ):
                self._detect_states[request_id] = self._state(rollout).clone()
                self._waiting.setdefault(request.group_id, []).append(request_id)
        ready = [g for g in self._waiting if self._group_ready(g, advanced)]
        if not ready:
            return []
        candidates = sorted(
            (rid for g in ready for rid in self._waiting.pop(g)), key=lambda r: self._requests[r].index
        )
        return self._decide(candidates)

    def _group_ready(self, group: Hashable, advanced: set[str]) -> bool:
        # Not ready while a member is running (advanced in this step) short of L_detect, undecided and unfinished.
        for rid in self._members[group]:
            if rid in advanced and rid not in self._lengths and rid not in self._detect_states:
                return False
        return True

    def _decide(self, candidates: list[str]) -> list[str]:
        states = torch.stack([self._detect_states[rid] for rid in candidates])  # [M, H] (confidence: [M, 2])
        scores = self.score(states)  # [M]
        posterior = self.calibrator.posterior(scores)  # [M]
        for rid, q in zip(candidates, posterior.tolist(), strict=True):
            self._q[rid] = q
        groups = {self._requests[rid].group_id for rid in candidates}
        finished = [rid for g in groups for rid in self._members[g] if rid in self._lengths and rid not in self._q]
        if finished:  # finished members enter the group mean with their last-token score
            last = self.calibrator.posterior(self.score(torch.stack([self._last_states[r] for r in finished])))
            self._q.update(zip(finished, last.tolist(), strict=True))
        mean_of = {}
        for g in groups:
            known = [self._q[rid] for rid in self._members[g] if rid in self._q]
            mean_of[g] = sum(known) / len(known)
        group_means = torch.tensor([mean_of[self._requests[rid].group_id] for rid in candidates])  # [M]
        arrol, delta = self.calibrator.solve_survival(scores, group_means)  # [M]
        cold = not self.calibrator.ready
        gated = self._gated and not cold
        if cold or gated:
            survival = torch.ones_like(scores)
        elif self.mode == "random":
            survival = torch.full_like(scores, self.calibrator.kappa)
        else:
            survival = arrol
            self._deltas.append((delta, len(candidates)))
        draws = torch.rand(len(candidates), generator=self.rng, dtype=torch.float64)  # [M]
        to_abort = []
        for j, rid in enumerate(candidates):
            request = self._requests[rid]
            prune = bool(draws[j].item() >= survival[j].item())
            forced = prune and self._alive[request.group_id] - 1 < self.min_survivors_per_group
            prune = prune and not forced
            if prune:
                self._alive[request.group_id] -= 1
                to_abort.append(rid)
            if not cold and not gated:
                self.total_decided += 1
                self.total_decided_kept += int(not prune)
            self._decisions[rid] = PruneDecision(
                request_id=rid,
                index=request.index,
                group_id=request.group_id,
                length=self._current[rid],
                score=float(scores[j]),
                posterior=float(posterior[j]),
                survival_probability=float(survival[j]),
                draw=float(draws[j]),
                pruned=prune,
                forced_keep=forced,
                cold_start=cold,
                group_mean=float(group_means[j]),
                arrol_probability=float(arrol[j]),
                delta=float(delta),
                gated=gated,
            )
        return to_abort

    def _state(self, rollout: Any) -> torch.Tensor:
        """What the scorer reads of a rollout now: its hidden state ``[H]`` or its `confidence_features` ``[2]``."""
        if self.scorer == "confidence":
            return confidence_features(rollout.token_ids, rollout.logprobs)
        if rollout.hidden_state is None:
            raise RuntimeError(f"no hidden state for {rollout.request_id}: the engine must capture hidden states")
        return rollout.hidden_state.detach()

    def score(self, states: torch.Tensor) -> torch.Tensor:
        """Scores in [0, 1] of recorded states ``[N, H]`` (head) or ``[N, 2]`` (confidence): ``-> [N]``."""
        return self.head.score(states) if self.scorer == "head" else confidence_score(states)

    @property
    def state_width(self) -> int:
        """Width of the recorded states: the head's input, or the number of confidence features."""
        return self.head.hidden_size if self.scorer == "head" else len(CONFIDENCE_FEATURES)

    def on_generation_end(self, result: RolloutResult) -> None:
        """Summarise the generation into ``pruning/`` metrics."""
        self.num_generations += 1
        self.gate.count_generation(self._gated)
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
            "pruning/delta": (
                sum(d * m for d, m in self._deltas) / sum(m for _, m in self._deltas) if self._deltas else float("nan")
            ),
            "pruning/decisions_past_l_detect": float(sum(d.length > self.l_detect for d in decisions)),
            "pruning/tokens_generated": float(generated),
            "pruning/tokens_not_generated_estimate": saved,
            "pruning/tokens_saved_fraction_estimate": saved / (saved + generated) if saved + generated else 0.0,
            "pruning/hook_seconds": float(result.hook_seconds),
            "pruning/callback_seconds": float(result.callback_seconds),
            "pruning/generation_seconds": float(result.seconds),
            "pruning/cold_start": float(not self.calibrator.ready),
            "pruning/gated": float(self._gated),
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
            empty = torch.zeros(0, self.state_width)
            return [], empty, empty.clone(), torch.zeros(0)
        detect = torch.stack([self._detect_states[rid] for rid in ids])  # [N, H]
        last = torch.stack([self._last_states[rid] for rid in ids])  # [N, H]
        values = torch.tensor([float(rewards[rid]) for rid in ids], dtype=torch.float32)  # [N]
        return ids, detect, last, values

    def group_ids(self, request_ids: Sequence[str]) -> list[Hashable]:
        """The group of each of these requests of the last generation."""
        return [self._requests[rid].group_id for rid in request_ids]

    def reached_detect(self, request_ids: Sequence[str]) -> torch.Tensor:
        """``[N]`` bool: which of these finished rollouts of the last generation have ``len >= L_detect``."""
        return torch.tensor([self._lengths[rid] >= self.l_detect for rid in request_ids], dtype=torch.bool)

    def observe(
        self, rewards: Mapping[str, float] | Sequence[float], request_ids: Sequence[str] | None = None
    ) -> dict[str, float]:
        """Learn from the last generation's rewards: train the head, fill the calibrator, refit it.

        Call once per training step (after the rewards of the generation are known, before the next generation).
        Needs ``head`` to be a :class:`QualityHeadTrainer`. Same as
        ``learn(detect, last, values, calibrate=reached_detect(ids))`` with ``training_batch``'s output.
        """
        if self.trainer is None:
            raise RuntimeError("observe() trains the head: construct the callback with a QualityHeadTrainer")
        ids, detect, last, values = self.training_batch(rewards, request_ids)
        return self.learn(detect, last, values, calibrate=self.reached_detect(ids), groups=self.group_ids(ids))

    def learn(
        self,
        detect_states: torch.Tensor,
        last_states: torch.Tensor,
        rewards: torch.Tensor,
        calibrate: torch.Tensor | None = None,
        groups: Sequence[Hashable] | torch.Tensor | None = None,
    ) -> dict[str, float]:
        """Learn from given finished rollouts (e.g. gathered from every process): head step, buffer, refit.

        Args:
            detect_states: ``[N, H]`` hidden states at generated length ``min(L_detect, len)``.
            last_states: ``[N, H]`` hidden states at the last generated token.
            rewards: ``[N]`` rewards (labels are ``reward > reward_threshold``).
            calibrate: ``[N]`` bool, the rows that enter the calibrator's buffer: the rollouts that reached
                ``L_detect`` (:meth:`reached_detect`). None: every row (only when all of them reached it).
            groups: ``[N]`` group ids (global): the within-group AUC of the ``calibrate`` rows' out-of-sample scores
                feeds the gate and ``pruning/head_within_group_auc``; the same at the last token is logged as
                ``pruning/head_within_group_auc_last``. None: neither.

        The head trains on every row. The detect-position scores under the head *before* this update (out of
        sample) and the labels of the ``calibrate`` rows go to the calibrator; the scores and labels of all rows are
        kept in :attr:`last_scores` / :attr:`last_labels` and summarised as ``pruning/head_auc``. The calibrator is
        refitted (one refit per call, also with ``N == 0``).
        """
        if self.trainer is None:
            raise RuntimeError("learn() trains the head: construct the callback with a QualityHeadTrainer")
        values = torch.as_tensor(rewards).detach().reshape(-1).float().cpu()
        metrics: dict[str, float] = {"pruning/head_examples": float(values.numel())}
        self.last_scores = torch.zeros(0)
        self.last_labels = torch.zeros(0)
        if values.numel():
            scores = self.score(detect_states).cpu()  # [N], before the update
            last_scores = self.score(last_states).cpu() if groups is not None else None  # [N]
            labels = self.trainer.labels(values)  # [N]
            if self.scorer == "head":  # trace confidence has nothing to learn
                metrics.update(self.trainer.observe(detect_states, last_states, values))
            metrics["pruning/head_auc"] = roc_auc(scores, labels)
            mask = torch.ones(values.numel(), dtype=torch.bool)
            if calibrate is not None:
                mask = torch.as_tensor(calibrate).detach().reshape(-1).to("cpu", torch.bool)
                if mask.numel() != values.numel():
                    raise ValueError(f"calibrate must have {values.numel()} entries, got {mask.numel()}")
            metrics["pruning/calibration_examples"] = float(mask.sum())
            self.calibrator.observe(scores[mask], labels[mask])
            self.last_scores, self.last_labels = scores, labels
            if groups is not None:
                keys = groups.reshape(-1).tolist() if isinstance(groups, torch.Tensor) else list(groups)
                if len(keys) != values.numel():
                    raise ValueError(f"groups must have {values.numel()} entries, got {len(keys)}")
                chosen = [k for k, m in zip(keys, mask.tolist(), strict=True) if m]
                self.gate.observe(scores[mask], labels[mask], chosen)
                metrics.update(self.gate.metrics())
                metrics["pruning/head_within_group_auc_last"] = within_group_auc(last_scores, labels, keys)[0]
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
            "pruning/realised_keep_rate": (
                self.total_decided_kept / self.total_decided if self.total_decided else float("nan")
            ),
        }
        out.update(self.calibrator.metrics())
        out.update({k: v for k, v in self.gate.metrics().items() if k.startswith("pruning/gate")})
        return out

    def state_dict(self) -> dict[str, Any]:
        """RNG, counters, head (and its optimizer) and calibrator: everything the next decisions depend on.

        Meant to be taken between training steps; the hidden states recorded during a generation are not included.
        """
        return {
            "rng_state": self.rng.get_state(),
            "scorer": self.scorer,
            "l_detect": self.l_detect,
            "min_survivors_per_group": self.min_survivors_per_group,
            "num_generations": self.num_generations,
            "num_observed_steps": self.num_observed_steps,
            "total_pruned": self.total_pruned,
            "total_rollouts": self.total_rollouts,
            "total_decided": self.total_decided,
            "total_decided_kept": self.total_decided_kept,
            "head": self.trainer.state_dict() if self.trainer is not None else copy.deepcopy(self.head.state_dict()),
            "calibrator": self.calibrator.state_dict(),
            "gate": self.gate.state_dict(),
            "last_decisions": [asdict(d) for d in self._decisions.values()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state.get("scorer", "head") != self.scorer:
            raise ValueError(f"checkpoint was taken with scorer {state.get('scorer', 'head')!r}, not {self.scorer!r}")
        self.rng.set_state(state["rng_state"])
        self.l_detect = int(state["l_detect"])
        self.min_survivors_per_group = int(state["min_survivors_per_group"])
        self.num_generations = int(state["num_generations"])
        self.num_observed_steps = int(state["num_observed_steps"])
        self.total_pruned = int(state["total_pruned"])
        self.total_rollouts = int(state["total_rollouts"])
        self.total_decided = int(state.get("total_decided", 0))
        self.total_decided_kept = int(state.get("total_decided_kept", 0))
        if self.trainer is not None:
            self.trainer.load_state_dict(state["head"])
        else:
            self.head.load_state_dict(state["head"])
        self.calibrator.load_state_dict(state["calibrator"])
        if "gate" in state:  # checkpoints before the gate have none
            self.gate.load_state_dict(state["gate"])
        self._reset_generation()
