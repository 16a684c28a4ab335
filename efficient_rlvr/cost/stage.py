"""Cost-Aware GRPO wired into `EfficientGRPOTrainer` (stage contract, step 5: `minibatch_sampler`).

`CostAwareStage.split` replaces TRL's shuffle-and-split of a generation batch; `CostAwareStage.weighted_loss` applies
the importance weights of the micro-batches it returns. Per generation batch (after every earlier batch stage):

1. Pool. Every process all-gathers, for each of its rows, the advantage A_i, the cost c_i = prompt + completion
   tokens (`rollout_costs`) and whether the row has any loss token; rows are ordered rank 0 first. Rows whose loss
   mask (`completion_mask`, times `tool_mask` if present) is all zero are inert (truncated completions under
   `mask_truncated_completions`, padding rows of `efficient_rlvr.batch.keep_rows`): they are left out of the pool,
   so p_i = 0 whatever `cost_alpha` is. Rows dropped by earlier stages are simply absent. N = rows of the batch over
   all processes, N_eff = rows in the pool.
2. Draw. `CostAwareSampler` (identical inputs and seeded generator on every process) draws M rows i.i.d. from
   p_i ~ (1 - alpha) |A_i| / sqrt(c_i) / Z + alpha / N_eff, with replacement; M = `cost_num_draws`, or
   ceil(`cost_draw_fraction` N_eff) (a share of what earlier stages kept, e.g. pruning survivors), default N (the
   number of sequences vanilla TRL trains on), rounded up to a multiple of P (see 3.). Only rows with A_i = 0 exactly
   get p_i = 0 (at alpha = 0); N_+ = pooled rows with p_i > 0. Importance weights v_j = 1 / (N_+ p_j): the raw
   weights 1 / (N_eff p_j) re-centred by a constant, their expected value N_+ / N_eff, so that E_p[v] = 1 (SPEC 3
   "Correction"; never by the draws' own mean, which over a pool that holds A = 0 rows multiplies the step by about
   N_eff / N_+ and otherwise makes a biased ratio estimator; see the sampler's docstring).
3. Equal shares. M is rounded up to a multiple of P (P = processes) and every rank trains exactly M / P draws, in
   micro-batches of the same sizes on every rank: TRL's loss all-gathers per-sequence metrics (clip ratios), which
   needs equal row counts per micro-step, per-step time is set by the slowest rank, a rank holding many informative
   groups would otherwise get most of the draws (groups live on one rank), and a rank's micro-batch could outgrow
   `per_device_train_batch_size` (memory). Draws of a rank's own rows stay on it (in draw order, up to its share);
   the overflow goes, in draw order, to ranks below their share, and those rows are moved with one all-gather of
   the moved rows only (every rank receives every moved row: O(moved x P) traffic; point-to-point would cut it by
   P). Each rank shuffles its draws (stage generator) and splits them into `steps_per_generation` contiguous
   micro-batches whose sizes differ by at most one; each has >= 1 row because M >= P x steps_per_generation
   (checked at construction for `cost_num_draws`). Trailing completion columns that are padding for every row of
   a micro-batch are trimmed (exact: causal attention, masked positions), so short draws cost fewer FLOPs.
4. Loss. `weighted_loss` multiplies each row's advantage by its `sample_weights` s_j v_j and calls TRL's own
   `_compute_loss`. Advantage scaling weights the policy term of every TRL 1.16 loss type exactly (w > 0; proved on
   TRL's code in tests/test_cost.py). The factor s_j makes the micro-batch losses, summed over the accumulation
   window and averaged by DDP over processes, an exactly unbiased estimate of TRL's full-batch objective of the
   same loss type for this batch, at every zero-advantage share (E_p[v_j R_j] = (1/N_+) sum_{p_i > 0} R_i, and the
   rows with p_i = 0 have R_i = 0; `num_items_in_batch` stays TRL's count of the full batch, as weighting.py
   prescribes; tests/test_cost_fidelity.py checks it by Monte Carlo against TRL's `_compute_loss`):
     - dapo, cispo, vespo (token sum / num_items_in_batch): s = N_+ / M;
     - grpo, sapo, luspo, dr_grpo (divided by the micro-batch's row count B_k): s = (N_+ / N) B_k P spg / M,
       which also undoes unequal micro-batch sizes;
     - bnpo (divided by the micro-batch's own loss-token count T_k, which depends on the draw and would bias the
       estimate): s = (N_+ / M) T_k P spg / num_items_in_batch, i.e. the dapo normaliser of the sampled batch
       (`policy_loss_normalizer('bnpo', sampled=True)`); the micro-batch's own count cancels.
   So s_j v_j = (N_eff / M) / (N_eff p_j) x (normaliser terms): the raw weights; re-centring only moves N_+ between
   the two factors.
   With M = N, no inert rows and the identity draw, every s_j v_j = 1 and the loss is TRL's (tested).
5. `num_iterations > 1`: the trainer buffers the micro-batches of a generation batch and reuses them for every
   iteration, as TRL reuses its shuffled buffer; the draw happens once per generation batch.

Refused at construction (ValueError naming the field), because advantage scaling cannot weight them per rollout:
`beta != 0` (the KL term stays unweighted), `entropy_coef != 0` / `use_adaptive_entropy` (the entropy bonus is a
micro-batch token mean), `top_entropy_quantile < 1` (the token mask is a quantile over the micro-batch, so a row's
term depends on which rows were drawn), a `loss_type` outside `SUPPORTED_LOSS_TYPES`, and `cost_num_draws` <
num_processes x steps_per_generation. Rows must carry 1-D advantages (checked per batch).

Deviation: when no pooled row has A != 0 (every group zero-variance, or every row inert) the policy gradient of
the batch is zero whatever is drawn; the stage then draws only P x steps_per_generation rows, the
fewest that keep every micro-batch non-empty (inert-only batches get weight 0).

Metrics (`cost/`, all processes together): per optimizer step and cumulative, policy-optimization tokens (tokens of
the rows that went through the policy forward/backward, repeats and iterations counted), the tokens vanilla TRL
would have spent on the same batches (every row once per iteration) and the saving; of the last draw: raw weight
max / mean, effective sample size, unique fraction, pool sizes, rows moved between processes.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..batch import index_rows, local_row_count
from .sampler import CostAwareSampler, rollout_costs
from .weighting import SUPPORTED_LOSS_TYPES

__all__ = ["CostAwareStage", "check_cost_aware_config"]

# Not a config field: the split generator (assignment shuffle, all-inert fallback) is seeded with args.seed + this,
# so that it differs from the sampler's generator (seeded with args.seed).
SPLIT_SEED_OFFSET = 7919
# Not a config field: the sampler's zero-advantage threshold (see sampler.py; the default of CostAwareSampler): only
# exact zeros get p = 0. A threshold > 0 drops small continuous advantages (graded rewards, scale_rewards="none") from
# the estimate, a bias of their whole share of the objective.
ADVANTAGE_EPS = 0.0

_TOKEN_SUM_TYPES = ("dapo", "cispo", "vespo")
_ROW_COUNT_TYPES = ("grpo", "sapo", "luspo", "dr_grpo")
_PROMPT_KEYS = ("prompt_ids", "prompt_mask")
# Completion-aligned [N, C] entries of TRL's batch (trimmed together; importance_sampling_ratio only when per token).
_COMPLETION_KEYS = (
    "completion_ids",
    "completion_mask",
    "old_per_token_logps",
    "ref_per_token_logps",
    "sampling_per_token_logps",
    "tool_mask",
    "importance_sampling_ratio",
)
_CHUNK_KEY = "cost_chunk"
_WEIGHT_KEY = "sample_weights"


def check_cost_aware_config(args: Any, num_processes: int) -> None:
    """Raise ValueError (naming the field) if cost-aware weights cannot be applied exactly under `args`."""
    loss_type = args.loss_type
    if loss_type not in SUPPORTED_LOSS_TYPES:
        raise ValueError(
            f"loss_type={loss_type!r} is not supported with cost_aware_sampling; use one of {SUPPORTED_LOSS_TYPES}."
        )
    if args.beta != 0.0:
        raise ValueError(
            f"beta={args.beta}: cost_aware_sampling importance-weights the loss by scaling advantages, which leaves "
            "the KL term unweighted (biased towards the drawn short, high-|A| rollouts); set beta=0.0."
        )
    if args.entropy_coef != 0.0:
        raise ValueError(
            f"entropy_coef={args.entropy_coef}: the entropy bonus is a token mean over the micro-batch and cannot be "
            "importance-weighted per rollout; set entropy_coef=0.0 with cost_aware_sampling."
        )
    if args.use_adaptive_entropy:
        raise ValueError(
            "use_adaptive_entropy=True adds an entropy bonus that cannot be importance-weighted per rollout; set "
            "use_adaptive_entropy=False with cost_aware_sampling."
        )
    if args.top_entropy_quantile < 1.0:
        raise ValueError(
            f"top_entropy_quantile={args.top_entropy_quantile} < 1 masks tokens by a quantile of the micro-batch's "
            "entropies, so a rollout's loss term depends on which rollouts were drawn; set top_entropy_quantile=1.0 "
            "with cost_aware_sampling."
        )
    minimum = num_processes * args.steps_per_generation
    if args.cost_num_draws is not None and args.cost_num_draws < minimum:
        raise ValueError(
            f"cost_num_draws={args.cost_num_draws} must be >= num_processes x steps_per_generation = {minimum} "
            "(every micro-batch of every process needs at least one row), or None (as many draws as rollouts)."
        )


def _chunk_bounds(n: int, num_chunks: int) -> list[int]:
    """Boundaries of `num_chunks` contiguous chunks of n items whose sizes differ by at most one."""
    return [round(i * n / num_chunks) for i in range(num_chunks + 1)]


class CostAwareStage:
    """`minibatch_sampler` of `EfficientGRPOTrainer`: cost-aware minibatch sampling (see the module docstring).

    Args:
        trainer: the trainer (needs `accelerator`, `processing_class`; optional `use_vllm`,
            `vllm_importance_sampling_mode`).
        args: its `EfficientGRPOConfig`; reads `cost_alpha`, `cost_num_draws`, `seed`, `loss_type`, `beta`,
            `entropy_coef`, `use_adaptive_entropy`, `top_entropy_quantile`, `steps_per_generation`.
    """

    def __init__(self, trainer: Any, args: Any):
        check_cost_aware_config(args, trainer.accelerator.num_processes)
        self.loss_type: str = args.loss_type
        self.num_draws: int | None = args.cost_num_draws
        self.draw_fraction: float | None = getattr(args, "cost_draw_fraction", None)
        self.sampler = CostAwareSampler(alpha=args.cost_alpha, seed=args.seed, eps=ADVANTAGE_EPS)
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(args.seed + SPLIT_SEED_OFFSET)
        tokenizer = getattr(trainer, "_tokenizer", None) or trainer.processing_class
        self.pad_token_id = int(getattr(tokenizer, "pad_token_id", None) or 0)
        self.per_token_ratio = not (
            getattr(trainer, "use_vllm", False)
            and str(getattr(trainer, "vllm_importance_sampling_mode", "")).startswith("sequence")
        )
        # Per-chunk global accounting of the current buffer, and per-step / cumulative counters.
        self._chunk_tokens: list[float] = []
        self._chunk_rows: list[float] = []
        self._full_tokens = 0.0
        self._full_rows = 0.0
        self._pending = {"policy_tokens": 0.0, "full_batch_tokens": 0.0, "policy_rows": 0.0, "full_batch_rows": 0.0}
        self._step = dict(self._pending)
        self._cumulative = dict(self._pending)
        self._last_split: dict[str, float] = {}
        # The last draw, for inspection: global row ids (rank 0's rows first) and re-centred weights in draw order,
        # and this process's rows (global ids) and loss multipliers in micro-batch order.
        self.last_draw: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------------ split
    def split(self, trainer: Any, batch: dict[str, Any], num_chunks: int) -> list[dict[str, Any]]:
        """Draw this generation batch's policy-gradient rows and split this process's share into micro-batches.

        Args:
            trainer: the trainer.
            batch: this process's generation batch (TRL's dict, after the batch stages); `advantages` `[N_local]`.
            num_chunks: micro-batches to return (`steps_per_generation`).

        Returns:
            `num_chunks` dicts with TRL's keys plus `sample_weights` `[B_k]` (loss multipliers of the rows) and
            `cost_chunk` (the micro-batch index).
        """
        accelerator = trainer.accelerator
        n_proc, rank = accelerator.num_processes, accelerator.process_index
        n_local = local_row_count(batch)
        advantages = batch["advantages"]
        if advantages.dim() != 1:
            raise ValueError(
                f"CostAwareStage needs one advantage per rollout ([N]), got shape {tuple(advantages.shape)}."
            )
        loss_mask = batch["completion_mask"]
        if "tool_mask" in batch:
            loss_mask = loss_mask * batch["tool_mask"]
        costs = rollout_costs(batch["prompt_mask"], batch["completion_mask"])  # [N_local]
        local = torch.stack(
            [advantages.detach().double().cpu(), costs.double().cpu(), loss_mask.sum(1).double().cpu()], 1
        )  # [N_local, 3]: advantage, cost, loss tokens
        pooled = self._gather([local], n_proc)  # P tensors
        counts = [int(t.shape[0]) for t in pooled]
        table = torch.cat(pooled)  # [N, 3], rank 0 first
        owner = torch.repeat_interleave(torch.arange(n_proc), torch.tensor(counts))  # [N]
        offsets = [sum(counts[:r]) for r in range(n_proc)]
        n_total = table.shape[0]
        adv_all, cost_all, loss_tokens = table[:, 0], table[:, 1], table[:, 2]
        valid = loss_tokens > 0  # inert rows (no loss token) are not in the pool

        # ---- draw (identical on every process)
        minimum = n_proc * num_chunks
        if self.num_draws is not None:
            m = self.num_draws
        elif self.draw_fraction is not None:  # a share of the rows earlier stages kept (inert rows excluded)
            m = max(math.ceil(self.draw_fraction * int(valid.sum())), minimum)
        else:
            m = n_total
        m = -(-m // n_proc) * n_proc  # a multiple of P: equal shares
        if m < minimum:
            raise ValueError(
                f"CostAwareStage: {m} draws cannot fill {num_chunks} micro-batches on {n_proc} processes."
            )
        pool = torch.nonzero(valid).flatten()  # [N_eff] global row ids
        informative = bool((adv_all[pool].abs() > self.sampler.eps).any()) if pool.numel() else False
        if not informative:
            m = minimum
        if pool.numel() == 0:  # every row inert: draw the minimum uniformly, zero weight (their loss is zero anyway)
            picked, _ = self.sampler.draw(torch.zeros(n_total), cost_all, num_draws=m)
            rows = picked
            weights = torch.zeros(m, dtype=torch.float64)
        else:
            picked, weights = self.sampler.draw(adv_all[pool], cost_all[pool], num_draws=m)
            rows = pool[picked]  # [M] global row ids
            weights = weights.double()
        # N_+: pooled rows with p > 0 (the sampler's re-centring constant is N_+ / N_eff)
        n_support = self.sampler.support_size(adv_all[pool], cost_all[pool]) if pool.numel() else 1

        # ---- equal shares: own draws first, overflow in draw order, then a shuffle per rank
        quota = [m // n_proc] * n_proc
        assigned: list[list[int]] = [[] for _ in range(n_proc)]
        overflow: list[int] = []
        for j, o in enumerate(owner[rows].tolist()):
            (assigned[o] if len(assigned[o]) < quota[o] else overflow).append(j)
        for r in range(n_proc):
            take = quota[r] - len(assigned[r])
            assigned[r].extend(overflow[:take])
            overflow = overflow[take:]
        for r in range(n_proc):
            order = torch.randperm(len(assigned[r]), generator=self._generator).tolist()
            assigned[r] = [assigned[r][i] for i in order]

        # ---- loss multipliers s_j v_j and global accounting per micro-batch
        num_items = float(batch["num_items_in_batch"]) if "num_items_in_batch" in batch else float(loss_tokens.sum())
        scale = self._scales(loss_tokens, num_items, rows, weights, assigned, num_chunks, n_total, n_support)
        self._chunk_tokens = [0.0] * num_chunks
        self._chunk_rows = [0.0] * num_chunks
        for r in range(n_proc):
            bounds = _chunk_bounds(len(assigned[r]), num_chunks)
            for k in range(num_chunks):
                draws = assigned[r][bounds[k] : bounds[k + 1]]
                self._chunk_tokens[k] += float(cost_all[rows[draws]].sum())
                self._chunk_rows[k] += float(len(draws))
        self._full_tokens = float(cost_all.sum())
        self._full_rows = float(n_total)

        # ---- move the rows of other processes that this process trains, build the micro-batches
        mine = assigned[rank]
        my_rows = rows[mine]  # [M_r] global ids
        per_row = {k: v for k, v in batch.items() if _is_per_row(v, n_local)}
        source, position, moved = self._collect(per_row, my_rows, rows, assigned, owner, offsets, n_proc, rank)
        local_batch = index_rows(source, position)
        for key, value in batch.items():
            if key not in per_row:
                local_batch[key] = value
        local_batch[_WEIGHT_KEY] = scale[rank].to(device=advantages.device, dtype=torch.float32)
        bounds = _chunk_bounds(len(mine), num_chunks)
        chunks = []
        for k in range(num_chunks):
            chunk = index_rows(local_batch, torch.arange(bounds[k], bounds[k + 1]))
            chunk = self._trim(chunk)
            chunk[_CHUNK_KEY] = k
            chunks.append(chunk)

        self.last_draw = {
            "rows": rows.clone(),
            "weights": weights.clone(),
            "local_rows": my_rows.clone(),
            "sample_weights": scale[rank].clone(),
            "pool_rows": n_total,
            "pool_valid_rows": int(pool.numel()),
            "support_rows": n_support if pool.numel() else 0,
        }
        raw = self.sampler.metrics()
        self._last_split = {
            "cost/pool_rows": float(n_total),
            "cost/pool_valid_rows": float(pool.numel()),
            "cost/support_rows": float(n_support if pool.numel() else 0),
            "cost/draws": float(m),
            "cost/rows_moved": float(moved),
            "cost/weight_max": raw.get("cost/weight_max", 0.0),
            "cost/weight_mean": raw.get("cost/weight_mean", 0.0),
            "cost/ess": raw.get("cost/ess", 0.0),
            "cost/ess_frac": raw.get("cost/ess_frac", 0.0),
            "cost/unique_frac": raw.get("cost/unique_frac", 0.0),
            "cost/zero_adv_frac": raw.get("cost/zero_adv_frac", 0.0),
            "cost/uniform_fallback": raw.get("cost/uniform_fallback", 0.0),
        }
        return chunks

    def _scales(
        self,
        tokens: torch.Tensor,
        num_items: float,
        rows: torch.Tensor,
        weights: torch.Tensor,
        assigned: list[list[int]],
        num_chunks: int,
        n_total: int,
        n_support: int,
    ) -> list[torch.Tensor]:
        """Per rank, the loss multipliers s_j v_j of its draws in its (shuffled) order (module docstring, 4.).

        `tokens` `[N]`: loss tokens of every global row (bnpo); `num_items`: TRL's `num_items_in_batch`; `n_support`:
        N_+, the pooled rows with p > 0 (`weights` are 1 / (N_+ p)).
        """
        n_proc, m = len(assigned), rows.numel()
        out = []
        for r in range(n_proc):
            v = weights[assigned[r]]  # [M_r] float64
            bounds = _chunk_bounds(len(assigned[r]), num_chunks)
            s = torch.empty_like(v)
            for k in range(num_chunks):
                lo, hi = bounds[k], bounds[k + 1]
                if self.loss_type in _TOKEN_SUM_TYPES:
                    s[lo:hi] = n_support / m
                elif self.loss_type in _ROW_COUNT_TYPES:
                    s[lo:hi] = (n_support / n_total) * (hi - lo) * n_proc * num_chunks / m
                else:  # bnpo: TRL divides by the micro-batch's own loss tokens T_k; swap in the sampled dapo normaliser
                    t_k = float(tokens[rows[assigned[r][lo:hi]]].sum())
                    s[lo:hi] = (n_support / m) * max(t_k, 1.0) * n_proc * num_chunks / max(num_items, 1.0)
            out.append(v * s)
        return out

    # ------------------------------------------------------------------------------------------ data movement
    @staticmethod
    def _gather(items: list[Any], n_proc: int) -> list[Any]:
        if n_proc == 1:
            return list(items)
        from accelerate.utils import gather_object

        return gather_object(items)

    def _collect(
        self,
        per_row: dict[str, Any],
        my_rows: torch.Tensor,
        rows: torch.Tensor,
        assigned: list[list[int]],
        owner: torch.Tensor,
        offsets: list[int],
        n_proc: int,
        rank: int,
    ) -> tuple[dict[str, Any], torch.Tensor, int]:
        """(rows this process can index, index of each of its draws in them, rows moved between processes)."""
        needed = [set() for _ in range(n_proc)]  # per owner: global ids other processes train
        for r in range(n_proc):
            for g in rows[assigned[r]].tolist():
                o = int(owner[g])
                if o != r:
                    needed[o].add(g)
        moved = sum(len(s) for s in needed)
        if moved == 0:
            return per_row, my_rows - offsets[rank], 0
        export_ids = sorted(needed[rank])
        export_local = torch.tensor([g - offsets[rank] for g in export_ids], dtype=torch.long)
        export = {
            k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in index_rows(per_row, export_local).items()
        }
        received = self._gather([(rank, export_ids, export)], n_proc)
        pieces, where, start = [per_row], {}, local_row_count(per_row)
        for src, ids, rows_of_src in sorted(received, key=lambda item: item[0]):
            if src == rank or not ids:
                continue
            pieces.append({k: _to_device_like(v, per_row[k]) for k, v in rows_of_src.items()})
            where.update({g: start + i for i, g in enumerate(ids)})
            start += len(ids)
        from ..batch import concat_batches

        seq_keys = () if self.per_token_ratio else ("importance_sampling_ratio",)
        source = concat_batches(pieces, self.pad_token_id, seq_keys) if len(pieces) > 1 else per_row
        position = [g - offsets[rank] if int(owner[g]) == rank else where[g] for g in my_rows.tolist()]
        return source, torch.tensor(position, dtype=torch.long), moved

    def _trim(self, chunk: dict[str, Any]) -> dict[str, Any]:
        """Drop trailing completion columns that are padding for every row of the micro-batch."""
        mask = chunk["completion_mask"]  # [B, C]
        width = mask.shape[1]
        used = torch.nonzero(mask.sum(0)).flatten()
        keep = max(int(used[-1]) + 1 if used.numel() else 1, 1)
        if keep == width:
            return chunk
        n = mask.shape[0]
        per_token = [k for k, v in chunk.items() if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[0] == n]
        if any(key not in _PROMPT_KEYS + _COMPLETION_KEYS and chunk[key].shape[1] == width for key in per_token):
            return chunk  # an unknown completion-aligned entry: leave the widths alone
        for key in per_token:
            if key in _COMPLETION_KEYS and chunk[key].shape[1] == width:
                chunk[key] = chunk[key][:, :keep]
        return chunk

    # ------------------------------------------------------------------------------------------------ loss
    def weighted_loss(self, trainer: Any, model: Any, inputs: dict[str, Any], base_compute_loss: Any) -> torch.Tensor:
        """TRL's loss on a sampled micro-batch with each row's advantage multiplied by its `sample_weights`.

        Args:
            trainer: the trainer.
            model: the model handed to `_compute_loss`.
            inputs: a micro-batch returned by `split` (TRL keys + `sample_weights` `[B]`, `cost_chunk`).
            base_compute_loss: TRL's `_compute_loss`, bound to the trainer: `(model, inputs) -> loss`.
        """
        weights = inputs[_WEIGHT_KEY]  # [B]
        plain = {k: v for k, v in inputs.items() if k not in (_WEIGHT_KEY, _CHUNK_KEY)}
        advantages = plain["advantages"]  # [B]
        plain["advantages"] = advantages * weights.to(device=advantages.device, dtype=advantages.dtype)
        loss = base_compute_loss(model, plain)
        chunk = inputs.get(_CHUNK_KEY)
        if trainer.model.training and chunk is not None and chunk < len(self._chunk_tokens):
            n_chunks = len(self._chunk_tokens)
            self._pending["policy_tokens"] += self._chunk_tokens[chunk]
            self._pending["policy_rows"] += self._chunk_rows[chunk]
            self._pending["full_batch_tokens"] += self._full_tokens / n_chunks
            self._pending["full_batch_rows"] += self._full_rows / n_chunks
        return loss

    # ---------------------------------------------------------------------------------------- component API
    def on_step_end(self, trainer: Any) -> None:
        """Close the optimizer step's token accounting."""
        self._step = dict(self._pending)
        for key, value in self._pending.items():
            self._cumulative[key] += value
            self._pending[key] = 0.0

    def metrics(self) -> dict[str, float]:
        """`cost/` metrics, all processes together (see the module docstring).

        Per optimizer step: `policy_tokens`, `full_batch_tokens` (vanilla TRL: every row once per iteration),
        `tokens_saved`, `tokens_saved_frac`, `policy_rows`, `full_batch_rows`; cumulative: `*_cumulative`; of the
        last draw: `weight_max` / `weight_mean` (raw 1 / (N_eff p)), `ess`, `ess_frac`, `unique_frac`,
        `zero_adv_frac`, `uniform_fallback`, `draws`, `pool_rows`, `pool_valid_rows`, `support_rows` (N_+, rows with
        p > 0), `rows_moved`.
        """
        out = dict(self._last_split)
        step, total = self._step, self._cumulative
        out["cost/policy_tokens"] = step["policy_tokens"]
        out["cost/full_batch_tokens"] = step["full_batch_tokens"]
        out["cost/tokens_saved"] = step["full_batch_tokens"] - step["policy_tokens"]
        out["cost/tokens_saved_frac"] = (
            out["cost/tokens_saved"] / step["full_batch_tokens"] if step["full_batch_tokens"] > 0 else 0.0
        )
        out["cost/policy_rows"] = step["policy_rows"]
        out["cost/full_batch_rows"] = step["full_batch_rows"]
        out["cost/policy_tokens_cumulative"] = total["policy_tokens"]
        out["cost/full_batch_tokens_cumulative"] = total["full_batch_tokens"]
        out["cost/tokens_saved_cumulative"] = total["full_batch_tokens"] - total["policy_tokens"]
        out["cost/policy_rows_cumulative"] = total["policy_rows"]
        out["cost/rows_saved_cumulative"] = total["full_batch_rows"] - total["policy_rows"]
        return out

    def state_dict(self) -> dict[str, Any]:
        """Sampler (incl. its generator), the split generator and the counters; torch.save-able."""
        return {
            "sampler": self.sampler.state_dict(),
            "generator_state": self._generator.get_state(),
            "pending": dict(self._pending),
            "step": dict(self._step),
            "cumulative": dict(self._cumulative),
            "last_split": dict(self._last_split),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()`; the next draws and splits repeat those of the saved run."""
        self.sampler.load_state_dict(state["sampler"])
        self._generator.set_state(state["generator_state"])
        self._pending = dict(state["pending"])
        self._step = dict(state["step"])
        self._cumulative = dict(state["cumulative"])
        self._last_split = dict(state["last_split"])


def _is_per_row(value: Any, n: int) -> bool:
    return (isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n) or (
        isinstance(value, list) and len(value) == n
    )


def _to_device_like(value: Any, like: Any) -> Any:
    if isinstance(value, torch.Tensor) and isinstance(like, torch.Tensor):
        return value.to(device=like.device)
    return value
