"""efficient_rlvr: a drop-in TRL `GRPOTrainer` that stops spending compute on prompts and rollouts that teach nothing.

Switch from TRL by changing one import and one config class:

    from efficient_rlvr import EfficientGRPOConfig, EfficientGRPOTrainer

The two names are imported lazily, so that the method packages (`efficient_rlvr.hes`, `efficient_rlvr.selection`,
...) and their command-line tools load without TRL and vLLM.
"""

import warnings
from typing import TYPE_CHECKING, Any

# TRL 1.16 checks the vLLM version at each of its vLLM modules' imports and warns six times that 0.32.0 is outside
# its tested 0.22-0.31 range. This project pins and tests trl 1.16.0 with vllm 0.32.0 together (pyproject.toml), so
# the notice is known and harmless here; it is filtered ("once" would not hold: every change to the warning filters,
# which TRL and vLLM make while importing, resets Python's once-registry). Nothing else is filtered.
warnings.filterwarnings("ignore", message=r"TRL currently supports vLLM versions", category=UserWarning)

__all__ = ["EfficientGRPOConfig", "EfficientGRPOTrainer"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from .config import EfficientGRPOConfig
    from .trainer import EfficientGRPOTrainer


def __getattr__(name: str) -> Any:
    if name == "EfficientGRPOConfig":
        from .config import EfficientGRPOConfig

        return EfficientGRPOConfig
    if name == "EfficientGRPOTrainer":
        from .trainer import EfficientGRPOTrainer

        return EfficientGRPOTrainer
    raise AttributeError(f"module 'efficient_rlvr' has no attribute {name!r}")
