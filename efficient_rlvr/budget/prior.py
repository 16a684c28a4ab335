"""Value priors for V0.5: an expected reward per prompt before (and while) it is rolled out.

The V0.5 paper (arXiv 2603.10848) takes the prior from a pretrained generalist value model, V0. Its weights are not
available here, so the prior is a protocol, `ValuePrior`, with two implementations:

- `HistoryPrior` (default): the prompt's own past group means, shrunk toward the running dataset mean when the prompt
  has few visits:  V(x) = (n_x * mean_x + s * g) / (n_x + s), with n_x the visits of x, mean_x their average group
  mean (or an EMA of them), g the running mean over all observed groups and s = ``shrinkage`` pseudo-visits. An unseen
  prompt gets g. Memory is bounded: per prompt only two numbers (a running sum of group means and a visit count, or
  an EMA value and a visit count), for at most ``max_prompts`` prompts; when a new prompt would exceed the cap, the
  prompt observed least recently is evicted (its history is the stalest: the policy has changed most since) and is
  treated as unseen again.
- `CallablePrior(fn)`: any user function ``fn(keys, prompts) -> [B]`` expected rewards.

Plugging in a pretrained value model: a frozen model is a `CallablePrior` whose function tokenizes ``prompts`` and
returns the model's predicted success probability mapped to the reward range (e.g. ``lo + p * (hi - lo)``). A value
model that keeps learning on the run's own rewards implements `ValuePrior` directly: ``prior`` runs the model under
``torch.no_grad``, ``observe`` takes a regression step toward the observed group means, and ``state_dict`` carries its
weights and optimizer state so a resumed run continues identically.

All values are on the run's reward scale (e.g. [0, 1]); `budget.baseline` maps them to +-1 itself.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from .baseline import RewardsLike, pad_groups


@runtime_checkable
class ValuePrior(Protocol):
    """What the V0.5 baseline and budget need from a prior."""

    def prior(self, keys: Sequence[Hashable], prompts: Sequence[Any] | None = None) -> Tensor:
        """Expected reward per prompt, ``[B]`` float32 on the run's reward scale."""
        ...

    def observe(self, keys: Sequence[Hashable], group_rewards: RewardsLike) -> None:
        """Record the rewards of the finished groups (list of 1-D tensors or ``[B, G]``)."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def metrics(self) -> dict[str, float]: ...


def group_means(group_rewards: RewardsLike) -> list[float | None]:
    """Mean reward of each group, ignoring NaN entries (TRL marks missing rewards as NaN); None for an empty group."""
    padded, _, valid = pad_groups(group_rewards)  # [B, K]
    valid = valid & torch.isfinite(padded)
    n = valid.sum(dim=1)
    sums = padded.masked_fill(~valid, 0.0).sum(dim=1)
    return [s / c if c > 0 else None for s, c in zip(sums.tolist(), n.tolist(), strict=True)]


class HistoryPrior:
    """A prompt's past group means, shrunk toward the running dataset mean (see the module docstring).

    Args:
        shrinkage: s >= 0, pseudo-visits of the dataset mean; 0 uses the prompt's own history as soon as it has one.
        ema: None keeps the plain average of all past group means per prompt (running sum / count); a value in
            (0, 1] keeps an exponential moving average instead, ``v <- (1 - ema) v + ema * mean`` (tracks a changing
            policy). With an EMA, the visit count used for shrinkage is capped at the EMA's effective sample size
            ``(2 - ema) / ema``, and the dataset mean is an EMA over observe calls of the call's average group mean.
        max_prompts: cap on the number of prompts tracked (least-recently-observed eviction), >= 1.
        default: the value returned before any group has been observed (e.g. the middle of the reward range).
    """

    def __init__(
        self, shrinkage: float = 2.0, ema: float | None = None, max_prompts: int = 100_000, default: float = 0.5
    ):
        if not (math.isfinite(shrinkage) and shrinkage >= 0):
            raise ValueError(f"shrinkage must be a finite float >= 0, got {shrinkage}.")
        if ema is not None and not 0 < ema <= 1:
            raise ValueError(f"ema must be None or in (0, 1], got {ema}.")
        if not (isinstance(max_prompts, int) and max_prompts >= 1):
            raise ValueError(f"max_prompts must be an int >= 1, got {max_prompts!r}.")
        if not math.isfinite(default):
            raise ValueError(f"default must be finite, got {default}.")
        self.shrinkage = float(shrinkage)
        self.ema = None if ema is None else float(ema)
        self.max_prompts = max_prompts
        self.default = float(default)
        # key -> [sum of group means (or EMA value), visits]; order = least recently observed first.
        self._table: OrderedDict[Hashable, list[float]] = OrderedDict()
        self._global_sum = 0.0  # plain mode: sum of all group means ever observed
        self._global_count = 0  # number of groups ever observed
        self._global_ema: float | None = None
        self._evicted = 0
        self._last_hit_rate = float("nan")
        self._last_abs_error = float("nan")

    # --------------------------------------------------------------------------------------------------------------
    def global_mean(self) -> float:
        """The running dataset mean g (``default`` before any observation)."""
        if self._global_count == 0:
            return self.default
        if self.ema is not None:
            return float(self._global_ema)
        return self._global_sum / self._global_count

    def _value(self, key: Hashable, g: float) -> tuple[float, bool]:
        entry = self._table.get(key)
        if entry is None:
            return g, False
        stat, visits = entry
        if self.ema is None:
            own, n = stat / visits, visits
        else:
            own, n = stat, min(visits, (2.0 - self.ema) / self.ema)
        return (n * own + self.shrinkage * g) / (n + self.shrinkage), True

    def prior(self, keys: Sequence[Hashable], prompts: Sequence[Any] | None = None) -> Tensor:
        """Expected reward per key, ``[B]`` float32 (CPU); ``prompts`` is unused."""
        g = self.global_mean()
        values, hits = [], 0
        for key in keys:
            v, hit = self._value(key, g)
            values.append(v)
            hits += hit
        self._last_hit_rate = hits / len(keys) if len(keys) else float("nan")
        return torch.tensor(values, dtype=torch.float32)

    def observe(self, keys: Sequence[Hashable], group_rewards: RewardsLike) -> None:
        """Record one visit per (key, group); groups with no finite reward are skipped. Duplicate keys count twice."""
        means = group_means(group_rewards)
        if len(means) != len(keys):
            raise ValueError(f"observe got {len(keys)} keys but {len(means)} groups.")
        g = self.global_mean()
        errors = [abs(self._value(k, g)[0] - m) for k, m in zip(keys, means, strict=True) if m is not None]
        self._last_abs_error = sum(errors) / len(errors) if errors else float("nan")
        seen = [m for m in means if m is not None]
        for key, m in zip(keys, means, strict=True):
            if m is None:
                continue
            entry = self._table.get(key)
            if entry is None:
                self._table[key] = [m, 1]
                while len(self._table) > self.max_prompts:
                    self._table.popitem(last=False)
                    self._evicted += 1
            else:
                if self.ema is None:
                    entry[0] += m
                else:
                    entry[0] = (1.0 - self.ema) * entry[0] + self.ema * m
                entry[1] += 1
                self._table.move_to_end(key)
        if seen:
            self._global_sum += sum(seen)
            if self.ema is not None:
                batch_mean = sum(seen) / len(seen)
                prev = self._global_ema
                self._global_ema = batch_mean if prev is None else (1.0 - self.ema) * prev + self.ema * batch_mean
            self._global_count += len(seen)

    # --------------------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._table)

    def metrics(self) -> dict[str, float]:
        """``budget/prior_*``: prompts tracked, evictions so far, dataset mean, last lookup hit rate, and the mean
        absolute error of the prior against the group means of the last ``observe`` (prior taken before updating)."""
        return {
            "budget/prior_tracked": float(len(self._table)),
            "budget/prior_evicted": float(self._evicted),
            "budget/prior_global_mean": float(self.global_mean()),
            "budget/prior_hit_rate": float(self._last_hit_rate),
            "budget/prior_abs_error": float(self._last_abs_error),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "shrinkage": self.shrinkage,
            "ema": self.ema,
            "max_prompts": self.max_prompts,
            "default": self.default,
            "keys": list(self._table.keys()),
            "stats": [list(v) for v in self._table.values()],
            "global_sum": self._global_sum,
            "global_count": self._global_count,
            "global_ema": self._global_ema,
            "evicted": self._evicted,
            "last_hit_rate": self._last_hit_rate,
            "last_abs_error": self._last_abs_error,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.shrinkage = float(state["shrinkage"])
        self.ema = state["ema"]
        self.max_prompts = int(state["max_prompts"])
        self.default = float(state["default"])
        self._table = OrderedDict((k, list(v)) for k, v in zip(state["keys"], state["stats"], strict=True))
        self._global_sum = float(state["global_sum"])
        self._global_count = int(state["global_count"])
        self._global_ema = state["global_ema"]
        self._evicted = int(state["evicted"])
        self._last_hit_rate = float(state["last_hit_rate"])
        self._last_abs_error = float(state["last_abs_error"])


class CallablePrior:
    """A prior given by a user function ``fn(keys, prompts) -> [B]`` expected rewards (list, array or tensor).

    Args:
        fn: the function; it must return one finite value per key.
        observe_fn: optional ``observe_fn(keys, group_rewards)`` called by `observe` (e.g. to train a value head);
            its state is the caller's to save.
        clip_range: optional ``(lo, hi)``; predictions are clamped to it (a value model may overshoot the range).
    """

    def __init__(
        self,
        fn: Callable[[Sequence[Hashable], Sequence[Any] | None], Any],
        observe_fn: Callable[[Sequence[Hashable], RewardsLike], None] | None = None,
        clip_range: tuple[float, float] | None = None,
    ):
        if not callable(fn):
            raise ValueError(f"fn must be callable, got {type(fn).__name__}.")
        if observe_fn is not None and not callable(observe_fn):
            raise ValueError(f"observe_fn must be callable or None, got {type(observe_fn).__name__}.")
        if clip_range is not None and not clip_range[1] > clip_range[0]:
            raise ValueError(f"clip_range must be (lo, hi) with hi > lo, got {clip_range!r}.")
        self.fn = fn
        self.observe_fn = observe_fn
        self.clip_range = clip_range
        self._last_mean = float("nan")

    def prior(self, keys: Sequence[Hashable], prompts: Sequence[Any] | None = None) -> Tensor:
        out = self.fn(keys, prompts)
        values = (out.detach() if isinstance(out, Tensor) else torch.as_tensor(out)).float().reshape(-1).cpu()
        if values.numel() != len(keys):
            raise ValueError(f"prior function returned {values.numel()} values for {len(keys)} keys.")
        if not bool(torch.isfinite(values).all()):
            raise ValueError("prior function returned a non-finite value.")
        if self.clip_range is not None:
            values = values.clamp(self.clip_range[0], self.clip_range[1])
        self._last_mean = float(values.mean()) if values.numel() else float("nan")
        return values

    def observe(self, keys: Sequence[Hashable], group_rewards: RewardsLike) -> None:
        if self.observe_fn is not None:
            self.observe_fn(keys, group_rewards)

    def metrics(self) -> dict[str, float]:
        return {"budget/prior_mean": self._last_mean}

    def state_dict(self) -> dict[str, Any]:
        return {"last_mean": self._last_mean}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._last_mean = float(state["last_mean"])
