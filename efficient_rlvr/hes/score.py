"""HES, the high-entropy sum: a training-free score of a reasoning trace (SPEC section 5; arXiv 2605.22389).

Algorithm: teacher-force prompt + completion through a scoring model (the policy or a small proxy), take the entropy
of the next-token distribution at every completion token, keep the tokens at or above the sequence's
``quantile``-quantile of those entropies (default 0.995, i.e. the top 0.5%, at least one token) and sum their
entropies.

Choices (the seed text only says "the top 0.5% in each reasoning sample"):
- The quantile is taken per sequence (``scope="sequence"``, default), over that sequence's completion tokens only.
  ``scope="batch"`` uses one threshold over all completion tokens of the batch (the pattern of TRL's
  ``get_high_entropy_mask``); a sequence with no token above it then keeps its highest-entropy token(s).
- The quantile is linear interpolation between order statistics (numpy's default): with n tokens sorted ascending
  the threshold sits at position q (n - 1); every token at or above it is kept, so ties at the threshold are all kept
  and the maximum is always kept (at least one token). For n <= 200 and q = 0.995 that is the maximum (and its ties).
- Entropies are in nats, from float32 log-softmax of the logits divided by ``temperature``.
- HES grows with completion length (more tokens, more chances of a high-entropy one): report it next to length;
  `pearson` gives the correlation.
"""

from __future__ import annotations

import inspect
from typing import Literal

import torch
from torch import Tensor

Scope = Literal["sequence", "batch"]
_SCOPES = ("sequence", "batch")


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _entropy(logits: Tensor, temperature: float, rows_per_chunk: int = 256) -> Tensor:
    """Entropy (nats) over the last axis in float32, a few hundred positions at a time to bound peak memory."""
    flat = logits.reshape(-1, logits.shape[-1])  # [N, V]
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    for i in range(0, flat.shape[0], rows_per_chunk):
        logp = torch.log_softmax(flat[i : i + rows_per_chunk].float() / temperature, dim=-1)
        out[i : i + rows_per_chunk] = -(logp.exp() * logp).sum(dim=-1)
    return out.reshape(logits.shape[:-1])


@torch.no_grad()
def token_entropies(
    model: torch.nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    batch_size: int | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """Teacher-forced next-token entropy at every completion token, ``[B, T]`` float32 (0 where the mask is 0).

    Args:
        model: a causal LM returning ``.logits``; run in eval mode under ``torch.no_grad`` (its mode is restored).
        prompt_ids, prompt_mask: ``[B, P]``, left-padded (TRL's layout); every row needs at least one prompt token.
        completion_ids, completion_mask: ``[B, T]``, right-padded.
        batch_size: rows per forward pass (default: all at once).
        temperature: the logits are divided by it before the softmax (TRL does the same for the policy).

    Position ids are computed from the attention mask (``cumsum - 1``), so the result does not depend on how much
    padding a row carries; columns that are padding for every row of a chunk are not fed to the model.
    """
    if prompt_ids.shape != prompt_mask.shape or completion_ids.shape != completion_mask.shape:
        raise ValueError("prompt_ids/prompt_mask and completion_ids/completion_mask must have matching shapes.")
    if prompt_ids.shape[0] != completion_ids.shape[0]:
        raise ValueError(
            f"prompt and completion batch sizes differ: {prompt_ids.shape[0]} vs {completion_ids.shape[0]}."
        )
    if batch_size is not None and not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be None or an int >= 1, got {batch_size!r}.")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    B, P = prompt_ids.shape
    T = completion_ids.shape[1]
    out = torch.zeros(B, T, dtype=torch.float32, device=completion_ids.device)  # [B, T]
    if B == 0 or T == 0:
        return out
    needs = completion_mask.bool().any(dim=1)
    if bool((needs & ~prompt_mask.bool().any(dim=1)).any()):
        raise ValueError("every row with completion tokens needs at least one prompt token (e.g. a BOS token).")
    device = _model_device(model)
    takes_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
    chunk = batch_size or B
    was_training = model.training
    model.eval()
    try:
        for start in range(0, B, chunk):
            rows = slice(start, min(start + chunk, B))
            p_ids, p_mask = prompt_ids[rows].to(device), prompt_mask[rows].to(device).long()  # [b, P]
            c_ids, c_mask = completion_ids[rows].to(device), completion_mask[rows].to(device).long()  # [b, T]
            # Trim columns that are padding for every row of the chunk (left of the prompt, right of the completion).
            p_any = p_mask.any(dim=0).nonzero()
            c_any = c_mask.any(dim=0).nonzero()
            if c_any.numel() == 0:
                continue
            p0, t1 = int(p_any[0]), int(c_any[-1]) + 1
            p_ids, p_mask, c_ids, c_mask = p_ids[:, p0:], p_mask[:, p0:], c_ids[:, :t1], c_mask[:, :t1]
            input_ids = torch.cat([p_ids, c_ids], dim=1)  # [b, P' + T']
            attention_mask = torch.cat([p_mask, c_mask], dim=1)  # [b, P' + T']
            position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # [b, P' + T']
            kwargs = {"logits_to_keep": t1 + 1} if takes_keep else {}
            logits = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
                **kwargs,
            ).logits
            p_len = p_ids.shape[1]
            logits = logits[:, :-1] if takes_keep else logits[:, p_len - 1 : p_len - 1 + t1]  # [b, T', V]
            ent = _entropy(logits, temperature).masked_fill(c_mask == 0, 0.0)  # [b, T']
            out[rows, :t1] = ent.to(out.device)
    finally:
        model.train(was_training)
    return out


def _interpolated_threshold(sorted_vals: Tensor, n: Tensor, quantile: float) -> Tensor:
    """Linear-interpolated quantile of the last ``n`` entries of each row of ascending ``sorted_vals`` [R, L]."""
    L = sorted_vals.shape[1]
    n64 = n.to(torch.float64)
    pos = (L - n64) + quantile * (n64 - 1).clamp(min=0)  # position in the padded, sorted row
    pos = torch.round(pos * 1e9) / 1e9  # remove floating dust, e.g. 0.995 * 200 = 198.99999999999997
    lo = pos.floor().long().clamp(0, L - 1)
    hi = (lo + 1).clamp(max=L - 1)
    frac = (pos - lo.to(torch.float64)).to(sorted_vals.dtype)
    v_lo = sorted_vals.gather(1, lo[:, None]).squeeze(1)
    v_hi = sorted_vals.gather(1, hi[:, None]).squeeze(1)
    thr = torch.where(frac > 0, v_lo + frac * (v_hi - v_lo), v_lo)
    return torch.where(n > 0, thr, torch.full_like(thr, float("inf")))


def high_entropy_mask(entropies: Tensor, mask: Tensor, quantile: float = 0.995, scope: Scope = "sequence") -> Tensor:
    """Which completion tokens HES keeps, ``[B, T]`` bool (see the module docstring for the quantile rule)."""
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}.")
    if scope not in _SCOPES:
        raise ValueError(f"scope must be one of {_SCOPES}, got {scope!r}.")
    if entropies.shape != mask.shape or entropies.dim() != 2:
        raise ValueError(
            f"entropies and mask must both be [B, T], got {tuple(entropies.shape)} and {tuple(mask.shape)}."
        )
    valid = mask.bool()
    ent = entropies.float()
    vals = ent.masked_fill(~valid, float("-inf"))  # [B, T]
    n = valid.sum(dim=1)  # [B]
    if scope == "sequence":
        thr = _interpolated_threshold(vals.sort(dim=1).values, n, quantile)  # [B]
        return valid & (ent >= thr[:, None])
    flat = ent[valid].sort().values[None, :]  # [1, N]
    if flat.numel() == 0:
        return valid
    thr = _interpolated_threshold(flat, torch.tensor([flat.shape[1]], device=flat.device), quantile)  # [1]
    keep = valid & (ent >= thr)
    empty = (keep.sum(dim=1) == 0) & (n > 0)  # at least one token per sequence
    row_max = vals.max(dim=1).values
    return keep | (valid & empty[:, None] & (ent == row_max[:, None]))


def high_entropy_sum(entropies: Tensor, mask: Tensor, quantile: float = 0.995, scope: Scope = "sequence") -> Tensor:
    """HES per sequence, ``[B]`` float32: the sum of the entropies of the tokens `high_entropy_mask` keeps.

    ``mask`` marks completion tokens (prompt and padding excluded). A sequence without completion tokens scores 0.
    """
    keep = high_entropy_mask(entropies, mask, quantile, scope)
    return (entropies.float() * keep).sum(dim=1)


def pearson(x: Tensor, y: Tensor) -> float:
    """Pearson correlation of two 1-D tensors (NaN when fewer than 2 values or a constant input)."""
    x, y = x.double().reshape(-1), y.double().reshape(-1)
    if x.numel() != y.numel():
        raise ValueError(f"pearson needs equal lengths, got {x.numel()} and {y.numel()}.")
    if x.numel() < 2:
        return float("nan")
    xc, yc = x - x.mean(), y - y.mean()
    denom = (xc.square().sum() * yc.square().sum()).sqrt()
    return float((xc * yc).sum() / denom) if float(denom) > 0 else float("nan")
