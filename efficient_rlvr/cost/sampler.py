"""Cost-aware minibatch sampling for the policy-gradient phase (Cost-Aware GRPO, arXiv 2604.28020; SPEC section 3).

Algorithm. A training step produces N rollouts. Rollout i costs c_i = prompt tokens + completion tokens (the FLOPs of
its policy-gradient forward/backward are linear in c_i) and has GRPO advantage A_i, whose magnitude is the paper's
proxy for the per-sample gradient norm G_i. Cost-aware SGD minimises (expected cost per step) x (second moment of the
importance-weighted gradient estimator); the minimiser is

    p*_i = (G_i / sqrt(c_i)) / sum_j (G_j / sqrt(c_j)),        G_i = |A_i|,

optionally smoothed towards uniform: p_i = (1 - alpha) p*_i + alpha / N. The policy-gradient minibatches are filled by
drawing M rollouts from p **with replacement** (instead of using every rollout once), and each drawn rollout's loss
term is multiplied by the importance weight

    w_i = 1 / (N p_i),

so that E_p[w_i l_i] = (1/N) sum_i l_i: the sampled, weighted objective is an unbiased estimate of the full-batch
mean. Rollouts with A_i = 0 exactly (every rollout of a zero-variance group) get p_i = 0 unless smoothed, so they are
never trained on: their policy-gradient term is exactly zero anyway (see `weighting.py` for the KL / entropy terms).

Re-centring (paper appendix G.2, corrected; SPEC 3 "Correction"). The paper divides the weights by their mean over
the M draws so that they average 1 and calls this a constant rescaling. It is not one when the pool still holds
A = 0 rows: the raw weights average N_+ / N there (N_+ = rows with p_i > 0), so dividing by their mean multiplies the
objective by about N / N_+ (1.4x at 30% zero-advantage rows, 2.5x at 60%: a learning-rate change that varies every
step); and even with N_+ = N the draw-dependent divisor makes a ratio estimator, biased by O(1/M). So `recenter=True`
divides by a constant only, the *expected* raw weight E_p[1 / (N p_i)] = N_+ / N:

    w_i = 1 / (N_+ p_i),        E_p[w_i] = 1,        E_p[w_i l_i] = (1/N_+) sum_{p_j > 0} l_j,

an exact, unbiased estimate of the mean over the N_+ drawable rows. Its target is the full-batch mean times N / N_+
when the undrawable rows' terms are zero (alpha = 0: A = 0, policy term 0), so a caller that needs the full-batch mean
multiplies by N_+ / N (the stage folds N_+ into its loss multiplier, keeping TRL's full-batch normaliser; see
stage.py), or uses `recenter=False`: the raw weights 1 / (N p_i), unbiased for the full-batch mean directly. With
alpha > 0 or no zero advantages N_+ = N and both coincide. `metrics()` reports the raw weights and N_+
(`cost/support_rows`).

Deviations and choices (ours, documented): only exact zeros count as zero by default (`eps=0`): a small continuous
advantage (graded rewards, `scale_rewards="none"`) is a real gradient term, and with p_i ~ |A_i| its drawn,
weighted term has the same size as any other, so treating it as zero would bias the estimate (an earlier default of
1e-3 did). The float32 round-off of a zero-variance group of non-binary rewards (a group of 8 rewards all 0.7 can give
|A| ~6e-4 after GRPO's normalisation) is then drawn, rarely, with a large weight: an unbiased estimate of what the
full batch trains on too. `eps > 0` remains available.
If every advantage is zero, the target distribution p* is undefined and the sampler falls back to uniform sampling
(reported as `cost/uniform_fallback` = 1). The sampler owns a CPU `torch.Generator`; probabilities are computed in
float64 on the CPU, so every process that is given the same global advantages and costs draws the same indices, and
`state_dict()` / `load_state_dict()` make the next draws repeat after a resume.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["CostAwareSampler", "rollout_costs", "select_rows"]


def rollout_costs(prompt_mask: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Cost of each rollout: its number of prompt tokens plus completion tokens (SPEC 3).

    Args:
        prompt_mask: `[N, P]` attention mask of the (left-padded) prompts.
        completion_mask: `[N, C]` mask of the completions (TRL's `completion_mask`, before any truncation masking
            if you want the tokens actually processed; the policy pass runs over them either way).

    Returns:
        `[N]` float32 tensor on the masks' device.
    """
    if prompt_mask.dim() != 2 or completion_mask.dim() != 2 or prompt_mask.size(0) != completion_mask.size(0):
        raise ValueError(
            f"prompt_mask and completion_mask must be [N, P] and [N, C] with the same N, got "
            f"{tuple(prompt_mask.shape)} and {tuple(completion_mask.shape)}."
        )
    return prompt_mask.sum(dim=1).float() + completion_mask.sum(dim=1).float()  # [N]


def select_rows(batch: dict[str, Any], indices: torch.Tensor, num_rows: int) -> dict[str, Any]:
    """Gather the drawn rollouts out of a TRL generation-batch dict.

    Every tensor (or list) whose first dimension is `num_rows` is indexed by `indices` (repeats allowed); anything else
    (e.g. the scalar `num_items_in_batch`, which must keep counting the *full* batch's tokens) is passed through.

    Args:
        batch: dict as produced by `GRPOTrainer._generate_and_score_completions`.
        indices: `[M]` long tensor of drawn rows.
        num_rows: N, the number of rollouts in `batch`.
    """
    out: dict[str, Any] = {}
    idx_list = indices.tolist()
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.size(0) == num_rows:
            out[key] = value.index_select(0, indices.to(value.device))
        elif isinstance(value, list) and len(value) == num_rows:
            out[key] = [value[i] for i in idx_list]
        else:
            out[key] = value
    return out


class CostAwareSampler:
    """Draw policy-gradient minibatches from p_i ~ |A_i| / sqrt(c_i) with importance weights 1 / (N p_i).

    Args:
        alpha: smoothing towards uniform, in [0, 1]; 0 is the paper's main method, 1 is uniform sampling.
        num_draws: default number of draws M per `draw()` call (None: M = N, the number of rollouts given).
        seed: seed of the sampler's own CPU `torch.Generator`.
        eps: advantages with |A| <= eps count as zero (>= 0; default 0: only exact zeros, see the module docstring).
        recenter: divide the raw weights 1 / (N p_i) by their expected value N_+ / N (a constant of the step, never
            the draws' own mean), giving 1 / (N_+ p_i); see the module docstring. Metrics always report the raw
            weights.

    Use `probabilities()` to inspect the distribution, `draw()` once per policy-gradient phase (or per minibatch),
    `metrics()` for logging under `cost/`, `state_dict()` / `load_state_dict()` for checkpoints.
    """

    def __init__(
        self,
        alpha: float = 0.0,
        num_draws: int | None = None,
        seed: int = 0,
        eps: float = 0.0,
        recenter: bool = True,
    ) -> None:
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}.")
        if num_draws is not None and (isinstance(num_draws, bool) or not isinstance(num_draws, int) or num_draws < 1):
            raise ValueError(f"num_draws must be None or an integer >= 1, got {num_draws!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}.")
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not math.isfinite(eps) or eps < 0:
            raise ValueError(f"eps must be a finite number >= 0, got {eps!r}.")
        self.alpha = float(alpha)
        self.num_draws = num_draws
        self.seed = seed
        self.eps = float(eps)
        self.recenter = bool(recenter)
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(seed)
        self._policy_tokens_cumulative = 0.0
        self._full_tokens_cumulative = 0.0
        self._num_calls = 0
        self._last: dict[str, float] = {}

    # ------------------------------------------------------------------ distribution
    def _validated(self, advantages: torch.Tensor, costs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float64 CPU copies of the inputs after shape/value checks."""
        advantages = torch.as_tensor(advantages)
        costs = torch.as_tensor(costs)
        if advantages.dim() != 1 or costs.dim() != 1:
            raise ValueError(
                f"advantages and costs must be 1-D [N] tensors (one value per rollout), got shapes "
                f"{tuple(advantages.shape)} and {tuple(costs.shape)}."
            )
        if advantages.numel() != costs.numel():
            raise ValueError(
                f"advantages and costs must have the same length, got {advantages.numel()} and {costs.numel()}."
            )
        if advantages.numel() == 0:
            raise ValueError("advantages and costs must hold at least one rollout, got N = 0.")
        adv = advantages.detach().to(device="cpu", dtype=torch.float64)  # [N]
        cost = costs.detach().to(device="cpu", dtype=torch.float64)  # [N]
        if not torch.isfinite(adv).all():
            raise ValueError("advantages must be finite (no NaN/inf); set unusable rollouts' advantage to 0.")
        if not torch.isfinite(cost).all() or (cost <= 0).any():
            raise ValueError(f"costs must be finite and > 0 (tokens per rollout), got min {cost.min().item():g}.")
        return adv, cost

    def _probabilities64(self, adv: torch.Tensor, cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(p [N] float64, zero-advantage mask [N] bool, uniform_fallback)."""
        n = adv.numel()
        magnitude = adv.abs()  # G_i ~ |A_i|
        zero = magnitude <= self.eps  # [N]
        score = torch.where(zero, torch.zeros_like(magnitude), magnitude / cost.sqrt())  # [N]
        total = score.sum()
        fallback = bool(total.item() <= 0.0)
        uniform = torch.full_like(score, 1.0 / n)
        target = uniform if fallback else score / total  # p*
        p = (1.0 - self.alpha) * target + self.alpha * uniform  # [N]
        return p, zero, fallback

    def probabilities(self, advantages: torch.Tensor, costs: torch.Tensor) -> torch.Tensor:
        """Sampling distribution p over the step's rollouts.

        Args:
            advantages: `[N]` advantage of each rollout (any float dtype/device).
            costs: `[N]` cost of each rollout (> 0; prompt + completion tokens, see `rollout_costs`).

        Returns:
            `[N]` float32 tensor on `advantages`' device, summing to 1. Pure: does not advance the generator.
        """
        adv, cost = self._validated(advantages, costs)
        p, _, _ = self._probabilities64(adv, cost)
        device = advantages.device if isinstance(advantages, torch.Tensor) else torch.device("cpu")
        return p.to(device=device, dtype=torch.float32)

    def support_size(self, advantages: torch.Tensor, costs: torch.Tensor) -> int:
        """N_+: the number of rollouts with p_i > 0 (float64, so no tiny p underflows); `recenter` divides by N_+ / N."""
        adv, cost = self._validated(advantages, costs)
        p, _, _ = self._probabilities64(adv, cost)
        return int((p > 0).sum())

    # ------------------------------------------------------------------ sampling
    def draw(
        self, advantages: torch.Tensor, costs: torch.Tensor, num_draws: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw M rollouts i.i.d. from p (with replacement) and return their importance weights.

        Args:
            advantages: `[N]` advantages (the *global* batch, identical on every process).
            costs: `[N]` costs (> 0).
            num_draws: M; defaults to the constructor's `num_draws`, else N.

        Returns:
            indices `[M]` (long) and weights `[M]` (float32), both on `advantages`' device. weights = 1 / (N p_i),
            or 1 / (N_+ p_i) when `recenter=True` (N_+ = rows with p_i > 0; module docstring).
        """
        adv, cost = self._validated(advantages, costs)
        n = adv.numel()
        m = num_draws if num_draws is not None else (self.num_draws if self.num_draws is not None else n)
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"num_draws must be an integer >= 1, got {m!r}.")
        p, zero, fallback = self._probabilities64(adv, cost)
        indices = torch.multinomial(p, m, replacement=True, generator=self._generator)  # [M]
        raw = 1.0 / (n * p[indices])  # [M] float64, finite: drawn rows have p > 0
        support = int((p > 0).sum())  # N_+; E_p[raw] = N_+ / N exactly
        weights = raw * (n / support) if self.recenter else raw  # a constant factor, never the draws' own mean

        used = float(cost[indices].sum().item())
        full = float(cost.sum().item())
        self._policy_tokens_cumulative += used
        self._full_tokens_cumulative += full
        self._num_calls += 1
        self._last = {
            "policy_tokens": used,
            "full_batch_tokens": full,
            "tokens_saved": full - used,
            "tokens_saved_frac": (full - used) / full,
            "num_draws": float(m),
            "unique_frac": float(torch.unique(indices).numel()) / m,
            "weight_max": float(raw.max().item()),
            "weight_mean": float(raw.mean().item()),
            "ess": float((raw.sum() ** 2 / (raw**2).sum()).item()),
            "ess_frac": float((raw.sum() ** 2 / (raw**2).sum()).item()) / m,
            "zero_adv_frac": float(zero.double().mean().item()),
            "support_rows": float(support),
            "uniform_fallback": 1.0 if fallback else 0.0,
        }
        device = advantages.device if isinstance(advantages, torch.Tensor) else torch.device("cpu")
        return indices.to(device), weights.to(device=device, dtype=torch.float32)

    # ------------------------------------------------------------------ logging / checkpointing
    def metrics(self) -> dict[str, float]:
        """Metrics of the last `draw()` plus cumulative token accounting, keys under `cost/`.

        `policy_tokens`: sum of the drawn rollouts' costs (repeats counted: each draw is a forward/backward);
        `tokens_saved`: full-batch tokens (every rollout once) minus `policy_tokens` (negative if sampling used more);
        `weight_max` / `weight_mean`: raw importance weights 1 / (N p_i) of the draws; `ess`: (sum w)^2 / sum w^2;
        `zero_adv_frac`: fraction of the N rollouts with |A| <= eps; `support_rows`: N_+, rollouts with p > 0 (the
        re-centring constant is N_+ / N); `uniform_fallback`: 1 if all were zero.
        """
        out = {f"cost/{key}": value for key, value in self._last.items()}
        out["cost/policy_tokens_cumulative"] = self._policy_tokens_cumulative
        out["cost/tokens_saved_cumulative"] = self._full_tokens_cumulative - self._policy_tokens_cumulative
        out["cost/draw_calls"] = float(self._num_calls)
        return out

    def state_dict(self) -> dict[str, Any]:
        """Everything needed for a restored sampler to make the same next draws (torch.save-able)."""
        return {
            "alpha": self.alpha,
            "num_draws": self.num_draws,
            "seed": self.seed,
            "eps": self.eps,
            "recenter": self.recenter,
            "generator_state": self._generator.get_state(),
            "policy_tokens_cumulative": self._policy_tokens_cumulative,
            "full_tokens_cumulative": self._full_tokens_cumulative,
            "num_calls": self._num_calls,
            "last": dict(self._last),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()`; the configuration must match the one this sampler was built with."""
        for key in ("alpha", "num_draws", "eps", "recenter"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"CostAwareSampler.load_state_dict: saved {key}={state[key]!r} differs from this sampler's "
                    f"{key}={getattr(self, key)!r}; build the sampler with the saved configuration."
                )
        self.seed = int(state["seed"])
        self._generator.set_state(state["generator_state"])
        self._policy_tokens_cumulative = float(state["policy_tokens_cumulative"])
        self._full_tokens_cumulative = float(state["full_tokens_cumulative"])
        self._num_calls = int(state["num_calls"])
        self._last = dict(state["last"])
