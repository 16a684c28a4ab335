"""Concatenating TRL generation batches row-wise (used by the dynamic-sampling refill).

Two outputs of `GRPOTrainer._generate_and_score_completions` generally have different prompt and completion widths.
`concat_batches` stacks their rows and pads every `[N, T]` entry to the widest batch on the side TRL pads it:
prompts (`prompt_ids`, `prompt_mask`) on the left, completion-aligned entries (`completion_ids`, `completion_mask`,
`old_per_token_logps`, `sampling_per_token_logps`, token-level `importance_sampling_ratio`, `ref_per_token_logps`,
`tool_mask`) on the right. Padding values: `pad_token_id` for token ids, 1 for `tool_mask` (as TRL pads it) and 0
otherwise; every padded position has mask 0, so no TRL loss reads it. `num_items_in_batch` (each batch's global
completion-token count) is summed, which is the global count of the merged rows on every process.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..batch import local_row_count

LEFT_PADDED = ("prompt_ids", "prompt_mask")
TOKEN_ID_KEYS = ("prompt_ids", "completion_ids")


def _pad_width(value: torch.Tensor, width: int, left: bool, fill: float) -> torch.Tensor:
    missing = width - value.shape[1]
    if missing == 0:
        return value
    pad = value.new_full((value.shape[0], missing, *value.shape[2:]), fill)
    return torch.cat([pad, value] if left else [value, pad], dim=1)


def concat_batches(
    batches: Sequence[dict[str, Any]], pad_token_id: int, sequence_level_keys: Sequence[str] = ()
) -> dict[str, Any]:
    """Rows of `batches` one after another, in order (see the module docstring for the padding rules).

    Args:
        batches: generation-batch dicts with the same keys.
        pad_token_id: fill value of `prompt_ids` / `completion_ids`.
        sequence_level_keys: `[N, k]` entries that are not per token (e.g. a sequence-level
            `importance_sampling_ratio` `[N, 1]`): concatenated without padding.
    """
    if len(batches) == 0:
        raise ValueError("batches must hold at least one batch, got none.")
    if len(batches) == 1:
        return dict(batches[0])
    keys = list(batches[0])
    for batch in batches[1:]:
        if set(batch) != set(keys):
            raise ValueError(f"batches have different keys: {sorted(keys)} vs {sorted(batch)}.")
    rows = [local_row_count(b) for b in batches]
    out: dict[str, Any] = {}
    for key in keys:
        values = [b[key] for b in batches]
        if key == "num_items_in_batch":
            out[key] = sum(values[1:], values[0])
            continue
        per_row = [
            (isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n) or (isinstance(v, list) and len(v) == n)
            for v, n in zip(values, rows, strict=True)
        ]
        if all(per_row):
            if isinstance(values[0], list):
                out[key] = [item for v in values for item in v]
            elif values[0].dim() == 1 or key in sequence_level_keys:
                out[key] = torch.cat(values, dim=0)
            else:
                width = max(v.shape[1] for v in values)
                fill = pad_token_id if key in TOKEN_ID_KEYS else (1 if key == "tool_mask" else 0)
                left = key in LEFT_PADDED
                out[key] = torch.cat([_pad_width(v, width, left, fill) for v in values], dim=0)
        elif not any(per_row) and all(_same(values[0], v) for v in values[1:]):
            out[key] = values[0]
        else:
            raise ValueError(f"concat_batches: cannot merge entry {key!r} (not per-row in every batch, not equal).")
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b
