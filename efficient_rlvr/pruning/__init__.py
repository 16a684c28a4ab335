"""ARRoL online rollout pruning (arXiv 2603.24840; SPEC section 2).

- :class:`QualityHead` / :class:`QualityHeadTrainer`: MLP on the policy's final-norm hidden state, trained online
  with BCE against rollout correctness.
- :class:`BinnedCalibrator`: binned posterior ``q(s)`` and survival probabilities (by default SPEC's group-relative
  rule ``p_i = clip(kappa + delta + lambda sign(q_bar_g - rho) (q_bar_g - q_i), p_min, p_max)``; the appendix's
  literal rule, in which ``rho`` cancels, is selectable) with the keep-rate bisection over the rollouts decided.
- :class:`OnlinePruningCallback`: decides each group's rollouts once they reach ``L_detect`` tokens and prunes each
  with probability ``1 - p``.
- :class:`StepwiseRolloutEngine`: drives a colocated vLLM engine step by step, captures hidden states, aborts.
- :class:`HeadGate`: stops pruning while the head does not rank the rollouts of one prompt (within-group AUC).
- :func:`weighted_vote` / :func:`majority_vote` / :func:`choose_vote`: test-time aggregation with rank weights, used
  only where it beat the majority vote.
- ``efficient_rlvr.pruning.stage.PruningStage``: all of it wired into ``EfficientGRPOTrainer`` (imported lazily: it
  needs TRL).

vLLM is imported only when the engine is used; the other parts are pure torch.
"""

from efficient_rlvr.pruning.calibration import BinnedCalibrator
from efficient_rlvr.pruning.callback import OnlinePruningCallback, PruneDecision
from efficient_rlvr.pruning.engine import (
    FinalHiddenStateHook,
    PartialRollout,
    RolloutCallback,
    RolloutRequest,
    RolloutResult,
    RolloutStep,
    StepwiseRolloutEngine,
    colocate_sampling_params,
    in_process_model_runner,
    sampling_params_from_trl,
)
from efficient_rlvr.pruning.gate import HeadGate
from efficient_rlvr.pruning.head import (
    QualityHead,
    QualityHeadTrainer,
    hidden_state_positions,
    roc_auc,
    within_group_auc,
)
from efficient_rlvr.pruning.vote import choose_vote, majority_vote, rank_weights, weighted_vote

__all__ = [
    "BinnedCalibrator",
    "HeadGate",
    "FinalHiddenStateHook",
    "OnlinePruningCallback",
    "PartialRollout",
    "PruneDecision",
    "QualityHead",
    "QualityHeadTrainer",
    "RolloutCallback",
    "RolloutRequest",
    "RolloutResult",
    "RolloutStep",
    "StepwiseRolloutEngine",
    "choose_vote",
    "colocate_sampling_params",
    "hidden_state_positions",
    "in_process_model_runner",
    "majority_vote",
    "rank_weights",
    "roc_auc",
    "sampling_params_from_trl",
    "weighted_vote",
    "within_group_auc",
]
