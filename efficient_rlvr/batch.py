"""Row operations on TRL's generation batch (the dict `_generate_and_score_completions` returns).

Stages that drop rollouts (pruning, the zero-variance gate, HES selection) remove rows here, so that log-prob and
backward cost shrink with them, while every shape TRL relies on stays valid:

- every per-rollout entry (tensors whose first dim is the local row count, and lists of that length) is indexed the
  same way; `num_items_in_batch` (the gathered completion-token count that dapo-style losses divide by) is recounted
  over what is kept, on every process;
- batches from several generation calls (refills, "rollout more" rounds) are stacked with `concat_batches`:
  every `[N, T]` entry is padded to the widest batch on the side TRL pads it: prompts (`prompt_ids`,
  `prompt_mask`) on the left, completion-aligned entries (`completion_ids`, `completion_mask`, per-token log-probs,
  token-level importance ratios, `tool_mask`) on the right, each with its neutral value (`PAD_ONE_KEYS`):
  `pad_token_id` for token ids; 1 for `tool_mask` (as TRL pads it) and for a per-token `importance_sampling_ratio`
  (TRL's own value at padded positions is exp(0) = 1, and vespo sums log(ratio) over every column of a row, masked
  or not, so a 0 there would zero the row's gamma weight and its gradient); 0 otherwise (masks, log-probs and
  per-token advantages, which TRL only reads under the loss mask), so no TRL loss changes for a padded position;
  `num_items_in_batch` (each batch's global completion-token count) is summed;
- every process keeps the same number of rows, at least `min_rows` (pass `steps_per_generation`, so each
  gradient-accumulation micro step has a row): TRL's loss all-gathers per-sequence metrics, which needs equal row
  counts on every process. Processes with fewer surviving rows are filled up with inert padding rows (completion
  mask and advantage zeroed, reward unknown), which contribute exactly zero to every TRL loss.

Micro-batches packed by length (`pack_rows_by_length`, used with the zero-advantage skip, whose losses are normalised
by the generation batch's token count, so which rows share a micro-batch does not change the step): rows sorted by
their real length and split into contiguous chunks, each trimmed to its own widest completion (trailing columns that
no row of the chunk attends to dropped), so the policy forward/backward runs over fewer padding positions. A causal
model's outputs at the kept positions do not depend on later columns, so this is exact for any model (the prompts'
left padding is kept: dropping it would shift absolute positions).

Rows carry their own reward and group, so that stages can follow each other in any supported order after rows were
dropped or added (`annotate_rows`, called by the trainer before the first batch stage): ``rollout_rewards`` ``[N]``
(total reward, NaN = unknown: unscorable, pruned, or an inert padding row) and ``rollout_groups`` ``[N]`` (global
group id: in generation order row ``r * N_local + i`` of process ``r`` is in group ``(r * N_local + i) // G``; rows a
stage generates later get ids after those). TRL's loss ignores both entries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

ROLLOUT_REWARDS = "rollout_rewards"
ROLLOUT_GROUPS = "rollout_groups"


def annotate_rows(batch: dict[str, Any], rewards: torch.Tensor, process_index: int, group_size: int) -> dict[str, Any]:
    """`batch` (in generation order) plus each row's reward and global group id (module docstring).

    Args:
        batch: this process's generation batch, rows in TRL's generation order.
        rewards: `[N_global]` total rewards of every process's rows (NaN = unknown), e.g. `trainer.last_rewards()`.
        process_index: this process's rank.
        group_size: rollouts per prompt (`num_generations`).
    """
    n = local_row_count(batch)
    if rewards.numel() % max(n, 1):
        raise ValueError(f"annotate_rows: {rewards.numel()} rewards are not a whole number of {n}-row processes.")
    device = batch["completion_ids"].device
    ids = torch.arange(process_index * n, (process_index + 1) * n)  # [n] global row ids
    out = dict(batch)
    out[ROLLOUT_REWARDS] = rewards.detach().float().reshape(-1)[ids.to(rewards.device)].to(device)  # [n]
    out[ROLLOUT_GROUPS] = (ids // group_size).to(device)  # [n]
    return out


def gather_row_annotations(batch: dict[str, Any], accelerator: Any) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Every process's per-row rewards `[N]` and group ids `[N]` (CPU, process order) and each process's row count."""
    local = (batch[ROLLOUT_REWARDS].float().cpu().tolist(), batch[ROLLOUT_GROUPS].long().cpu().tolist())
    if accelerator.num_processes == 1:
        parts = [local]
    else:
        from accelerate.utils import gather_object

        parts = gather_object([local])
    rewards = torch.tensor([x for part in parts for x in part[0]], dtype=torch.float32)
    groups = torch.tensor([x for part in parts for x in part[1]], dtype=torch.long)
    return rewards, groups, [len(part[0]) for part in parts]


def local_row_count(batch: dict[str, Any]) -> int:
    """Rows (rollouts) of this process in a generation batch."""
    return int(batch["completion_ids"].shape[0])


def index_rows(batch: dict[str, Any], index: torch.Tensor) -> dict[str, Any]:
    """Entries of `batch` restricted to the rows `index` (`[M]` long tensor; repeats allowed)."""
    n = local_row_count(batch)
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
            out[key] = value[index.to(value.device)]
        elif isinstance(value, list) and len(value) == n:
            out[key] = [value[i] for i in index.tolist()]
        else:
            out[key] = value
    return out


def keep_rows(
    batch: dict[str, Any], keep: torch.Tensor, accelerator: Any, min_rows: int = 1, recount: bool = True
) -> dict[str, Any]:
    """Drop the rows where `keep` (`[N_local]` bool) is False and recount `num_items_in_batch` over all processes
    (`recount=False` keeps it: the loss normaliser of the batch before the drop).

    Every process ends with the same row count (TRL's loss all-gathers per-sequence metrics, so unequal counts fail
    under multi-process): the largest kept count over processes, and at least `min_rows`. Processes with fewer kept
    rows fill up with inert padding rows (completion mask and advantage zeroed: exactly zero loss), taken from their
    dropped rows first, then repeated.
    """
    keep = keep.to(torch.bool).cpu()
    n = local_row_count(batch)
    if keep.shape != (n,):
        raise ValueError(f"keep_rows: keep has shape {tuple(keep.shape)}, expected ({n},)")
    kept = torch.nonzero(keep).flatten()
    counts = accelerator.gather(torch.tensor([kept.numel()], device=batch["completion_ids"].device))
    target = max(int(counts.max()), min_rows)
    filler = torch.cat([torch.nonzero(~keep).flatten(), torch.arange(n)])
    padding = filler.repeat(target // max(filler.numel(), 1) + 1)[: target - kept.numel()]
    out = index_rows(batch, torch.cat([kept, padding]))
    if padding.numel():
        inert = torch.zeros(target, dtype=torch.bool)
        inert[kept.numel() :] = True
        mask = out["completion_mask"]
        out["completion_mask"] = mask.masked_fill(inert[:, None].to(mask.device), 0)
        out["advantages"] = out["advantages"].masked_fill(inert.to(out["advantages"].device), 0.0)
        if ROLLOUT_REWARDS in out:
            out[ROLLOUT_REWARDS] = out[ROLLOUT_REWARDS].masked_fill(inert.to(out[ROLLOUT_REWARDS].device), torch.nan)
    if "num_items_in_batch" in out and recount:
        local = out["completion_mask"].sum().to(torch.float32)
        out["num_items_in_batch"] = accelerator.gather(local.reshape(1)).sum().to(batch["num_items_in_batch"].dtype)
    return out


def split_rows(batch: dict[str, Any], num_chunks: int) -> list[dict[str, Any]]:
    """Split into `num_chunks` contiguous chunks whose sizes differ by at most one (TRL's split needs equal sizes)."""
    n = local_row_count(batch)
    if n < num_chunks:
        raise ValueError(f"split_rows: {n} rows cannot fill {num_chunks} chunks")
    bounds = torch.linspace(0, n, num_chunks + 1).round().long().tolist()
    return [index_rows(batch, torch.arange(bounds[i], bounds[i + 1])) for i in range(num_chunks)]


# Per-token entries aligned with the completion (trimmed on the right with it), and the prompt's (kept whole).
COMPLETION_ALIGNED = (
    "completion_ids",
    "completion_mask",
    "old_per_token_logps",
    "ref_per_token_logps",
    "sampling_per_token_logps",
    "tool_mask",
    "importance_sampling_ratio",
    "advantages",
)
PROMPT_ALIGNED = ("prompt_ids", "prompt_mask")


def pack_rows_by_length(batch: dict[str, Any], num_chunks: int) -> list[dict[str, Any]]:
    """`num_chunks` micro-batches of rows of similar length, each without trailing padding columns (module docstring).

    Rows are sorted by prompt + completion tokens under their masks (a stable sort: equal lengths keep the batch's
    order) and split as `split_rows` does. Trimming applies only when every per-row entry of two or more dimensions
    is a known prompt- or completion-aligned one (`PROMPT_ALIGNED`, `COMPLETION_ALIGNED`; a sequence-level
    `importance_sampling_ratio` `[N, 1]` is kept whole); otherwise the chunks are only sorted.
    """
    n = local_row_count(batch)
    lengths = (batch["prompt_mask"].sum(dim=1) + batch["completion_mask"].sum(dim=1)).cpu()  # [n]
    order = torch.sort(lengths, stable=True).indices
    chunks = split_rows(index_rows(batch, order), num_chunks)
    C = batch["completion_ids"].shape[1]
    others = [
        key
        for key, value in batch.items()
        if isinstance(value, torch.Tensor)
        and value.dim() > 1
        and value.shape[0] == n
        and key not in PROMPT_ALIGNED + COMPLETION_ALIGNED
    ]
    if others:
        return chunks
    return [_trim_padding(chunk, C) for chunk in chunks]


def _trim_padding(chunk: dict[str, Any], C: int) -> dict[str, Any]:
    used = chunk["completion_mask"].bool().any(dim=0)  # [C] a column some row attends to
    end = int(used.nonzero()[-1]) + 1 if bool(used.any()) else 1  # keep >= 1 column
    out = dict(chunk)
    for key in COMPLETION_ALIGNED:
        value = chunk.get(key)
        if isinstance(value, torch.Tensor) and value.dim() > 1 and value.shape[1] == C:
            out[key] = value[:, :end]
    return out


LEFT_PADDED = ("prompt_ids", "prompt_mask")
TOKEN_ID_KEYS = ("prompt_ids", "completion_ids")
# Per-token entries whose neutral padding value is 1 (every other non-token-id entry is padded with 0).
PAD_ONE_KEYS = ("tool_mask", "importance_sampling_ratio")


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
                fill = pad_token_id if key in TOKEN_ID_KEYS else (1 if key in PAD_ONE_KEYS else 0)
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


def zero_variance_share(rewards: torch.Tensor, group_size: int) -> float:
    """Share of the generation batch's groups whose known rewards (`[N_global]`, NaN = unknown) cannot differ."""
    groups = rewards.detach().float().cpu().view(-1, group_size)  # [B, G]
    known = torch.isfinite(groups)
    high = torch.where(known, groups, -torch.inf).max(dim=1).values
    low = torch.where(known, groups, torch.inf).min(dim=1).values
    flat = (known.sum(dim=1) < 2) | (high <= low)
    return float(flat.float().mean())
