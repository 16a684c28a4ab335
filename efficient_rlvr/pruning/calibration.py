"""ARRoL calibration: quality scores -> posterior success probabilities -> survival probabilities.

Algorithm (ARRoL, arXiv 2603.24840, appendix A.4; SPEC section 2, with its correction of the survival rule):

- ``B`` uniform bins of the score ``s`` in [0, 1]; bin ``b(s) = min(B - 1, floor(B s))`` (B = 128).
- A bounded sliding buffer of labelled scores (positive = correct) of past rollouts that reached ``L_detect``, scored
  there (the caller feeds it: rollouts that finish before ``L_detect`` are never pruned and stay out of it).
  Histograms ``c_b+`` / ``c_b-`` of the positive / negative scores in the buffer, Laplace smoothing ``alpha = 1``:
  ``P(b | Y=1) = (c_b+ + alpha) / (N+ + alpha B)``, same for ``Y = 0``.
- Prior ``pi`` = positive fraction of the buffer; posterior
  ``q(b) = pi P(b|1) / (pi P(b|1) + (1 - pi) P(b|0))``.
- Survival probability of rollout ``i`` of group ``g`` (``survival_rule``):

  - ``"group_relative"`` (default, SPEC's correction): ``p_i = clip(kappa + delta + lambda sign(q_bar_g - rho)
    (q_bar_g - q_i), p_min, p_max)`` with ``q_bar_g`` the mean ``q`` of the group's rollouts (the caller computes
    it). A group above ``rho`` loses its likely-correct rollouts first, a group below ``rho`` its likely-wrong ones.
  - ``"literal"`` (the appendix as written, for comparison): ``p_i = clip(kappa + delta + lambda (rho - q_i), p_min,
    p_max)``. ``rho`` cancels (``delta`` absorbs ``lambda rho``), so it always prunes likely-correct rollouts first
    and, in groups whose pass rate is below ``rho``, leaves survivors less balanced than random pruning.

  In both, ``delta`` is found by bisection so that the mean survival probability over the rollouts decided together
  (one call of :meth:`BinnedCalibrator.solve_survival`) equals ``kappa``: ``mean_i clip(kappa + delta + lambda t_i,
  p_min, p_max) = kappa``. That function of ``delta`` is continuous, non-decreasing and 1-Lipschitz, so bisection to a
  bracket of width ``tol`` meets the target within ``tol``. (Solving it over the decided rollouts, not over the
  buffer: the buffer holds survivors only, whose scores are not distributed like those being decided.)
- :meth:`BinnedCalibrator.refit` recomputes the posterior table from the buffer; call it after every optimizer step.
  ``ready`` becomes true after ``cold_start_steps`` refits; the caller must not prune before (cold start).

Choices where the paper is silent (config fields): one FIFO buffer holds both classes (``buffer_size`` most recent
labelled scores), so its positive fraction is an unbiased prior; separate per-class buffers would distort ``pi``
once one of them is full. Before any data the prior is 0.5 and every ``q`` is 0.5.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch

__all__ = ["SURVIVAL_RULES", "BinnedCalibrator"]

SURVIVAL_RULES = ("group_relative", "literal")


class BinnedCalibrator:
    """Online binned calibration of quality scores and the survival probabilities of ARRoL.

    Args:
        num_bins: number of uniform score bins on [0, 1] (>= 1; 128 in the paper).
        alpha: Laplace smoothing of the per-class histograms (> 0; 1 in the paper).
        buffer_size: how many of the most recent labelled scores the sliding buffer keeps (>= 1).
        kappa: target keep rate, in ``[p_min, p_max]`` (0.5).
        lam: balance strength ``lambda`` (>= 0; 0.5).
        rho: target positive ratio of the kept rollouts, in [0, 1] (0.5; the authors' code uses 0.4).
        p_min: lower clip of the survival probability, in [0, 1] (0.25).
        p_max: upper clip, in ``[p_min, 1]`` (0.75).
        cold_start_steps: refits before :attr:`ready` is true (>= 0; 20 in the paper).
        tol: bisection tolerance on ``delta`` (> 0); the mean survival probability is within ``tol`` of ``kappa``.
        survival_rule: ``"group_relative"`` (default) or ``"literal"`` (module docstring).
    """

    def __init__(
        self,
        num_bins: int = 128,
        alpha: float = 1.0,
        buffer_size: int = 2048,
        kappa: float = 0.5,
        lam: float = 0.5,
        rho: float = 0.5,
        p_min: float = 0.25,
        p_max: float = 0.75,
        cold_start_steps: int = 20,
        tol: float = 1e-9,
        survival_rule: str = "group_relative",
    ):
        if not isinstance(num_bins, int) or num_bins < 1:
            raise ValueError(f"num_bins must be an int >= 1, got {num_bins!r}")
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        if not isinstance(buffer_size, int) or buffer_size < 1:
            raise ValueError(f"buffer_size must be an int >= 1, got {buffer_size!r}")
        if not 0.0 <= p_min <= 1.0:
            raise ValueError(f"p_min must be in [0, 1], got {p_min}")
        if not p_min <= p_max <= 1.0:
            raise ValueError(f"p_max must be in [p_min={p_min}, 1], got {p_max}")
        if not p_min <= kappa <= p_max:
            raise ValueError(f"kappa must be in [p_min, p_max] = [{p_min}, {p_max}], got {kappa}")
        if not lam >= 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"rho must be in [0, 1], got {rho}")
        if not isinstance(cold_start_steps, int) or cold_start_steps < 0:
            raise ValueError(f"cold_start_steps must be an int >= 0, got {cold_start_steps!r}")
        if not tol > 0:
            raise ValueError(f"tol must be > 0, got {tol}")
        if survival_rule not in SURVIVAL_RULES:
            raise ValueError(f"survival_rule must be one of {SURVIVAL_RULES}, got {survival_rule!r}")
        self.num_bins = num_bins
        self.alpha = float(alpha)
        self.buffer_size = buffer_size
        self.kappa = float(kappa)
        self.lam = float(lam)
        self.rho = float(rho)
        self.p_min = float(p_min)
        self.p_max = float(p_max)
        self.cold_start_steps = cold_start_steps
        self.tol = float(tol)
        self.survival_rule = survival_rule
        self._buffer: deque[tuple[float, bool]] = deque(maxlen=buffer_size)
        self.num_refits = 0
        self.prior = 0.5
        self._posterior = torch.full((num_bins,), 0.5, dtype=torch.float64)  # [B]

    # ----------------------------------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """True once :meth:`refit` ran ``cold_start_steps`` times (end of the cold start)."""
        return self.num_refits >= self.cold_start_steps

    @property
    def posterior_table(self) -> torch.Tensor:
        """``q(b)`` for every bin, float64 ``[B]`` (a copy)."""
        return self._posterior.clone()

    def __len__(self) -> int:
        return len(self._buffer)

    def bin_index(self, scores: torch.Tensor) -> torch.Tensor:
        """``b(s) = min(B - 1, floor(B s))`` (long, same device): ``[N] -> [N]``; scores are clamped to [0, 1]."""
        s = scores.detach().to(torch.float64).clamp(0.0, 1.0)
        return torch.clamp(torch.floor(s * self.num_bins), max=self.num_bins - 1).long()

    # ----------------------------------------------------------------------------------------------------------
    def observe(self, scores: torch.Tensor, labels: torch.Tensor) -> None:
        """Append scores ``[N]`` (in [0, 1]) and binary labels ``[N]`` to the sliding buffer.

        Feed it the finished rollouts that reached ``L_detect``, with their scores there (the decision population).
        """
        scores = torch.as_tensor(scores).detach().reshape(-1).to("cpu", torch.float64)
        labels = torch.as_tensor(labels).detach().reshape(-1).to("cpu")
        if scores.shape != labels.shape:
            raise ValueError(f"scores and labels must have the same length, got {scores.numel()} and {labels.numel()}")
        if scores.numel() and (torch.isnan(scores).any() or scores.min() < 0 or scores.max() > 1):
            raise ValueError("scores must lie in [0, 1] (sigmoid outputs) and not be NaN")
        for s, y in zip(scores.tolist(), labels.tolist(), strict=True):
            self._buffer.append((float(s), bool(y)))

    def refit(self) -> None:
        """Recompute the histograms, prior and posterior table from the buffer; counts one step."""
        b_count = self.num_bins
        if self._buffer:
            scores = torch.tensor([s for s, _ in self._buffer], dtype=torch.float64)  # [N]
            labels = torch.tensor([y for _, y in self._buffer], dtype=torch.bool)  # [N]
            bins = self.bin_index(scores)  # [N]
            c_pos = torch.bincount(bins[labels], minlength=b_count).to(torch.float64)  # [B]
            c_neg = torch.bincount(bins[~labels], minlength=b_count).to(torch.float64)  # [B]
        else:
            c_pos = torch.zeros(b_count, dtype=torch.float64)
            c_neg = torch.zeros(b_count, dtype=torch.float64)
        n_pos, n_neg = c_pos.sum().item(), c_neg.sum().item()
        like_pos = (c_pos + self.alpha) / (n_pos + self.alpha * b_count)  # P(b | Y=1), [B]
        like_neg = (c_neg + self.alpha) / (n_neg + self.alpha * b_count)  # P(b | Y=0), [B]
        self.prior = n_pos / (n_pos + n_neg) if n_pos + n_neg > 0 else 0.5
        numerator = self.prior * like_pos
        self._posterior = numerator / (numerator + (1.0 - self.prior) * like_neg)  # q(b), [B]
        self.num_refits += 1

    # ----------------------------------------------------------------------------------------------------------
    def posterior(self, scores: torch.Tensor) -> torch.Tensor:
        """``q(b(s))`` as float32 on the scores' device: ``[N] -> [N]``."""
        table = self._posterior.to(device=scores.device, dtype=torch.float32)
        return table[self.bin_index(scores)]

    def balance_terms(self, q: torch.Tensor, group_means: torch.Tensor | None = None) -> torch.Tensor:
        """The rule's term ``t_i`` in ``p_i = clip(kappa + delta + lambda t_i, ...)``, float64 ``[N]``.

        ``"group_relative"``: ``sign(q_bar_g - rho) (q_bar_g - q_i)`` with ``group_means`` ``[N]`` the ``q_bar`` of
        each rollout's group (None: the given rollouts form one group); ``"literal"``: ``rho - q_i``.
        """
        q = q.detach().to(torch.float64)
        if self.survival_rule == "literal":
            return self.rho - q
        if group_means is None:
            q_bar = q.mean().expand_as(q)
        else:
            q_bar = group_means.detach().to(device=q.device, dtype=torch.float64).reshape(q.shape)
        return torch.sign(q_bar - self.rho) * (q_bar - q)

    def solve_delta(self, terms: torch.Tensor) -> float:
        """``delta`` such that ``mean clip(kappa + delta + lambda terms, p_min, p_max) = kappa`` (bisection)."""
        terms = terms.detach().to(torch.float64)
        if terms.numel() == 0:
            return 0.0
        # the mean is p_min for delta <= lo and p_max for delta >= hi, since every term lies in [-1, 1]
        lo = self.p_min - self.kappa - self.lam
        hi = self.p_max - self.kappa + self.lam
        while hi - lo > self.tol:
            mid = 0.5 * (lo + hi)
            if float((self.kappa + mid + self.lam * terms).clamp(self.p_min, self.p_max).mean()) < self.kappa:
                lo = mid
            else:
                hi = mid
        return 0.5 * (lo + hi)

    def solve_survival(
        self, scores: torch.Tensor, group_means: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, float]:
        """Survival probabilities of rollouts decided together and the ``delta`` that gives them mean ``kappa``.

        Args:
            scores: ``[N]`` quality scores of the rollouts being decided.
            group_means: ``[N]`` ``q_bar`` of each rollout's group, in posterior space (group_relative rule; None:
                the rollouts form one group); ignored by the literal rule.

        Returns:
            ``(p [N] float32 on the scores' device, delta)``.
        """
        q = self.posterior(scores)  # [N]
        terms = self.balance_terms(q, group_means)  # [N]
        delta = self.solve_delta(terms)
        p = (self.kappa + delta + self.lam * terms).clamp(self.p_min, self.p_max)
        return p.to(device=scores.device, dtype=torch.float32), delta

    def survival_probabilities(self, scores: torch.Tensor, group_means: torch.Tensor | None = None) -> torch.Tensor:
        """``solve_survival(scores, group_means)[0]``: ``[N]`` float32, mean ``kappa`` over these rollouts."""
        return self.solve_survival(scores, group_means)[0]

    # ----------------------------------------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """Current calibration state under the ``pruning/`` namespace."""
        return {
            "pruning/prior": float(self.prior),
            "pruning/buffer_size": float(len(self._buffer)),
            "pruning/calibrator_ready": float(self.ready),
        }

    def state_dict(self) -> dict[str, Any]:
        """Buffer, counters and fitted table (plain Python and tensors, torch.save-able)."""
        return {
            "config": {
                "num_bins": self.num_bins,
                "alpha": self.alpha,
                "buffer_size": self.buffer_size,
                "kappa": self.kappa,
                "lam": self.lam,
                "rho": self.rho,
                "p_min": self.p_min,
                "p_max": self.p_max,
                "cold_start_steps": self.cold_start_steps,
                "survival_rule": self.survival_rule,
            },
            "scores": [s for s, _ in self._buffer],
            "labels": [y for _, y in self._buffer],
            "num_refits": self.num_refits,
            "prior": self.prior,
            "posterior": self._posterior.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (``num_bins`` must match; the other settings stay this one's)."""
        if state["config"]["num_bins"] != self.num_bins:
            raise ValueError(f"num_bins mismatch: state has {state['config']['num_bins']}, this has {self.num_bins}")
        self._buffer = deque(
            zip((float(s) for s in state["scores"]), (bool(y) for y in state["labels"]), strict=True),
            maxlen=self.buffer_size,
        )
        self.num_refits = int(state["num_refits"])
        self.prior = float(state["prior"])
        self._posterior = state["posterior"].clone().to(torch.float64)
