"""V0.5 dynamic rollout budget: roll a prompt out more only while it is expected to improve its baseline enough.

Rule (SPEC section 4; V0.5, arXiv 2603.10848): every prompt starts with ``k_init`` rollouts; then, in rounds, a prompt
gets more rollouts ("rollout more") while the estimated MSE reduction of one more rollout exceeds ``cost`` and
k < ``k_max``. All prompts are decided together each round, so generation stays batched.

The MSE estimate (derived from the paper's shrinkage test; see `budget.baseline`). On the +-1 scale, with the reward
noise variance at its bound 1 and D2 = max(0, (m_k - V)^2 - 1/k) as the estimate of the prior's squared bias, the
fused baseline b = w m_k + (1 - w) V with the optimal w = D2 / (D2 + 1/k) has

    MSE_k = D2 / (1 + k D2),        gain_k = MSE_k - MSE_{k+1} = D2^2 / ((1 + k D2) (1 + (k + 1) D2)).

Assumptions: rewards are independent given the prompt; the noise variance is 1 (the worst case on +-1; binary rewards
at p = 1/2); the squared bias stays at its current plug-in estimate D2 when predicting the next rollout (the decision
is re-made with the new D2 after every round). Behaviour:

- Agreement: if |m_k - V| <= 1/sqrt(k), D2 = 0, the prior is trusted fully, gain = 0, and the prompt stops -- at
  k_init when the first rollouts already agree with the prior.
- Conflict: as D2 grows the gain tends to 1/k - 1/(k + 1) = 1/(k (k + 1)), the gain of the plain sample mean. With
  cost = 0.0039 (about 1/256) that stays above the cost up to k = 15 (1/240) and falls below it at k = 16 (1/272), so a
  prompt whose prior is badly wrong keeps going to k_max = 16: the default cost and k_max agree.
- In between, the gain is increasing in D2, so a prompt stops once D2 is small enough for its k (about D2 < 0.085
  at k = 4 with the default cost).

Batched rounds: ``step`` rollouts are added per "rollout more" decision (1 = the paper's one-at-a-time rule; larger
values use fewer generation rounds). A prompt never gets more than ``planned`` rollouts in a round: the number of
further rollouts j = k, k+1, ... < k_max whose gain_j (at the current D2) exceeds the cost; the gain decreases in j,
so ``planned`` is where the one-at-a-time rule would stop if D2 did not change. `next_round` with ``rounds_left``
spreads ``planned`` over the remaining rounds (the last round gets all of it).

Metrics (`metrics`, namespace ``budget/``): mean/min/max k, the share of prompts stopped at k_init and at k_max, the
mean prior weight 1 - w, rollouts used versus a fixed-G run (``fixed_group_size``, default k_max), generation rounds,
and the mean estimated MSE of the final baselines; cumulative totals over all steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .baseline import FusionStats, RewardsLike, check_reward_range, fused_mse, fused_mse_gain, fusion_stats


class RolloutBudget:
    """Per-prompt adaptive group size for V0.5 (see the module docstring for the rule and the MSE estimate).

    Args:
        k_init: rollouts every prompt gets in the first round (>= 1).
        k_max: the most rollouts a prompt can get (>= k_init).
        cost: price of one rollout in units of baseline MSE on the +-1 scale (>= 0); default 0.0039 (about 1/256).
        step: rollouts added per "rollout more" decision in a round (>= 1); 1 is the paper's rule.
        reward_range: ``(lo, hi)`` of the reward, used to map rewards and prior to +-1.
        fixed_group_size: the G of the fixed-group run the rollout savings are reported against (default k_max).
    """

    def __init__(
        self,
        k_init: int = 4,
        k_max: int = 16,
        cost: float = 0.0039,
        step: int = 1,
        reward_range: tuple[float, float] = (0.0, 1.0),
        fixed_group_size: int | None = None,
    ):
        if not (isinstance(k_init, int) and k_init >= 1):
            raise ValueError(f"k_init must be an int >= 1, got {k_init!r}.")
        if not (isinstance(k_max, int) and k_max >= k_init):
            raise ValueError(f"k_max must be an int >= k_init ({k_init}), got {k_max!r}.")
        if not (math.isfinite(cost) and cost >= 0):
            raise ValueError(f"cost must be a finite float >= 0, got {cost}.")
        if not (isinstance(step, int) and step >= 1):
            raise ValueError(f"step must be an int >= 1, got {step!r}.")
        if fixed_group_size is not None and not (isinstance(fixed_group_size, int) and fixed_group_size >= 1):
            raise ValueError(f"fixed_group_size must be None or an int >= 1, got {fixed_group_size!r}.")
        self.k_init = k_init
        self.k_max = k_max
        self.cost = float(cost)
        self.step = step
        self.reward_range = check_reward_range(reward_range)
        self.fixed_group_size = k_max if fixed_group_size is None else fixed_group_size
        self._metrics: dict[str, float] = {}
        self._total_rollouts = 0
        self._total_fixed = 0
        self._steps = 0

    # --------------------------------------------------------------------------------------------------------------
    # Decisions
    def stats(self, rewards: RewardsLike, prior: Tensor | Sequence[float], counts=None) -> FusionStats:
        """The shrinkage fusion of ``prior`` with the rewards so far (`budget.baseline.fusion_stats`)."""
        return fusion_stats(rewards, prior, self.reward_range, counts)

    def gains(self, rewards: RewardsLike, prior: Tensor | Sequence[float], counts=None) -> Tensor:
        """Estimated MSE reduction of one more rollout per prompt, ``[B]`` (+-1 scale)."""
        s = self.stats(rewards, prior, counts)
        return fused_mse_gain(s.d2, s.k)

    def planned(self, rewards: RewardsLike, prior: Tensor | Sequence[float], counts=None) -> Tensor:
        """Further rollouts each prompt is worth at its current D2, ``[B]`` int64 (k_init - k below k_init).

        Counts j = k .. k_max - 1 with gain_j(D2) > cost (the gain falls with j, so these are the first ones).
        """
        return self._plan(self.stats(rewards, prior, counts))

    def _plan(self, s: FusionStats) -> Tensor:
        k = s.k.long()  # [B]
        j = torch.arange(self.k_max, device=k.device, dtype=torch.float32)  # [k_max]
        worth = fused_mse_gain(s.d2[:, None], j[None, :]) > self.cost  # [B, k_max]
        worth &= j[None, :] >= s.k[:, None]
        n = worth.sum(dim=1)
        return torch.where(k < self.k_init, self.k_init - k, n)

    def decide(self, rewards: RewardsLike, prior: Tensor | Sequence[float], counts=None) -> Tensor:
        """Whether each prompt should "rollout more", ``[B]`` bool: k < k_init, or gain > cost and k < k_max."""
        return self.planned(rewards, prior, counts) > 0

    def next_round(
        self, rewards: RewardsLike, prior: Tensor | Sequence[float], counts=None, rounds_left: int | None = None
    ) -> Tensor:
        """How many more rollouts each prompt gets in the next round, ``[B]`` int64 (0 = stop).

        Prompts below k_init are filled up to it. Otherwise ``min(planned, step)``; with ``rounds_left`` (rounds
        still allowed, this one included) at least ``ceil(planned / rounds_left)``, so the plan is met by the last
        round. All zeros means the step's generation is finished.
        """
        if rounds_left is not None and not (isinstance(rounds_left, int) and rounds_left >= 1):
            raise ValueError(f"rounds_left must be None or an int >= 1, got {rounds_left!r}.")
        s = self.stats(rewards, prior, counts)
        plan = self._plan(s)
        per_round = torch.full_like(plan, self.step)
        if rounds_left is not None:
            per_round = torch.maximum(per_round, (plan + rounds_left - 1) // rounds_left)
        return torch.where(s.k.long() < self.k_init, plan, torch.minimum(plan, per_round))

    def run(
        self,
        sample_fn: Callable[[Tensor], Sequence[Tensor]],
        prior: Tensor | Sequence[float],
        max_rounds: int | None = None,
    ) -> list[Tensor]:
        """Drive the rounds for one step and record the metrics.

        Args:
            sample_fn: ``sample_fn(n [B] int64) -> list of B 1-D reward tensors``, the i-th with ``n[i]`` rewards
                (generate ``n[i]`` more rollouts of prompt i, in one batch, and score them).
            prior: ``[B]`` expected reward per prompt (original scale).
            max_rounds: most generation rounds (the first, k_init round included); None = until every prompt stops.

        Returns:
            The rewards of every prompt, a list of B 1-D tensors in generation order.
        """
        if max_rounds is not None and not (isinstance(max_rounds, int) and max_rounds >= 1):
            raise ValueError(f"max_rounds must be None or an int >= 1, got {max_rounds!r}.")
        prior_t = torch.as_tensor(prior, dtype=torch.float32).reshape(-1)
        rewards = [torch.zeros(0, device=prior_t.device) for _ in range(prior_t.numel())]
        rounds = 0
        while max_rounds is None or rounds < max_rounds:
            left = None if max_rounds is None else max_rounds - rounds
            n = self.next_round(rewards, prior_t, rounds_left=left)
            if not bool((n > 0).any()):
                break
            new = list(sample_fn(n))
            if len(new) != len(rewards):
                raise ValueError(f"sample_fn returned {len(new)} reward tensors for {len(rewards)} prompts.")
            for i, (old, add) in enumerate(zip(rewards, new, strict=True)):
                add = torch.as_tensor(add, dtype=torch.float32).reshape(-1).to(old.device)
                if add.numel() != int(n[i]):
                    raise ValueError(
                        f"sample_fn returned {add.numel()} rewards for prompt {i}, asked for {int(n[i])}."
                    )
                rewards[i] = torch.cat([old, add])
            rounds += 1
        self.observe(rewards, prior_t, rounds=rounds)
        return rewards

    # --------------------------------------------------------------------------------------------------------------
    # Bookkeeping
    def observe(
        self, rewards: RewardsLike, prior: Tensor | Sequence[float], counts=None, rounds: int | None = None
    ) -> FusionStats:
        """Record a finished step (final rewards per prompt) in the metrics; returns its fusion statistics."""
        s = self.stats(rewards, prior, counts)
        k = s.k
        B = k.numel()
        used = int(k.sum())
        fixed = B * self.fixed_group_size
        self._total_rollouts += used
        self._total_fixed += fixed
        self._steps += 1
        nan = float("nan")
        self._metrics = {
            "budget/k_mean": float(k.mean()) if B else nan,
            "budget/k_min": float(k.min()) if B else nan,
            "budget/k_max": float(k.max()) if B else nan,
            "budget/stopped_at_k_init": float((k <= self.k_init).float().mean()) if B else nan,
            "budget/reached_k_max": float((k >= self.k_max).float().mean()) if B else nan,
            "budget/prior_weight": float((1.0 - s.weight).mean()) if B else nan,
            "budget/baseline_mse_est": float(fused_mse(s.d2, s.k).mean()) if B else nan,
            "budget/rollouts": float(used),
            "budget/rollouts_fixed": float(fixed),
            "budget/rollout_ratio": used / fixed if fixed else nan,
            "budget/total_rollouts": float(self._total_rollouts),
            "budget/total_rollouts_fixed": float(self._total_fixed),
        }
        if rounds is not None:
            self._metrics["budget/rounds"] = float(rounds)
        return s

    def metrics(self) -> dict[str, float]:
        """Metrics of the last observed step plus cumulative totals (``budget/``)."""
        return dict(self._metrics)

    def state_dict(self) -> dict[str, Any]:
        return {
            "total_rollouts": self._total_rollouts,
            "total_fixed": self._total_fixed,
            "steps": self._steps,
            "metrics": dict(self._metrics),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._total_rollouts = int(state["total_rollouts"])
        self._total_fixed = int(state["total_fixed"])
        self._steps = int(state["steps"])
        self._metrics = dict(state["metrics"])
