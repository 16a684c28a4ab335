"""HIVE prompt selection (SPEC section 1): decide before any rollout which prompts are worth rolling out.

Stage 1, `HistorySampler`: GRESO's probabilistic skip of prompts whose recent groups were all correct or all wrong.
Stage 2, `EntropyMedianFilter`: keep the candidates whose prompt entropy (`prompt_entropy`, one forward pass) is at
least the pool's median. `SelectorChain` runs the stages in order; `CandidatePool` / `gather_candidates` draw and
accumulate candidates; `ZeroVarianceGate` is DAPO's post-rollout filter, for comparison and as a safety net.

Typical step (B prompts per step, G rollouts per prompt)::

    got = gather_candidates(pool, history, make_candidate, target=math.ceil(B / entropy_filter.keep_ratio))
    chosen = entropy_filter.select(got.candidates)  # entropy_filter.n_keep = B for a fixed batch
    ... roll out `chosen`, score ...
    history.observe([c.key for c in chosen], rewards.view(-1, G))
    history.on_step_end(); pool.on_step_end()  # after the optimizer step

In `EfficientGRPOTrainer` this loop is `PromptSelectionStage` (stage.py, `selection_history` / `selection_entropy`);
`DynamicSamplingStage` (stage.py, `dynamic_sampling`) applies the gate after scoring and refills the batch with
TRL's own generation, merging batches with `efficient_rlvr.batch.concat_batches`.
"""

from .base import Candidate, Selector, SelectorChain, prompt_key, rollouts_saved
from .dynamic import ZeroVarianceGate
from .entropy import EntropyMedianFilter, prompt_entropy, prompt_position_mask, token_entropy
from .history import HistorySampler
from .pool import CandidatePool, GatherResult, gather_candidates
from .stage import DynamicSamplingStage, PromptSelectionStage

__all__ = [
    "Candidate",
    "CandidatePool",
    "DynamicSamplingStage",
    "EntropyMedianFilter",
    "GatherResult",
    "HistorySampler",
    "PromptSelectionStage",
    "Selector",
    "SelectorChain",
    "ZeroVarianceGate",
    "gather_candidates",
    "prompt_entropy",
    "prompt_key",
    "prompt_position_mask",
    "rollouts_saved",
    "token_entropy",
]
