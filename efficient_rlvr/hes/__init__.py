"""HES, the high-entropy sum (arXiv 2605.22389): score reasoning traces by their highest-entropy tokens.

`hes.score` computes token entropies and the score, `hes.selector` keeps high-HES correct rollouts plus random
incorrect ones in RL, and `python -m efficient_rlvr.hes.cli` ranks an SFT/RFT data file. Only torch is needed
(the CLI also uses transformers).
"""

from .score import high_entropy_mask, high_entropy_sum, pearson, token_entropies
from .selector import PosHighNegRand

__all__ = ["PosHighNegRand", "high_entropy_mask", "high_entropy_sum", "pearson", "token_entropies"]
