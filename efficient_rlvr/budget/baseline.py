"""V0.5 empirical shrinkage fusion: a per-prompt baseline that mixes a value prior with the group mean.

Algorithm (SPEC section 4; V0.5, arXiv 2603.10848). Rewards and the prior V are mapped to the +-1 scale,
``r' = 2 (r - lo) / (hi - lo) - 1``. After k rollouts of a prompt with empirical mean m_k:

    D2 = max(0, (m_k - V)^2 - 1/k)          # estimated squared bias of the prior
    w  = D2 / (D2 + 1/k)                     # weight of the empirical mean
    b  = w m_k + (1 - w) V                   # fused baseline, mapped back to the original scale
    A_i = r_i - b                            # advantage (optionally scaled, see `fused_advantages`)

Why this form: model m_k ~ (mu, sigma^2 / k) with sigma^2 <= 1 on the +-1 scale (a reward in [-1, 1] has variance at
most 1; 1 is the bound SPEC uses), and the prior as a biased guess V = mu - delta. Then
E[(m_k - V)^2] = delta^2 + sigma^2 / k, so D2 is the method-of-moments estimate of delta^2 clipped at 0: a deviation
within the noise level (|m_k - V| <= 1/sqrt(k)) keeps the prior entirely (w = 0). The MSE of b = w m_k + (1 - w) V is
w^2 / k + (1 - w)^2 delta^2, minimised by w = delta^2 / (delta^2 + 1/k), the weight above with D2 plugged in. The
minimum is

    MSE_k(D2) = D2 (1/k) / (D2 + 1/k) = D2 / (1 + k D2)    (= w / k = (1 - w) D2)

which `fused_mse` returns; the rollout budget built on it is in `budget.adaptive`.

Variable group sizes: every function takes either a list of 1-D reward tensors (one per prompt, any length) or a
padded tensor ``[B, K]`` plus ``counts [B]`` (entries at positions >= count are ignored). A prompt with k = 0
rollouts gets w = 0 and b = V.

Deviation / assumptions: the paper's prior is a pretrained generalist value model (V0) whose weights are not
available; here the prior is any `ValuePrior` (see `budget.prior`). The noise variance is fixed at its bound 1 (as in
SPEC) rather than estimated from the k rewards, which would be unstable at k = 4.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor

RewardsLike = Tensor | Sequence[Tensor] | Sequence[Sequence[float]]
ScaleMode = Literal["none", "group", "batch"]
_SCALES = ("none", "group", "batch")


def check_reward_range(reward_range: tuple[float, float]) -> tuple[float, float]:
    """``(lo, hi)`` as floats; ValueError unless hi > lo."""
    lo, hi = float(reward_range[0]), float(reward_range[1])
    if not hi > lo:
        raise ValueError(f"reward_range must be (lo, hi) with hi > lo, got {reward_range!r}.")
    return lo, hi


def to_signed_scale(x: Tensor, reward_range: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """Map rewards (or expected rewards) from ``[lo, hi]`` to the +-1 scale: ``2 (x - lo) / (hi - lo) - 1``."""
    lo, hi = check_reward_range(reward_range)
    return 2.0 * (x - lo) / (hi - lo) - 1.0


def from_signed_scale(x: Tensor, reward_range: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """Inverse of `to_signed_scale`."""
    lo, hi = check_reward_range(reward_range)
    return (x + 1.0) * 0.5 * (hi - lo) + lo


def pad_groups(rewards: RewardsLike, counts: Tensor | Sequence[int] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Bring rewards of variable group sizes to a padded layout.

    Args:
        rewards: a list of B 1-D tensors (or lists of floats), or a tensor ``[B, K]``.
        counts: only with a tensor: the number of valid entries per row (default: all K).

    Returns:
        ``(padded [B, K] float32, counts [B] int64, valid [B, K] bool)`` on the rewards' device; padded entries are 0.
    """
    if isinstance(rewards, Tensor):
        if rewards.dim() != 2:
            raise ValueError(
                f"rewards must be a [B, K] tensor or a list of 1-D tensors, got shape {tuple(rewards.shape)}."
            )
        padded = rewards.float()
        B, K = padded.shape
        if counts is None:
            counts_t = torch.full((B,), K, dtype=torch.long, device=padded.device)
        else:
            counts_t = torch.as_tensor(counts, dtype=torch.long, device=padded.device).reshape(-1)
            if counts_t.numel() != B:
                raise ValueError(f"counts must have one entry per row ({B}), got {counts_t.numel()}.")
            if bool((counts_t < 0).any()) or bool((counts_t > K).any()):
                raise ValueError(f"counts must lie in [0, {K}] (the padded width), got {counts_t.tolist()}.")
    else:
        if counts is not None:
            raise ValueError("counts is only accepted with a padded [B, K] tensor; a list carries its own lengths.")
        rows = [torch.as_tensor(r, dtype=torch.float32).reshape(-1) for r in rewards]
        device = rows[0].device if rows else torch.device("cpu")
        B = len(rows)
        K = max([r.numel() for r in rows] + [1])
        padded = torch.zeros(B, K, dtype=torch.float32, device=device)  # [B, K]
        for i, r in enumerate(rows):
            padded[i, : r.numel()] = r.to(device)
        counts_t = torch.tensor([r.numel() for r in rows], dtype=torch.long, device=device)
    valid = torch.arange(padded.shape[1], device=padded.device)[None, :] < counts_t[:, None]  # [B, K]
    return padded.masked_fill(~valid, 0.0), counts_t, valid


class FusionStats(NamedTuple):
    """Everything the shrinkage fusion computes, per prompt (all ``[B]`` float32)."""

    baseline: Tensor  # fused baseline b on the original reward scale
    weight: Tensor  # w, the weight of the empirical mean (1 - w is the prior's weight)
    mean: Tensor  # m_k on the +-1 scale (0 where k = 0)
    prior: Tensor  # V on the +-1 scale
    d2: Tensor  # D2 = max(0, (m_k - V)^2 - 1/k), 0 where k = 0
    k: Tensor  # number of rollouts (float)


def fusion_stats(
    rewards: RewardsLike,
    prior: Tensor | Sequence[float],
    reward_range: tuple[float, float] = (0.0, 1.0),
    counts: Tensor | Sequence[int] | None = None,
) -> FusionStats:
    """Compute the shrinkage fusion of the prior with the rewards so far (see the module docstring).

    Args:
        rewards: rewards per prompt, a list of 1-D tensors or ``[B, K]`` (+ ``counts``), on the original scale.
        prior: ``[B]`` expected reward per prompt on the original scale.
        reward_range: ``(lo, hi)`` of the reward; both rewards and prior are mapped to +-1 with it.
        counts: valid entries per row when ``rewards`` is padded.
    """
    padded, counts_t, valid = pad_groups(rewards, counts)  # [B, K], [B], [B, K]
    signed = to_signed_scale(padded, reward_range).masked_fill(~valid, 0.0)  # [B, K]
    v = to_signed_scale(torch.as_tensor(prior, dtype=torch.float32, device=padded.device).reshape(-1), reward_range)
    if v.numel() != padded.shape[0]:
        raise ValueError(f"prior must have one value per prompt ({padded.shape[0]}), got {v.numel()}.")
    k = counts_t.float()  # [B]
    has = counts_t > 0
    safe_k = k.clamp(min=1.0)
    mean = torch.where(has, signed.sum(dim=1) / safe_k, torch.zeros_like(k))  # [B]
    d2 = torch.where(has, ((mean - v) ** 2 - 1.0 / safe_k).clamp(min=0.0), torch.zeros_like(k))
    weight = torch.where(has, d2 / (d2 + 1.0 / safe_k), torch.zeros_like(k))
    baseline = from_signed_scale(weight * mean + (1.0 - weight) * v, reward_range)
    return FusionStats(baseline=baseline, weight=weight, mean=mean, prior=v, d2=d2, k=k)


def shrinkage_baseline(
    rewards: RewardsLike,
    prior: Tensor | Sequence[float],
    reward_range: tuple[float, float] = (0.0, 1.0),
    counts: Tensor | Sequence[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Fused baseline per prompt: returns ``(baseline [B] on the original scale, w [B])``.

    ``w`` is the weight of the empirical mean: 0 when the rewards agree with the prior within the noise level
    (``|m_k - V| <= 1/sqrt(k)`` on the +-1 scale), approaching 1 when they are far apart. See `fusion_stats`.
    """
    stats = fusion_stats(rewards, prior, reward_range, counts)
    return stats.baseline, stats.weight


def fused_mse(d2: Tensor, k: Tensor | float) -> Tensor:
    """Plug-in MSE of the fused baseline on the +-1 scale after k rollouts: ``D2 / (1 + k D2)``.

    Assumes the reward noise variance is its bound 1 and that D2 estimates the prior's squared bias (module docstring).
    """
    return d2 / (1.0 + k * d2)


def fused_mse_gain(d2: Tensor, k: Tensor | float) -> Tensor:
    """Estimated MSE reduction of one more rollout: ``MSE_k - MSE_{k+1} = D2^2 / ((1 + k D2) (1 + (k + 1) D2))``."""
    return d2 * d2 / ((1.0 + k * d2) * (1.0 + (k + 1.0) * d2))


def fused_advantages(
    rewards: RewardsLike,
    baseline: Tensor,
    counts: Tensor | Sequence[int] | None = None,
    scale: ScaleMode = "none",
    eps: float = 1e-4,
) -> Tensor | list[Tensor]:
    """Advantages ``A_i = (r_i - b) / s`` for the fused baseline ``b`` (original reward scale).

    Scaling ``s``:
        - ``"none"``: s = 1 (the V0.5 form; the baseline already carries the variance reduction).
        - ``"group"``: s = the group's sample standard deviation + eps, as in GRPO. With a fused baseline a group
          whose rewards are all equal has a non-zero advantage (r - b) but zero std; dividing by eps would blow it up
          by 1e4, so groups with fewer than 2 rollouts or zero std use the batch standard deviation instead.
        - ``"batch"``: s = the standard deviation of all rewards in the batch + eps (TRL's ``scale_rewards="batch"``).

        When every reward of the batch is equal (batch std 0, e.g. a batch where nothing is solved yet) the fused
        advantages r - b can still be non-zero; the batch std then falls back to 1 (no scaling) instead of dividing
        by eps.

    Returns the same layout as ``rewards``: a list of 1-D tensors, or ``[B, K]`` with 0 at padded positions.
    """
    if scale not in _SCALES:
        raise ValueError(f"scale must be one of {_SCALES}, got {scale!r}.")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}.")
    as_list = not isinstance(rewards, Tensor)
    padded, counts_t, valid = pad_groups(rewards, counts)  # [B, K]
    b = baseline.to(device=padded.device, dtype=torch.float32).reshape(-1, 1)  # [B, 1]
    adv = (padded - b).masked_fill(~valid, 0.0)  # [B, K]
    if scale != "none":
        flat = padded[valid]
        batch_std = flat.std() if flat.numel() > 1 else torch.zeros((), device=padded.device)
        batch_std = torch.where(batch_std > 0, batch_std, torch.ones_like(batch_std))  # all equal: no scaling
        denom = batch_std.expand(padded.shape[0]).clone()  # [B]
        if scale == "group":
            k = counts_t.float()
            mean = padded.sum(dim=1) / k.clamp(min=1.0)
            var = (((padded - mean[:, None]) ** 2).masked_fill(~valid, 0.0)).sum(dim=1) / (k - 1.0).clamp(min=1.0)
            group_std = var.sqrt()
            use_group = (counts_t >= 2) & (group_std > 0)
            denom = torch.where(use_group, group_std, denom)
        adv = adv / (denom[:, None] + eps)
    if as_list:
        return [adv[i, : int(n)] for i, n in enumerate(counts_t.tolist())]
    return adv
