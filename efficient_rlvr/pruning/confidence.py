"""Trace confidence (DeepConf, arXiv 2508.15260): how sure the policy was of the tokens it sampled.

DeepConf scores a reasoning trace by the log-probabilities of its own sampled tokens: their mean, and the lowest mean
over a sliding window of ``WINDOW`` tokens (the "lowest group confidence"; the paper averages the top-k
log-probabilities over windows of 2,048 tokens, here the sampled token's log-prob over windows of 4 tokens, for
completions of ~10-45 tokens). vLLM returns the sampled tokens' log-probs with every step (TRL asks for
``logprobs=0``), so the score costs no forward pass. On the embedded task it ranks the rollouts of one prompt better
than the quality head does (``docs/head/head.json``: within-group AUC 0.70 at ``L_detect``, 0.77 at the last token,
against 0.60 / 0.63 for the best head), which is what ARRoL's pruning needs (``pruning_scorer="confidence"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["CONFIDENCE_FEATURES", "WINDOW", "confidence_features", "confidence_score", "deepconf", "sampled_logprobs"]

WINDOW = 4  # DeepConf's sliding window, in tokens, for completions of ~10-45 tokens
# The features `confidence_features` returns, in order; the pruning score is exp of the last one.
CONFIDENCE_FEATURES = ("mean_logprob", "lowest_window_logprob")


def _mean_and_lowest(values: list[float]) -> tuple[float, float]:
    # Plain Python over the ~10-45 floats of a completion: the callback calls this for every rollout at L_detect and
    # at its end, where building tensors cost 2.5x more (512 calls, one step of the embedded recipe: 11 ms vs 4.8 ms).
    if not values:
        return 0.0, 0.0
    window = min(WINDOW, len(values))
    lowest = min(sum(values[i : i + window]) for i in range(len(values) - window + 1)) / window
    return sum(values) / len(values), lowest


def deepconf(logprobs: torch.Tensor, n: int) -> tuple[float, float]:
    """DeepConf trace confidence over the first ``n`` sampled tokens: (mean log-prob, lowest sliding-window mean)."""
    return _mean_and_lowest(logprobs[:n].tolist())


def _sampled_values(token_ids: Sequence[int], logprobs: Sequence[Any] | None) -> list[float]:
    if logprobs is None:
        raise RuntimeError(
            "trace confidence needs the sampled tokens' log-probs: generate with SamplingParams(logprobs=0) "
            "(TRL's colocate generation does)"
        )
    values = []
    for token, entry in zip(token_ids, logprobs, strict=False):  # the live lists may differ by the token in flight
        value = entry[token].logprob if token in entry else float("nan")
        values.append(value if value == value else float("-inf"))  # NaN (vLLM's "unknown") -> least confident
    return values


def sampled_logprobs(token_ids: Sequence[int], logprobs: Sequence[Any] | None) -> torch.Tensor:
    """``[L]`` log-probs of the sampled tokens from vLLM's per-position dicts (token id -> ``Logprob``).

    Raises ``RuntimeError`` when the engine returned no log-probs (SamplingParams without ``logprobs``)."""
    return torch.tensor(_sampled_values(token_ids, logprobs), dtype=torch.float32)


def confidence_features(token_ids: Sequence[int], logprobs: Sequence[Any] | None) -> torch.Tensor:
    """``[2]`` (`CONFIDENCE_FEATURES`) of a (partial) rollout: DeepConf's mean and lowest-window log-prob so far."""
    return torch.tensor(_mean_and_lowest(_sampled_values(token_ids, logprobs)), dtype=torch.float32)


def confidence_score(features: torch.Tensor) -> torch.Tensor:
    """Pruning score in [0, 1] of ``[..., 2]`` `confidence_features`: exp of the lowest-window mean log-prob (the
    geometric-mean probability of the least confident window; DeepConf's lowest group confidence, the better of the
    two within groups here). ``[..., 2] -> [...]``."""
    return torch.exp(features[..., 1].float())
