"""efficient_rlvr: a drop-in TRL `GRPOTrainer` that stops spending compute on prompts and rollouts that teach nothing.

Switch from TRL by changing one import and one config class:

    from efficient_rlvr import EfficientGRPOConfig, EfficientGRPOTrainer

The two names are imported lazily, so that the method packages (`efficient_rlvr.hes`, `efficient_rlvr.selection`,
...) and their command-line tools load without TRL and vLLM.
"""

from typing import TYPE_CHECKING, Any

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
