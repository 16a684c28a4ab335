"""HIVE stage 2: prompt entropy from one forward pass, and the entropy median filter.

Prompt entropy. For a prompt of n real tokens x_1..x_n (after the chat template), one no-grad forward pass of the
current policy gives, at every prompt position t = 1..n, the next-token distribution pi(. | x_1..x_t) (the logits
at position t predict token t + 1). H(x) is the mean over the chosen positions of the entropy
-sum_v pi(v | x_<=t) log pi(v | x_<=t), computed in float32 from the logits divided by `temperature`:

- `positions="all"` (default): all n positions, i.e. the distributions of prompt tokens 2..n and of the first
  completion token. This is SPEC's "mean over the prompt's token positions t of -sum_v pi(v|x_<t) log pi(v|x_<t)"
  with t running over the n positions that have a conditioning prefix (t = 2..n+1 in SPEC's indexing): x_1 has no
  prefix and so no distribution, while the distribution after the whole prompt (the policy's uncertainty about how
  to start its answer) is included.
- `positions=k` (an int >= 1): the last min(k, n) of those positions; k = 1 is the entropy of the first completion
  token alone.

Padding: only positions with attention_mask 1 count, and position ids are computed from the mask (cumsum - 1), so
a prompt gives the same entropy whatever left (or right) padding surrounds it, up to float rounding.

Entropy median filter. Given the candidate pool's entropies, keep the candidates with H >= the pool's
(1 - keep_ratio) quantile (torch.quantile, linear interpolation; keep_ratio 0.5 is the median, the mean of the two
middle values for an even pool). Every candidate tied with the threshold is kept, so ties can keep more than
keep_ratio of the pool. Fixed-count mode (`n_keep`): keep exactly min(n_keep, pool) highest-entropy candidates, ties
broken in favour of the earlier candidate. Either way the survivors are returned in their input order.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from .base import Candidate, Selector

Positions = Literal["all"] | int
EntropyFn = Callable[[list[Candidate]], torch.Tensor | Sequence[float]]


def _check_positions(positions: Positions) -> None:
    if positions == "all":
        return
    if isinstance(positions, bool) or not isinstance(positions, int) or positions < 1:
        raise ValueError(f'positions must be "all" or an int >= 1 (the last k prompt positions), got {positions!r}.')


def prompt_position_mask(attention_mask: torch.Tensor, positions: Positions = "all") -> torch.Tensor:
    """Boolean `[B, T]` mask of the positions whose next-token entropy counts: every real (mask 1) position for
    `"all"`, the last k real positions of each row for an int k. Works with left or right padding."""
    _check_positions(positions)
    real = attention_mask.bool()  # [B, T]
    if positions == "all":
        return real
    from_end = real.flip(-1).long().cumsum(-1).flip(-1)  # [B, T]: real tokens at or after each position
    return real & (from_end <= positions)


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy -sum_v p log p of softmax(logits / temperature) over the last dim, in float32: `[..., V] -> [...]`."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # [..., V]
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)


def _forward_params(model: torch.nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def prompt_entropy(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: Positions = "all",
    batch_size: int | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Mean next-token entropy over the chosen prompt positions (see the module docstring), one value per row.

    Args:
        model: a causal LM returning `.logits` `[B, T, V]`; run in eval mode under `torch.no_grad`, its training
            flag is restored afterwards.
        input_ids, attention_mask: `[B, T]` prompt tokens, padded on either side (TRL pads prompts on the left).
        positions: `"all"` or the number k of last prompt positions.
        batch_size: rows per forward pass (None: all rows at once).
        temperature: the sampling temperature; entropies are of softmax(logits / temperature).

    Returns:
        float32 `[B]` on `input_ids`'s device.
    """
    _check_positions(positions)
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(
            f"input_ids and attention_mask must both be [B, T], got {tuple(input_ids.shape)} and "
            f"{tuple(attention_mask.shape)}."
        )
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}.")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if input_ids.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float32, device=input_ids.device)
    if bool((attention_mask.sum(-1) == 0).any()):
        raise ValueError("every row of attention_mask needs at least one real token (a prompt cannot be empty).")

    device = next(model.parameters()).device
    params = _forward_params(model)
    chunk = batch_size or input_ids.shape[0]
    was_training = model.training
    model.eval()
    means = []
    try:
        with torch.no_grad():
            for start in range(0, input_ids.shape[0], chunk):
                ids = input_ids[start : start + chunk].to(device)  # [b, T]
                mask = attention_mask[start : start + chunk].to(device)  # [b, T]
                cols = mask.bool().any(0).nonzero().flatten()  # drop columns that are padding in every row
                first, last = int(cols[0]), int(cols[-1]) + 1
                ids, mask = ids[:, first:last], mask[:, first:last]
                selected = prompt_position_mask(mask, positions)  # [b, t]
                kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
                if "position_ids" in params:
                    kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)  # [b, t]
                if positions != "all" and "logits_to_keep" in params and bool(mask[:, -1].all()):
                    # Every row ends with a real token, so the chosen positions lie in the last k columns.
                    kwargs["logits_to_keep"] = min(positions, ids.shape[1])
                logits = model(**kwargs).logits  # [b, t_kept, V]
                selected = selected[:, ids.shape[1] - logits.shape[1] :]  # [b, t_kept]
                entropies = torch.zeros(selected.shape, dtype=torch.float32, device=device)  # [b, t_kept]
                entropies[selected] = token_entropy(logits[selected], temperature)
                means.append(entropies.sum(-1) / selected.sum(-1))  # [b]
    finally:
        model.train(was_training)
    return torch.cat(means).to(input_ids.device)  # [B]


class EntropyMedianFilter(Selector):
    """Keeps the high-entropy half (or the `n_keep` highest) of a candidate pool (HIVE stage 2).

    Args:
        entropy_fn: maps the candidate list to their entropies `[N]` (e.g. a closure that tokenizes the prompts and
            calls `prompt_entropy` on the current policy); `select` times it. May be set later as an attribute.
            Under several processes it must return the same values on every rank (compute a shard per rank and
            all-gather), or the ranks will select different prompts.
        keep_ratio: fraction kept in quantile mode, in (0, 1]; 0.5 keeps H >= the median.
        n_keep: if set (>= 1), fixed-count mode: keep exactly min(n_keep, N) candidates.
    """

    def __init__(self, entropy_fn: EntropyFn | None = None, *, keep_ratio: float = 0.5, n_keep: int | None = None):
        if not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}.")
        if n_keep is not None and n_keep < 1:
            raise ValueError(f"n_keep must be >= 1 or None, got {n_keep}.")
        self.entropy_fn = entropy_fn
        self.keep_ratio = float(keep_ratio)
        self.n_keep = n_keep
        self._last: dict[str, float] = {}
        self._seconds_total = 0.0
        self._dropped_total = 0

    def select(self, candidates: Sequence[Candidate]) -> list[Candidate]:
        if len(candidates) == 0:
            return []
        if self.entropy_fn is None:
            raise ValueError("EntropyMedianFilter.entropy_fn is not set: give it a callable candidates -> entropies.")
        start = time.perf_counter()
        entropies = torch.as_tensor(self.entropy_fn(list(candidates))).detach().float().cpu().reshape(-1)  # [N]
        seconds = time.perf_counter() - start
        kept = self.select_with_entropies(candidates, entropies)
        self._last["selection/entropy/seconds"] = seconds
        self._seconds_total += seconds
        return kept

    def keep_mask(self, entropies: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Boolean `[N]` mask of the kept candidates and the entropy threshold (the smallest entropy kept)."""
        entropies = entropies.detach().float().cpu().reshape(-1)  # [N]
        if entropies.numel() == 0:
            return torch.zeros(0, dtype=torch.bool), float("nan")
        if not bool(torch.isfinite(entropies).all()):
            raise ValueError(f"entropies must be finite, got {entropies.tolist()}.")
        if self.n_keep is None:
            threshold = float(torch.quantile(entropies, 1.0 - self.keep_ratio))
            return entropies >= threshold, threshold
        order = torch.argsort(-entropies, stable=True)[: self.n_keep]  # highest first; ties: earlier first
        mask = torch.zeros_like(entropies, dtype=torch.bool)
        mask[order] = True
        return mask, float(entropies[order].min())

    def select_with_entropies(
        self, candidates: Sequence[Candidate], entropies: torch.Tensor | Sequence[float]
    ) -> list[Candidate]:
        """Apply the filter to precomputed entropies `[N]` (one per candidate)."""
        entropies = torch.as_tensor(entropies).detach().float().cpu().reshape(-1)  # [N]
        if entropies.numel() != len(candidates):
            raise ValueError(f"got {entropies.numel()} entropies for {len(candidates)} candidates.")
        mask, threshold = self.keep_mask(entropies)
        self._last = {
            "selection/entropy/candidates": float(len(candidates)),
            "selection/entropy/kept": float(mask.sum()),
            "selection/entropy/threshold": threshold,
        }
        if bool(mask.any()):
            self._last["selection/entropy/kept_mean"] = float(entropies[mask].mean())
        if not bool(mask.all()):
            self._last["selection/entropy/dropped_mean"] = float(entropies[~mask].mean())
        self._dropped_total += int((~mask).sum())
        return [candidate for candidate, keep in zip(candidates, mask.tolist(), strict=True) if keep]

    def state_dict(self) -> dict[str, Any]:
        return {"last": dict(self._last), "seconds_total": self._seconds_total, "dropped_total": self._dropped_total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._last = dict(state["last"])
        self._seconds_total = float(state["seconds_total"])
        self._dropped_total = int(state["dropped_total"])

    def metrics(self) -> dict[str, float]:
        """Values of the last `select` call (threshold, kept/dropped mean entropy, seconds in the entropy pass) and
        the cumulative `seconds_total` / `dropped_total`."""
        return {
            **self._last,
            "selection/entropy/seconds_total": self._seconds_total,
            "selection/entropy/dropped_total": float(self._dropped_total),
        }
