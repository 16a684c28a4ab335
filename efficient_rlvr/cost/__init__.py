"""Cost-Aware GRPO (SPEC section 3): cost-aware minibatch sampling and the importance-weighted loss.

`CostAwareSampler` draws the policy-gradient minibatch from p_i ~ |A_i| / sqrt(c_i) (c_i = prompt + completion
tokens) with importance weights 1 / (N p_i); `weighted_policy_loss` applies those weights to TRL's per-token loss for
every `loss_type` so the sampled objective estimates the full-batch one without bias. See the two modules' docstrings.
"""

from .sampler import CostAwareSampler, rollout_costs, select_rows
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
    "check_loss_type",
    "check_objective",
    "policy_loss_normalizer",
    "rollout_costs",
    "select_rows",
    "weighted_policy_loss",
]
