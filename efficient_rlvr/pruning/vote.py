"""Test-time answer aggregation with the ARRoL quality head (arXiv 2603.24840, section 4.4).

- :func:`majority_vote`: the most frequent answer.
- :func:`weighted_vote`: each candidate votes for its answer with a weight from its quality-head score. Scores are
  uncalibrated, so they are turned into ranks and the ranks rescaled linearly to [0, 1]: the lowest-scored candidate
  gets weight 0, the highest weight 1. The answer with the largest total weight wins. With ``keep`` < 1 only the
  best-scored ``keep`` fraction of the voting candidates vote (DeepConf's confidence filter, arXiv 2508.15260,
  section 3.2: the paper keeps the top 10% or 90% of hundreds of traces; with 8 candidates a fraction near one half
  is the useful middle), ranked among themselves.
- :func:`choose_vote`: the weighted vote only where it beat the majority vote on recent data (e.g. held-out prompts
  set aside for it); otherwise the majority vote. A head that does not rank the candidates of one prompt makes the
  weighted vote worse than the majority vote (measured: 0.438 vs 0.557 on the embedded task), so it must earn its use.

Choices where the paper is silent: candidates whose answer is ``None`` (nothing parsable) do not vote and are left
out of the ranking; tied scores share their average rank; if every voting candidate has the same score, all get
weight 1 (the vote becomes a majority vote). Ties in total weight go to the answer with more votes, then to the one
that appears first.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import torch

__all__ = ["choose_vote", "majority_vote", "rank_weights", "weighted_vote"]


def rank_weights(scores: Sequence[float] | torch.Tensor) -> list[float]:
    """Ranks of ``scores`` (average rank for ties) rescaled linearly to [0, 1]; all-equal scores give all 1."""
    values = [float(s) for s in (scores.detach().reshape(-1).tolist() if isinstance(scores, torch.Tensor) else scores)]
    if any(math.isnan(v) for v in values):
        raise ValueError("scores must not contain NaN")
    n = len(values)
    order = sorted(range(n), key=lambda i: values[i])
    ranks = [0.0] * n
    start = 0
    while start < n:
        end = start
        while end + 1 < n and values[order[end + 1]] == values[order[start]]:
            end += 1
        for j in range(start, end + 1):
            ranks[order[j]] = 0.5 * (start + end)  # average rank of the tied block
        start = end + 1
    low, high = (min(ranks), max(ranks)) if ranks else (0.0, 0.0)
    if high == low:
        return [1.0] * n
    return [(r - low) / (high - low) for r in ranks]


def _best(totals: dict[Hashable, float], counts: dict[Hashable, int], first: dict[Hashable, int]) -> Hashable | None:
    if not totals:
        return None
    return max(totals, key=lambda a: (totals[a], counts[a], -first[a]))


def majority_vote(answers: Sequence[Hashable | None]) -> Hashable | None:
    """The most frequent non-``None`` answer (ties: the one appearing first); ``None`` if there is none."""
    counts: dict[Hashable, int] = {}
    first: dict[Hashable, int] = {}
    for i, answer in enumerate(answers):
        if answer is None:
            continue
        counts[answer] = counts.get(answer, 0) + 1
        first.setdefault(answer, i)
    return _best({a: float(c) for a, c in counts.items()}, counts, first)


def weighted_vote(
    answers: Sequence[Hashable | None], scores: Sequence[float] | torch.Tensor, keep: float = 1.0
) -> Hashable | None:
    """Rank-weighted vote: weights are the candidates' score ranks rescaled to [0, 1] (see the module docstring).

    Args:
        answers: one parsed answer per candidate (``None`` = no answer, does not vote).
        scores: one quality-head score (or logit, or trace confidence: only the order matters) per candidate.
        keep: fraction in (0, 1] of the voting candidates that vote, the best-scored first (at least one; rounded
            to the nearest count, ties in score broken by position); 1 keeps all of them.
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"weighted_vote: keep must be in (0, 1], got {keep}")
    score_list = scores.detach().reshape(-1).tolist() if isinstance(scores, torch.Tensor) else list(scores)
    if len(score_list) != len(answers):
        raise ValueError(f"answers and scores must have the same length, got {len(answers)} and {len(score_list)}")
    voters = [i for i, a in enumerate(answers) if a is not None]
    if keep < 1.0 and voters:
        best = sorted(voters, key=lambda i: -score_list[i])[: max(1, round(keep * len(voters)))]
        voters = sorted(best)
    weights = rank_weights([score_list[i] for i in voters])
    totals: dict[Hashable, float] = {}
    counts: dict[Hashable, int] = {}
    first: dict[Hashable, int] = {}
    for i, w in zip(voters, weights, strict=True):
        answer = answers[i]
        totals[answer] = totals.get(answer, 0.0) + w
        counts[answer] = counts.get(answer, 0) + 1
        first.setdefault(answer, i)
    return _best(totals, counts, first)


def choose_vote(majority_correct: Sequence[float], weighted_correct: Sequence[float]) -> str:
    """``"weighted"`` if the head-weighted vote was right more often than the majority vote on the same recent
    prompts (``1.0`` / ``0.0`` per prompt), else ``"majority"`` (ties and no data included)."""
    if len(majority_correct) != len(weighted_correct):
        raise ValueError(
            f"majority_correct and weighted_correct must cover the same prompts, got {len(majority_correct)} and "
            f"{len(weighted_correct)}"
        )
    return "weighted" if sum(weighted_correct) > sum(majority_correct) else "majority"
