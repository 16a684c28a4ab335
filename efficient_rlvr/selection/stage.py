"""HIVE prompt selection and the DAPO zero-variance gate, wired into `EfficientGRPOTrainer` (the stage contract).

`PromptSelectionStage` (trainer hook `prompt_selection`) replaces the prompts of every generation batch before any
rollout. TRL's repeat sampler still delivers a batch of B_local prompts x G rows per process; the stage keeps only
its size and columns and fills it from its own pool:

1. Draw candidates from `trainer.train_dataset` with a `CandidatePool` seeded by `args.seed` (epoch-wise shuffles,
   identical on every process), and pass them through stage 1, the `HistorySampler` (GRESO's skip rule,
   `selection_history`), accumulating until ceil(B_global / keep_ratio) candidates survive (B_global when stage 2 is
   off), where B_global = B_local x num_processes. If a whole epoch's worth of draws cannot fill that, the pool is
   "dry": skipped candidates top the list up (training goes on) and `selection/pool_dry` says so.
2. Stage 2, the `EntropyMedianFilter` (`selection_entropy`): one no-grad forward pass of the current policy
   (`accelerator.unwrap_model(trainer.model)`, eval mode for the pass, training mode restored) over the candidates,
   tokenized exactly as TRL tokenizes prompts for generation (`trainer._tokenize_prompts`: chat template with
   `add_generation_prompt=True`), in batches of `per_device_train_batch_size`. Each process scores a contiguous
   1/num_processes shard (padded so every process runs the same number of forward passes, as sharded models need)
   and the entropies are all-gathered, so every process sees the same values. The filter keeps the B_global
   highest-entropy candidates (fixed-count mode): with 2B candidates this is SPEC's "H >= median" rule with ties
   broken by draw order, and it keeps the optimizer's batch at exactly B prompts x G rollouts.
3. The chosen global list is split by rank (rank r gets prompts [r*B_local, (r+1)*B_local)), each prompt repeated G
   times, rows carrying the same columns the dataloader delivered.

After scoring, `observe` records every group's rewards (gathered over processes) in the history, classified on all G
rollouts: a group with pruned (NaN) rollouts is mixed if its known rewards differ and otherwise unknown (not
recorded, not counted in the ratios). After every optimizer step `on_step_end` adapts p_easy / p_hard, but only once
revisits happen (`selection_adapt_warmup_steps`: None = from the first step that draws a revisited prompt; n = after
n optimizer steps). Every process makes identical decisions because every input of a decision is identical: the
pool, the history RNG, the gathered rewards and the gathered entropies.

`DynamicSamplingStage` (a batch stage, `dynamic_sampling`) is DAPO's dynamic sampling: after scoring it drops the
groups whose rewards have zero variance and refills the batch with groups rolled out for extra prompts (its own
pool), for at most `dynamic_sampling_max_rounds` extra rounds. A refill never repeats a prompt already in the step:
its prompts are the pool's next draws whose prompt keys are neither in the step's batch (all processes' rows,
gathered once when a refill is needed) nor in an earlier refill of the step; the skipped draws are consumed, so the
draws stay a function of the pool state (deterministic on every process, resumed with the pool). When an epoch's
worth of draws finds no fresh prompt (a dataset barely larger than the step) the refills stop. A refill calls TRL's
unmodified `trl.GRPOTrainer._generate_and_score_completions(trainer, extra_rows)` on every process with the same
number of rows (m prompts x G, m a multiple of num_processes), so TRL builds complete groups of G with its own
advantages, old log-probs and importance ratios; the batches are concatenated (`concat_batches`: prompts
left-padded, completions right-padded). The gate reads each row's reward and group (`rollout_rewards` /
`rollout_groups`), so it also runs after pruning: a group is judged on its known (surviving) rewards, and refill
rows get new group ids after the batch's. The first B_global surviving groups in generation order are kept (original
batch first), every other row is dropped with `efficient_rlvr.batch.keep_rows` (which recounts `num_items_in_batch`
over all processes). Shapes stay valid because whole groups of G rows are kept or dropped, and if the refill rounds
run out the batch is simply smaller (`selection/dynamic/shortfall`). Every process ends with the same number of
rows: the kept groups are not spread evenly over the processes, and TRL's loss all-gathers per-sequence metrics
(clip ratios), which needs equal local row counts; so a process with fewer kept groups than the busiest one (or
fewer than `steps_per_generation` rows) keeps some dropped rows as inert padding (zero completion mask, zero
advantage: they add nothing to the loss). Every process knows every process's count from the gathered rewards, so
this needs no extra communication.

Deviations and choices: stage 2 in fixed-count mode (see 2.); HIVE's stage 1 runs on the prompts drawn per step,
not on TRL's sampler order (the sampler still runs and its batches are discarded); the history is capped at
`HISTORY_MAX_RECORDS` prompts (least recently updated evicted); the dynamic-sampling refill draws
ceil(missing / max(keep rate so far, `DYNAMIC_MIN_KEEP_RATE`)) prompts per round, at most B_global (DAPO draws
whole generation batches).
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import torch
from trl.models import unwrap_model_for_generation

from ..batch import ROLLOUT_GROUPS, ROLLOUT_REWARDS, annotate_rows, concat_batches, gather_row_annotations, keep_rows
from .base import Candidate, prompt_key
from .dynamic import ZeroVarianceGate
from .entropy import EntropyMedianFilter, prompt_entropy
from .history import HistorySampler
from .pool import CandidatePool, gather_candidates

# Not a config field (EfficientGRPOConfig has none): most prompts the history remembers (~200 bytes each).
HISTORY_MAX_RECORDS = 200_000
# Not a config field: the refill size assumes at least this share of fresh groups survives the gate.
DYNAMIC_MIN_KEEP_RATE = 0.25


def _map_style_dataset(trainer: Any, what: str) -> Any:
    dataset = trainer.train_dataset
    if dataset is None or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__") or len(dataset) < 1:
        raise ValueError(
            f"{what} draws prompts by index: train_dataset must be a non-empty map-style dataset "
            f"(got {type(dataset).__name__})."
        )
    return dataset


def _dataset_row(dataset: Any, index: int, columns: list[str] | None) -> dict[str, Any]:
    """Row `index` of the dataset as the dataloader delivers it (restricted to `columns` when given)."""
    item = dataset[int(index)]
    if columns is not None and all(c in item for c in columns):
        item = {c: item[c] for c in columns}
    return dict(item)


def _repeat_rows(rows: list[dict[str, Any]], times: int) -> list[dict[str, Any]]:
    """Each row `times` times in a row, as independent copies (TRL may write into a row)."""
    return [copy.deepcopy(row) for row in rows for _ in range(times)]


def _rank_slice(n_items: int, accelerator: Any) -> slice:
    per = n_items // accelerator.num_processes
    return slice(accelerator.process_index * per, (accelerator.process_index + 1) * per)


def _gather_list(values: list[Any], accelerator: Any) -> list[Any]:
    """Concatenation, in process order, of every process's `values` (identical on every process)."""
    if accelerator.num_processes == 1:
        return list(values)
    from accelerate.utils import gather_object

    return list(gather_object(list(values)))


class PromptSelectionStage:
    """HIVE prompt selection for `EfficientGRPOTrainer` (see the module docstring).

    Args:
        trainer: the `EfficientGRPOTrainer` (TRL's init done).
        args: its `EfficientGRPOConfig`; reads `selection_history`, `selection_entropy` and the `selection_*` fields.
    """

    def __init__(self, trainer: Any, args: Any):
        if not (args.selection_history or args.selection_entropy):
            raise ValueError("PromptSelectionStage needs selection_history=True or selection_entropy=True.")
        dataset = _map_style_dataset(trainer, "PromptSelectionStage")
        self.num_generations = int(trainer.num_generations)
        self.keep_ratio = float(args.selection_entropy_keep_ratio)
        self.positions: Any = "all" if args.selection_entropy_last_k is None else int(args.selection_entropy_last_k)
        self.temperature = float(getattr(trainer, "temperature", args.temperature))
        self.entropy_batch_size = int(args.per_device_train_batch_size)
        self.pool = CandidatePool(len(dataset), seed=args.seed)
        self.history: HistorySampler | None = None
        if args.selection_history:
            self.history = HistorySampler(
                easy_threshold=args.selection_easy_threshold,
                hard_threshold=args.selection_hard_threshold,
                p_init=args.selection_p_init,
                p_floor=args.selection_p_floor,
                target_zero_variance=args.selection_target_zero_variance,
                adapt_warmup_steps=args.selection_adapt_warmup_steps,
                seed=args.seed,
                max_records=HISTORY_MAX_RECORDS,
                group_size=self.num_generations,
                min_lift=args.selection_min_skip_lift,
            )
        self.entropy_filter: EntropyMedianFilter | None = None
        if args.selection_entropy:
            self.entropy_filter = EntropyMedianFilter(keep_ratio=self.keep_ratio)
        self._pending_keys: list[str] | None = None  # global keys of the batch being rolled out
        self.last_indices: list[int] = []  # global dataset indices chosen for the last generation batch
        self.last_keys: list[str] = []
        self._last: dict[str, float] = {}
        self._totals = {"batches": 0, "drawn": 0, "rolled_out": 0, "dry": 0, "entropy_seconds": 0.0}

    # --------------------------------------------------------------------------------------------------------------
    def _candidate(self, dataset: Any, index: int) -> Candidate:
        return Candidate(key=prompt_key(dataset[int(index)]["prompt"]), index=int(index))

    def candidate_entropies(self, trainer: Any, candidates: list[Candidate]) -> torch.Tensor:
        """Prompt entropy `[N]` of each candidate under the current policy, identical on every process."""
        accelerator = trainer.accelerator
        n, rank = accelerator.num_processes, accelerator.process_index
        per = math.ceil(len(candidates) / n)
        shard = candidates[rank * per : (rank + 1) * per]
        real = len(shard)
        shard = shard + [candidates[-1]] * (per - real)  # same number of forward passes on every process
        values: list[float] = []
        if shard:
            dataset = trainer.train_dataset
            prompts = [copy.deepcopy(dataset[c.index]["prompt"]) for c in shard]
            prompt_ids, images, multimodal_fields = trainer._tokenize_prompts(prompts)
            if images is not None or multimodal_fields:
                raise NotImplementedError("PromptSelectionStage: prompt entropy is implemented for text prompts only.")
            rows = [torch.as_tensor(ids, dtype=torch.long) for ids in prompt_ids]
            width = max(r.numel() for r in rows)
            pad_id = trainer.processing_class.pad_token_id if hasattr(trainer.processing_class, "pad_token_id") else 0
            input_ids = torch.full((len(rows), width), pad_id if pad_id is not None else 0, dtype=torch.long)  # [b, T]
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # [b, T], left padding as TRL
            for i, r in enumerate(rows):
                input_ids[i, width - r.numel() :] = r
                attention_mask[i, width - r.numel() :] = 1
            # TRL's generation context: under ZeRO-3 it gathers the parameters once, outside DeepSpeed's hooks
            # (calling the wrapped model here would leave the LM head in DeepSpeed's prefetch list); otherwise it is
            # the unwrapped (PEFT-adapted) model.
            with unwrap_model_for_generation(trainer.model_wrapped, accelerator) as model:
                entropies = prompt_entropy(
                    model,
                    input_ids.to(accelerator.device),
                    attention_mask.to(accelerator.device),
                    positions=self.positions,
                    batch_size=self.entropy_batch_size,
                    temperature=self.temperature,
                )  # [b]
            values = entropies[:real].float().cpu().tolist()
        return torch.tensor(_gather_list(values, accelerator), dtype=torch.float32)  # [N]

    def choose(self, trainer: Any, n_prompts: int) -> list[Candidate]:
        """Run stage 1 and stage 2 for a batch of `n_prompts` (global) prompts; the same on every process."""
        dataset = trainer.train_dataset
        target = math.ceil(n_prompts / self.keep_ratio) if self.entropy_filter is not None else n_prompts
        before = self.history.counts() if self.history is not None else None
        if self.history is not None:
            got = gather_candidates(self.pool, self.history, lambda i: self._candidate(dataset, i), target)
            candidates, drawn, dry, topped_up = got.candidates, got.drawn, got.dry, got.topped_up
        else:
            candidates = [self._candidate(dataset, i) for i in self.pool.draw(target)]
            drawn, dry, topped_up = target, False, 0
        last = {
            "selection/candidates": float(drawn),
            "selection/stage1_kept": float(len(candidates) - topped_up),
            "selection/topped_up": float(topped_up),
            "selection/pool_dry": float(dry),
        }
        if self.history is not None:
            after = self.history.counts()
            last["selection/skipped_easy"] = float(after["skipped_easy"] - before["skipped_easy"])
            last["selection/skipped_hard"] = float(after["skipped_hard"] - before["skipped_hard"])
        chosen = candidates
        if self.entropy_filter is not None:
            self.entropy_filter.n_keep = n_prompts
            self.entropy_filter.entropy_fn = lambda cands: self.candidate_entropies(trainer, cands)
            start = time.perf_counter()
            chosen = self.entropy_filter.select(candidates)
            seconds = time.perf_counter() - start
            filter_metrics = self.entropy_filter.metrics()
            last["selection/skipped_entropy"] = float(len(candidates) - len(chosen))
            last["selection/entropy_threshold"] = filter_metrics["selection/entropy/threshold"]
            last["selection/entropy_seconds"] = seconds
            self._totals["entropy_seconds"] += seconds
        if len(chosen) != n_prompts:
            raise RuntimeError(f"prompt selection produced {len(chosen)} prompts, expected {n_prompts}.")
        last["selection/kept"] = float(len(chosen))
        self._totals["batches"] += 1
        self._totals["drawn"] += drawn
        self._totals["rolled_out"] += len(chosen)
        self._totals["dry"] += int(dry)
        self._last = last
        return chosen

    def select(self, trainer: Any, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """This process's generation batch, refilled with the selected prompts (same length and layout as `rows`)."""
        G = self.num_generations
        if len(rows) == 0 or len(rows) % G:
            raise ValueError(f"select: got {len(rows)} rows, expected a positive multiple of num_generations={G}.")
        b_local = len(rows) // G
        b_global = b_local * trainer.accelerator.num_processes
        chosen = self.choose(trainer, b_global)
        self.last_indices = [c.index for c in chosen]
        self.last_keys = [c.key for c in chosen]
        self._pending_keys = list(self.last_keys)
        columns = list(rows[0].keys())
        local = chosen[_rank_slice(b_global, trainer.accelerator)]
        return _repeat_rows([_dataset_row(trainer.train_dataset, c.index, columns) for c in local], G)

    def observe(self, trainer: Any, rows: list[dict[str, Any]], rewards: torch.Tensor) -> None:
        """Record the rewards `[N_global]` of the batch chosen by the last `select` in the history."""
        if self._pending_keys is None:
            return
        keys, self._pending_keys = self._pending_keys, None
        groups = rewards.detach().float().cpu().reshape(-1, self.num_generations)  # [B_global, G]
        if groups.shape[0] != len(keys):
            raise ValueError(f"observe: {groups.shape[0]} reward groups for {len(keys)} selected prompts.")
        self.record_groups(keys, groups)

    def record_groups(self, keys: list[str], groups: torch.Tensor) -> None:
        """Record rolled-out groups (`groups` `[n, G]`, NaN = unknown) for the prompts `keys` (e.g. refills)."""
        if self.history is not None:
            self.history.observe(keys, groups)

    def on_step_end(self, trainer: Any) -> None:
        if self.history is not None:
            self.history.on_step_end()
        self.pool.on_step_end()

    # --------------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "pool": self.pool.state_dict(),
            "history": None if self.history is None else self.history.state_dict(),
            "entropy": None if self.entropy_filter is None else self.entropy_filter.state_dict(),
            "last": dict(self._last),
            "totals": dict(self._totals),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["history"] is None) != (self.history is None) or (state["entropy"] is None) != (
            self.entropy_filter is None
        ):
            raise ValueError("PromptSelectionStage state was saved with other selection stages switched on.")
        self.pool.load_state_dict(state["pool"])
        if self.history is not None:
            self.history.load_state_dict(state["history"])
        if self.entropy_filter is not None:
            self.entropy_filter.load_state_dict(state["entropy"])
        self._last = dict(state["last"])
        self._totals = dict(state["totals"])
        self._pending_keys = None

    def metrics(self) -> dict[str, float]:
        """`selection/...`: the last generation batch's candidates (prompts drawn), stage-1 survivors, skipped
        easy / hard (stage 1) and by entropy (stage 2), kept, pool dry (1/0) and top-ups, the entropy threshold and
        seconds of the entropy pass; p_easy / p_hard and whether they adapt yet (`adapting`, 0/1: from the first step
        that draws a revisited prompt unless `selection_adapt_warmup_steps` is set); stage 1's cumulative skips
        (`stage1_skipped_total`, easy + hard, topped-up ones included); cumulative prompts skipped by both stages,
        rollouts saved (skipped prompts x G: what rolling out every drawn prompt would have cost on top), entropy
        seconds and dry events; tracked prompts (history size) and the pool's epoch."""
        out = dict(self._last)
        skipped = self._totals["drawn"] - self._totals["rolled_out"]
        out["selection/prompts_skipped_total"] = float(skipped)
        out["selection/rollouts_saved_total"] = float(skipped * self.num_generations)
        out["selection/pool_dry_total"] = float(self._totals["dry"])
        out["selection/pool_epoch"] = self.pool.metrics()["selection/pool/epoch"]
        if self.entropy_filter is not None:
            out["selection/entropy_seconds_total"] = float(self._totals["entropy_seconds"])
        if self.history is not None:
            out["selection/p_easy"] = self.history.p_easy
            out["selection/p_hard"] = self.history.p_hard
            out["selection/adapting"] = float(self.history.adapting)
            counts = self.history.counts()
            out["selection/stage1_skipped_total"] = float(counts["skipped_easy"] + counts["skipped_hard"])
            out["selection/tracked_prompts"] = float(self.history.num_records)
        return out


class DynamicSamplingStage:
    """DAPO dynamic sampling as a batch stage: drop zero-variance groups, refill from extra prompts (module docstring).

    Args:
        trainer: the `EfficientGRPOTrainer`.
        args: its `EfficientGRPOConfig`; reads `dynamic_sampling_max_rounds`.
    """

    def __init__(self, trainer: Any, args: Any):
        dataset = _map_style_dataset(trainer, "DynamicSamplingStage")
        self.max_rounds = int(args.dynamic_sampling_max_rounds)
        if self.max_rounds < 1:
            raise ValueError(f"dynamic_sampling_max_rounds must be >= 1, got {self.max_rounds}.")
        self.num_generations = int(trainer.num_generations)
        self.gate = ZeroVarianceGate()
        self.pool = CandidatePool(len(dataset), seed=args.seed)
        self.sequence_level_keys: tuple[str, ...] = ()
        if getattr(trainer, "use_vllm", False) and str(
            getattr(trainer, "vllm_importance_sampling_mode", "")
        ).startswith("sequence"):
            self.sequence_level_keys = ("importance_sampling_ratio",)
        self._last: dict[str, float] = {}
        self._totals = {"rollouts_generated": 0, "rollouts_refilled": 0, "rollouts_dropped": 0, "shortfall_groups": 0}

    def _draw_fresh(self, dataset: Any, m: int, used: set[str], multiple: int = 1) -> list[int]:
        """Up to `m` dataset indices from the pool whose prompts are not in `used` (prompt keys) nor repeated, cut to
        a multiple of `multiple`; their keys are added to `used`. At most one epoch's worth (`dataset_size`) of
        indices is drawn per call, so a step holding (nearly) every prompt gets fewer (possibly none). Drawn
        indices that are skipped or cut are consumed. Deterministic given the pool state and `used`."""
        fresh: list[int] = []
        keys: list[str] = []
        found: set[str] = set()
        drawn = 0
        while len(fresh) < m and drawn < self.pool.dataset_size:
            need = min(m - len(fresh), self.pool.dataset_size - drawn)
            for index in self.pool.draw(need):
                key = prompt_key(dataset[int(index)]["prompt"])
                if key not in used and key not in found:
                    fresh.append(int(index))
                    keys.append(key)
                    found.add(key)
            drawn += need
        n = len(fresh) // multiple * multiple
        used.update(keys[:n])
        return fresh[:n]

    def _step_keys(self, trainer: Any, rows: list[dict[str, Any]]) -> set[str]:
        """Prompt keys of the step's batch on all processes (`rows` are this process's generation rows)."""
        local = sorted({prompt_key(row["prompt"]) for row in rows})
        return set(_gather_list(local, trainer.accelerator))

    def _refill(
        self, trainer: Any, indices: list[int], columns: list[str], first_group: int
    ) -> tuple[dict[str, Any], torch.Tensor]:
        """Roll out the (global) prompts `indices` x G on every process: this process's annotated batch and the
        rewards `[m * G]` of all processes; the new groups get the global ids `first_group ...`."""
        from trl import GRPOTrainer

        m = len(indices)
        local = indices[_rank_slice(m, trainer.accelerator)]
        rows = _repeat_rows([_dataset_row(trainer.train_dataset, i, columns) for i in local], self.num_generations)
        extra = GRPOTrainer._generate_and_score_completions(trainer, rows)
        rewards = trainer.last_rewards()  # [m * G]
        extra = annotate_rows(extra, rewards, trainer.accelerator.process_index, self.num_generations)
        extra[ROLLOUT_GROUPS] = extra[ROLLOUT_GROUPS] + first_group
        selection = getattr(trainer, "prompt_selection", None)
        if isinstance(selection, PromptSelectionStage):
            keys = [prompt_key(trainer.train_dataset[i]["prompt"]) for i in indices]
            selection.record_groups(keys, rewards.detach().float().cpu().view(-1, self.num_generations))
        return extra, rewards

    def process(
        self, trainer: Any, rows: list[dict[str, Any]], batch: dict[str, Any], rewards: torch.Tensor | None
    ) -> dict[str, Any]:
        """Gate the batch's groups on their known rewards, refill dropped groups, keep `B_global` groups' rows."""
        G = self.num_generations
        accelerator = trainer.accelerator
        n_proc = accelerator.num_processes
        if ROLLOUT_REWARDS not in batch:  # called outside the trainer: the batch is in generation order
            rewards = trainer.last_rewards() if rewards is None else rewards
            batch = annotate_rows(batch, rewards, accelerator.process_index, G)
        target = len(rows) * n_proc // G  # B_global groups, ids 0 .. target - 1
        # The first piece may have lost rows to an earlier stage (pruning): gate each group on its known rewards.
        row_rewards, row_groups, _ = gather_row_annotations(batch, accelerator)  # [N_kept_global] each
        known = torch.isfinite(row_rewards)
        masks = [self.gate.keep_mask([row_rewards[known & (row_groups == g)] for g in range(target)])]  # [target]
        kept, gated = int(masks[0].sum()), target
        generated = target * G
        if kept == target:
            self._record(target, kept, 0, generated, 0)
            return batch
        pieces = [batch]
        columns = list(rows[0].keys())
        used = self._step_keys(trainer, rows)  # every process enters here together: `kept` comes from gathered rewards
        rounds, next_group = 0, target
        while kept < target and rounds < self.max_rounds:
            rate = max(kept / gated, DYNAMIC_MIN_KEEP_RATE)
            m = min(math.ceil((target - kept) / rate), target)
            m = math.ceil(m / n_proc) * n_proc
            indices = self._draw_fresh(trainer.train_dataset, m, used, multiple=n_proc)
            if not indices:  # every prompt of the dataset is already in the step
                break
            rounds += 1
            self.gate.refill_needed(kept, target)  # counts the refill round
            m = len(indices)
            extra, extra_rewards = self._refill(trainer, indices, columns, next_group)
            mask = self.gate.keep_mask(extra_rewards.detach().float().cpu().view(-1, G))  # [m]
            pieces.append(extra)
            masks.append(mask)
            kept += int(mask.sum())
            gated += m
            generated += m * G
            next_group += m
        # Keep the first `target` surviving groups in generation order (original batch first); drop every other row
        # (and inert padding rows of an earlier stage: no completion token, no known reward).
        final = torch.cat(masks)  # [next_group] over global group ids
        final &= final.long().cumsum(0) <= target
        pad_id = trainer.processing_class.pad_token_id if hasattr(trainer.processing_class, "pad_token_id") else 0
        merged = concat_batches(pieces, pad_id, self.sequence_level_keys)
        groups = merged[ROLLOUT_GROUPS].long().cpu()  # [n_local_merged]
        real = torch.isfinite(merged[ROLLOUT_REWARDS].float().cpu()) | (merged["completion_mask"].sum(1) > 0).cpu()
        out = keep_rows(merged, final[groups] & real, accelerator, min_rows=trainer.args.steps_per_generation)
        self._record(target, min(kept, target), rounds, generated, generated - min(kept, target) * G)
        return out

    def _record(self, target: int, kept: int, rounds: int, generated: int, dropped: int) -> None:
        self._last = {
            "selection/dynamic/kept_groups": float(kept),
            "selection/dynamic/target_groups": float(target),
            "selection/dynamic/shortfall": float(target - kept),
            "selection/dynamic/rounds": float(rounds),
            "selection/dynamic/rollouts_generated": float(generated),
        }
        self._totals["rollouts_generated"] += generated
        self._totals["rollouts_refilled"] += generated - target * self.num_generations
        self._totals["rollouts_dropped"] += dropped
        self._totals["shortfall_groups"] += target - kept

    def on_step_end(self, trainer: Any) -> None:
        self.gate.on_step_end()
        self.pool.on_step_end()

    def state_dict(self) -> dict[str, Any]:
        return {
            "gate": self.gate.state_dict(),
            "pool": self.pool.state_dict(),
            "last": dict(self._last),
            "totals": dict(self._totals),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gate.load_state_dict(state["gate"])
        self.pool.load_state_dict(state["pool"])
        self._last = dict(state["last"])
        self._totals = dict(state["totals"])

    def metrics(self) -> dict[str, float]:
        """`selection/dynamic/...`: the last batch's kept / target groups, shortfall, refill rounds and rollouts
        generated; cumulative rollouts generated (original + refills), refilled, and dropped by the gate (generated
        and then discarded) and shortfall groups; plus the gate's group counts and refill rounds (`refills_total`)."""
        out = dict(self._last)
        out.update({f"selection/dynamic/{name}_total": float(value) for name, value in self._totals.items()})
        out.update(self.gate.metrics())
        return out
