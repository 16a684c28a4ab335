"""V0.5: a value prior fused with the group mean as the baseline, and an adaptive per-prompt rollout budget.

See `budget.baseline` (shrinkage fusion and advantages), `budget.prior` (value priors) and `budget.adaptive`
(the "rollout more" rule). Trainer-agnostic: only torch is needed.
"""

from .adaptive import RolloutBudget
from .baseline import (
    FusionStats,
    from_signed_scale,
    fused_advantages,
    fused_mse,
    fused_mse_gain,
    fusion_stats,
    pad_groups,
    shrinkage_baseline,
    to_signed_scale,
)
from .prior import CallablePrior, HistoryPrior, ValuePrior, group_means

__all__ = [
    "CallablePrior",
    "FusionStats",
    "HistoryPrior",
    "RolloutBudget",
    "ValuePrior",
    "from_signed_scale",
    "fused_advantages",
    "fused_mse",
    "fused_mse_gain",
    "fusion_stats",
    "group_means",
    "pad_groups",
    "shrinkage_baseline",
    "to_signed_scale",
]
