"""Cost-Aware GRPO (SPEC section 3): cost-aware minibatch sampling and the importance-weighted loss.

`CostAwareSampler` draws the policy-gradient minibatch from p_i ~ |A_i| / sqrt(c_i) (c_i = prompt + completion
tokens; p_i = 0 only for A_i = 0 exactly) with importance weights 1 / (N p_i), re-centred (if at all) by a
constant, never by the draws' own mean, so the expected objective is TRL's full-batch one at any zero-advantage
share (SPEC 3 "Correction"); `weighted_policy_loss` applies those weights to TRL's per-token loss for
every `loss_type` so the sampled objective estimates the full-batch one without bias. `CostAwareStage` wires the
sampler into `EfficientGRPOTrainer` (`cost_aware_sampling=True`; weights applied through TRL's own loss). See the
three modules' docstrings.
"""

from .sampler import CostAwareSampler, rollout_costs, select_rows
from .stage import CostAwareStage, check_cost_aware_config
from .weighting import (
    SUPPORTED_LOSS_TYPES,
    check_loss_type,
    check_objective,
    policy_loss_normalizer,
    weighted_policy_loss,
)

__all__ = [
    "SUPPORTED_LOSS_TYPES",
    "CostAwareSampler",
    "CostAwareStage",
    "check_cost_aware_config",
    "check_loss_type",
    "check_objective",
    "policy_loss_normalizer",
    "rollout_costs",
    "select_rows",
    "weighted_policy_loss",
]
