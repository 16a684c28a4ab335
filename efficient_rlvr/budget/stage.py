"""V0.5 wired into `EfficientGRPOTrainer`: the prior-fused baseline and the adaptive rollout budget (a batch stage).

`BudgetStage.process(trainer, rows, batch, rewards)` runs after TRL has generated and scored the step's first round
(B_global prompts x G rollouts, G = ``num_generations``):

1. Prior. Every prompt (key: a hash of its prompt text, identical on every process) gets V(x) from the value prior,
   taken BEFORE this step's rewards are seen: by default a `HistoryPrior` (the prompt's past group means, shrunk toward
   the running dataset mean; both as EMAs with ``HISTORY_EMA`` so the prior follows the changing policy). Pluggable:
   ``BudgetStage(trainer, args, value_prior=...)`` or, on a built trainer,
   ``trainer.components["BudgetStage"].set_prior(p)``, where ``p`` is any `budget.prior.ValuePrior` or a callable
   ``fn(keys, prompts) -> [B]`` expected rewards (prompts = the rows' ``prompt`` values; wrapped in `CallablePrior`).
2. Rollout more (``budget_adaptive``; needs ``num_generations == budget_k_init``). Decided on the GLOBAL rewards, so
   every process makes the same plan: `RolloutBudget.next_round` gives each prompt its extra rollouts for the round
   (0 = stop: the estimated MSE drop of one more rollout is <= ``budget_cost``, or k = ``budget_k_max``). The extra
   rollouts of all prompts are generated together by TRL's unmodified
   ``trl.GRPOTrainer._generate_and_score_completions(trainer, extra_rows)``; the global list of extra rows (each prompt
   repeated n_i times) is padded with dummy repeats to m rows per process with m * num_processes a multiple of G, and
   process r takes rows [r m, (r + 1) m). The dummies are generated, then dropped (one process) or kept as inert rows
   with mask and advantage 0 (several processes, so every process holds the same row count: TRL's loss all-gathers
   per-sequence metrics of each micro-batch). At most ``max_rounds`` rounds
   per step (the first included; default ``DEFAULT_MAX_ROUNDS``): the last allowed round gets a prompt's whole
   remaining plan at once (see `RolloutBudget.next_round`), so the paper's one-at-a-time rule is followed with the
   D2 estimate refreshed once per round instead of once per rollout.
3. Advantages. All rollouts of a prompt (first round + extra rounds; NaN = unknown rewards left out) give the
   fused baseline b = w m_k + (1 - w) V (``budget_baseline``; the plain group mean when only ``budget_adaptive`` is
   on) and A_i = (r_i - b) / s with TRL's ``scale_rewards`` (`budget.baseline.fused_advantages`: with "group", a group
   with zero std or k = 1 is scaled by the batch std). Unknown rollouts get A = 0. The prior is then updated with the
   step's groups.

How TRL's shapes stay valid with variable group sizes: each TRL call sees a global row count divisible by G, so its
``rewards.view(-1, G)`` works (its advantages for mixed extra rows are meaningless and are overwritten here); the
batches are concatenated row-wise (prompts left-padded, completion tensors right-padded to common widths: `merge_
batches`), ``num_items_in_batch`` is recounted over all processes (`efficient_rlvr.batch.keep_rows`), and nothing
downstream needs groups: the loss is per row and the trainer splits rows into ``steps_per_generation`` chunks of
unequal size if needed (the same sizes on every process).

Rows the stage adds carry two per-row entries for later stages (HES): ``rollout_rewards`` ``[N]`` (the reward of the
row, NaN = unknown) and ``rollout_groups`` ``[N]`` (the global prompt index), since the trainer's ``rewards`` tensor
only covers the first round. TRL's loss ignores them. The TRL metrics logged by the extra calls (reward, lengths, ...)
are removed again, so ``reward`` etc. describe the first round (all prompts, k_init rollouts each: an unbiased
training-reward curve); ``budget/reward_all`` is the mean over all rollouts trained on.

Metrics (``budget/``): from `RolloutBudget` (mean/min/max k, share stopped at k_init, reached k_max, mean prior weight
1 - w, rollouts vs a fixed-G = k_max run, rounds) and the prior (``budget/prior_*``), plus the step's extra and
padding rollouts, reward over all rollouts, seconds spent in extra rounds and cumulative totals.

After pruning: the first round is the rows the pruning stage kept (each row's ``rollout_rewards`` /
``rollout_groups``), so a pruned group enters the decisions and the fused baseline with its survivors only.

Not supported: vLLM server mode with ``budget_adaptive`` (TRL generates G completions per unique prompt there, so rows
must come in blocks of G) and dynamic sampling before this stage (its refills bring prompts of other batches).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

from ..batch import (
    ROLLOUT_GROUPS,
    ROLLOUT_REWARDS,
    annotate_rows,
    concat_batches,
    gather_row_annotations,
    keep_rows,
    local_row_count,
)
from ..selection.base import prompt_key
from .adaptive import RolloutBudget
from .baseline import fused_advantages, fusion_stats
from .prior import CallablePrior, HistoryPrior, ValuePrior

# Not config fields (EfficientGRPOConfig has none for them): generation rounds per step, first included, and the
# smallest number of rollouts a prompt gets per "rollout more" round.
DEFAULT_MAX_ROUNDS = 3
DEFAULT_STEP = 1
# History prior: EMA weight of the newest group mean (per prompt and for the dataset mean) and pseudo-visits of the
# dataset mean.
HISTORY_EMA = 0.1
HISTORY_SHRINKAGE = 2.0
HISTORY_MAX_PROMPTS = 200_000


def _per_process_rows(total: int, num_processes: int, group_size: int) -> int:
    """Smallest m >= total / num_processes with m * num_processes divisible by group_size (TRL's view(-1, G))."""
    m = math.ceil(total / num_processes)
    while (m * num_processes) % group_size:
        m += 1
    return m


class BudgetStage:
    """V0.5 as a batch stage of `EfficientGRPOTrainer` (see the module docstring).

    Args:
        trainer: the `EfficientGRPOTrainer` (TRL's init done).
        args: its `EfficientGRPOConfig`: reads ``budget_baseline``, ``budget_adaptive``, ``budget_prior``,
            ``budget_k_init``, ``budget_k_max``, ``budget_cost``, ``budget_reward_min/max``.
        value_prior: a `ValuePrior`, a callable ``fn(keys, prompts) -> [B]`` or None (``budget_prior``: history).
        max_rounds: generation rounds per step, the first (TRL's) included, >= 1 (1 = no extra rollouts).
        step: fewest extra rollouts a continuing prompt gets in a round, >= 1.
    """

    def __init__(
        self,
        trainer: Any,
        args: Any,
        value_prior: ValuePrior | Callable[[Sequence[Hashable], Sequence[Any] | None], Any] | None = None,
        max_rounds: int = DEFAULT_MAX_ROUNDS,
        step: int = DEFAULT_STEP,
    ):
        if not (isinstance(max_rounds, int) and max_rounds >= 1):
            raise ValueError(f"max_rounds must be an int >= 1, got {max_rounds!r}.")
        self.num_generations = int(trainer.num_generations)
        self.use_baseline = bool(args.budget_baseline)
        self.adaptive = bool(args.budget_adaptive)
        self.reward_range = (float(args.budget_reward_min), float(args.budget_reward_max))
        if self.adaptive and self.num_generations != args.budget_k_init:
            raise ValueError(
                f"budget_adaptive=True rolls every prompt out budget_k_init times in TRL's first round: set "
                f"num_generations = budget_k_init (got num_generations={self.num_generations}, "
                f"budget_k_init={args.budget_k_init})."
            )
        if getattr(args, "dynamic_sampling", False):
            raise ValueError(
                "budget_baseline / budget_adaptive cannot follow dynamic_sampling=True: the zero-variance gate refills "
                "the batch with other prompts, so V0.5 no longer sees the step's own groups; turn one of them off."
            )
        if self.adaptive and getattr(trainer, "use_vllm", False) and getattr(trainer, "vllm_mode", "") == "server":
            raise ValueError(
                "budget_adaptive=True needs per-row generation (transformers or vllm_mode='colocate'): TRL's vLLM "
                "server mode generates num_generations completions per unique prompt."
            )
        self.max_rounds = max_rounds if self.adaptive else 1
        k_init = int(args.budget_k_init) if self.adaptive else self.num_generations
        k_max = int(args.budget_k_max) if self.adaptive else self.num_generations
        self.budget = RolloutBudget(
            k_init=k_init,
            k_max=k_max,
            cost=float(args.budget_cost),
            step=step,
            reward_range=self.reward_range,
            fixed_group_size=max(k_max, self.num_generations),
        )
        scale = getattr(trainer, "scale_rewards", "group")
        self.scale = {True: "group", False: "none"}.get(scale, scale)
        self.sequence_level_keys: tuple[str, ...] = ()
        if getattr(trainer, "use_vllm", False) and str(
            getattr(trainer, "vllm_importance_sampling_mode", "")
        ).startswith("sequence"):
            self.sequence_level_keys = ("importance_sampling_ratio",)
        if value_prior is None:
            if args.budget_prior != "history":
                raise ValueError(f"budget_prior must be 'history', got {args.budget_prior!r}.")
            value_prior = HistoryPrior(
                shrinkage=HISTORY_SHRINKAGE,
                ema=HISTORY_EMA,
                max_prompts=HISTORY_MAX_PROMPTS,
                default=0.5 * (self.reward_range[0] + self.reward_range[1]),
            )
        self.prior: ValuePrior = self._as_prior(value_prior)
        self.last_step: dict[str, Any] = {}
        self._last: dict[str, float] = {}
        self._totals = {"extra_rollouts": 0, "padding_rollouts": 0, "extra_seconds": 0.0, "steps": 0}

    # --------------------------------------------------------------------------------------------------------------
    def _as_prior(self, prior: Any) -> ValuePrior:
        if isinstance(prior, ValuePrior):
            return prior
        if callable(prior):
            return CallablePrior(prior, clip_range=self.reward_range)
        raise ValueError(
            f"value_prior must be a ValuePrior or a callable fn(keys, prompts) -> [B], got {type(prior).__name__}."
        )

    def set_prior(self, prior: ValuePrior | Callable[[Sequence[Hashable], Sequence[Any] | None], Any]) -> None:
        """Replace the value prior (a `ValuePrior`, or a callable ``fn(keys, prompts) -> [B]`` expected rewards)."""
        self.prior = self._as_prior(prior)

    # --------------------------------------------------------------------------------------------------------------
    def process(
        self, trainer: Any, rows: list[dict[str, Any]], batch: dict[str, Any], rewards: torch.Tensor | None
    ) -> dict[str, Any]:
        """Roll out more where it pays off, then replace the advantages by the fused-baseline ones (module docs)."""
        from accelerate.utils import gather_object
        from trl import GRPOTrainer

        G = self.num_generations
        accelerator = trainer.accelerator
        n_proc, rank = accelerator.num_processes, accelerator.process_index
        n_local = len(rows)
        if n_local % G:
            raise ValueError(f"BudgetStage: {n_local} rows per process is not a multiple of G={G}.")
        local_prompts = [rows[j]["prompt"] for j in range(0, n_local, G)]
        for j in range(n_local):
            if prompt_key(rows[j]["prompt"]) != prompt_key(local_prompts[j // G]):
                raise ValueError("BudgetStage: rows must repeat each prompt G = num_generations times in a row.")
        group_rows = gather_object([rows[j] for j in range(0, n_local, G)])  # one row per prompt, global order
        B = len(group_rows)
        prompts = [r["prompt"] for r in group_rows]
        keys = [prompt_key(p) for p in prompts]
        prior = self.prior.prior(keys, prompts).float().reshape(-1).cpu()  # [B], before this step's rewards
        if prior.numel() != B:
            raise ValueError(f"the value prior returned {prior.numel()} values for {B} prompts.")

        # Every rollout of the step in global order: first round (the rows an earlier stage kept: pruning may have
        # dropped some), then each extra round (dummies included). Group id = prompt index in `group_rows`.
        if ROLLOUT_REWARDS not in batch:  # called outside the trainer: the batch is in generation order
            batch = annotate_rows(batch, trainer.last_rewards() if rewards is None else rewards, rank, G)
        first, first_prompt, counts = gather_row_annotations(batch, accelerator)  # [N_first] each
        check_rewards_in_range(trainer, first if rewards is None else rewards, self.reward_range, G)
        if first_prompt.numel() and int(first_prompt.max()) >= B:
            raise ValueError(
                "BudgetStage: the batch holds groups of prompts outside this generation batch (an earlier stage "
                "refilled it, e.g. dynamic sampling); V0.5 needs the step's own prompts."
            )
        all_rewards = [first]  # [N_first], then [m * n_proc] per round
        all_prompt = [first_prompt]
        all_dummy = [torch.zeros(first.numel(), dtype=torch.bool)]
        local_ids = [torch.arange(sum(counts[:rank]), sum(counts[: rank + 1]))]
        offset = first.numel()
        per_prompt = [first[first_prompt == i] for i in range(B)]  # rewards so far, for the decisions
        pieces = [{k: v for k, v in batch.items() if k not in (ROLLOUT_REWARDS, ROLLOUT_GROUPS)}]  # set at the end
        rounds, extra, padding = 1, 0, 0
        start = time.perf_counter()
        while rounds < self.max_rounds:
            known = [r[torch.isfinite(r)] for r in per_prompt]
            n = self.budget.next_round(known, prior, rounds_left=self.max_rounds - rounds)  # [B]
            if int(n.sum()) == 0:
                break
            wanted = torch.arange(B).repeat_interleave(n)  # [M] prompt of each extra rollout
            m = _per_process_rows(wanted.numel(), n_proc, G)
            dummies = m * n_proc - wanted.numel()
            plan = torch.cat([wanted, wanted[-1:].expand(dummies)])  # [m * n_proc]
            mine = plan[rank * m : (rank + 1) * m].tolist()
            extra_rows = [dict(group_rows[i]) for i in mine]
            snapshot = _metric_snapshot(trainer)
            pieces.append(GRPOTrainer._generate_and_score_completions(trainer, extra_rows))
            got = trainer.last_rewards().detach().float().cpu().reshape(-1)  # [m * n_proc]
            real_got = got.clone()
            real_got[wanted.numel() :] = float("nan")  # dummies: dropped, never mapped
            check_rewards_in_range(trainer, real_got, self.reward_range, G, extra_round=rounds, plan=plan)
            _restore_metrics(trainer, snapshot)
            if got.numel() != plan.numel():
                raise RuntimeError(
                    f"BudgetStage: extra round returned {got.numel()} rewards, expected {plan.numel()}."
                )
            dummy = torch.zeros(plan.numel(), dtype=torch.bool)
            dummy[wanted.numel() :] = True
            for i in range(B):
                per_prompt[i] = torch.cat([per_prompt[i], got[: wanted.numel()][wanted == i]])
            all_rewards.append(got)
            all_prompt.append(plan)
            all_dummy.append(dummy)
            local_ids.append(torch.arange(offset + rank * m, offset + (rank + 1) * m))
            offset += plan.numel()
            rounds += 1
            extra += wanted.numel()
            padding += dummies
        extra_seconds = time.perf_counter() - start
        rewards_all = torch.cat(all_rewards)  # [N_all]
        prompt_all = torch.cat(all_prompt)
        dummy_all = torch.cat(all_dummy)
        ids = torch.cat(local_ids)  # [n_local_merged] global rollout id of every local row

        # Fused baseline over each prompt's known rollouts; advantages in the trainer's scaling.
        valid = torch.isfinite(rewards_all) & ~dummy_all
        groups = [torch.nonzero(valid & (prompt_all == i)).flatten() for i in range(B)]
        group_rewards = [rewards_all[g] for g in groups]
        if self.use_baseline:
            stats = fusion_stats(group_rewards, prior, self.reward_range)
            baseline = stats.baseline
        else:  # rollout more only: plain mean over the (variable-size) group
            baseline = torch.stack([r.mean() if r.numel() else torch.tensor(float("nan")) for r in group_rewards])
        advantages = fused_advantages(group_rewards, baseline, scale=self.scale)
        adv_all = torch.zeros_like(rewards_all)
        for g, a in zip(groups, advantages, strict=True):
            adv_all[g] = a
        budget_stats = self.budget.observe(group_rewards, prior, rounds=rounds)
        self.prior.observe(keys, group_rewards)

        out = batch
        if len(pieces) > 1:
            tokenizer = getattr(trainer, "_tokenizer", None) or trainer.processing_class
            merged = concat_batches(pieces, tokenizer.pad_token_id or 0, self.sequence_level_keys)
            real = ~dummy_all[ids]
            # One process: drop the dummies. Several: keep them as inert rows (mask and advantage 0) so every
            # process holds the same row count (TRL's loss all-gathers per-sequence metrics of each micro-batch).
            min_rows = trainer.args.steps_per_generation if n_proc == 1 else ids.numel()
            out = keep_rows(merged, real, accelerator, min_rows=min_rows)
            ids = torch.cat([ids[real], ids[~real]])[: local_row_count(out)]
        device = out["advantages"].device
        out["advantages"] = adv_all[ids].to(device=device, dtype=out["advantages"].dtype)
        rewards_all = rewards_all.masked_fill(dummy_all, float("nan"))  # inert padding: no reward for later stages
        out[ROLLOUT_REWARDS] = rewards_all[ids].to(device)
        out[ROLLOUT_GROUPS] = prompt_all[ids].to(device)

        self.last_step = {
            "keys": keys,
            "prior": prior,
            "rewards": group_rewards,
            "counts": torch.tensor([r.numel() for r in group_rewards]),
            "baseline": baseline,
            "weight": budget_stats.weight if self.use_baseline else torch.ones(B),
            "rounds": rounds,
        }
        finite = rewards_all[valid]
        self._last = {
            "budget/extra_rollouts": float(extra),
            "budget/padding_rollouts": float(padding),
            "budget/extra_seconds": extra_seconds,
            "budget/reward_all": float(finite.mean()) if finite.numel() else float("nan"),
        }
        self._totals["extra_rollouts"] += extra
        self._totals["padding_rollouts"] += padding
        self._totals["extra_seconds"] += extra_seconds
        self._totals["steps"] += 1
        return out

    # --------------------------------------------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """``budget/``: the budget's and the prior's metrics, this step's extra work, cumulative totals."""
        out = self.budget.metrics()
        if not self.use_baseline:
            out.pop("budget/prior_weight", None)
        out.update(self.prior.metrics())
        out.update(self._last)
        out.update({f"budget/total_{k}": float(v) for k, v in self._totals.items() if k != "steps"})
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "prior_class": type(self.prior).__name__,
            "prior": self.prior.state_dict(),
            "budget": self.budget.state_dict(),
            "last": dict(self._last),
            "totals": dict(self._totals),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["prior_class"] != type(self.prior).__name__:
            raise ValueError(
                f"BudgetStage state was saved with a {state['prior_class']} prior; this stage has a "
                f"{type(self.prior).__name__} (set the same prior before resuming)."
            )
        self.prior.load_state_dict(state["prior"])
        self.budget.load_state_dict(state["budget"])
        self._last = dict(state["last"])
        self._totals = dict(state["totals"])


def _number(x: float) -> str:
    return repr(round(float(x), 6))


def check_rewards_in_range(
    trainer: Any,
    totals: torch.Tensor,
    reward_range: tuple[float, float],
    group_size: int,
    extra_round: int | None = None,
    plan: torch.Tensor | None = None,
) -> None:
    """Refuse known rewards outside `reward_range`: V0.5 maps ``[budget_reward_min, budget_reward_max]`` to [-1, 1]
    (baseline fusion and the rollout-more gain assume that bound), so a reward outside would silently break it.

    Args:
        trainer: the trainer; its ``reward_func_names``, ``reward_weights`` and ``_last_rewards_per_func``
            (``[N, F]``, the same rows as `totals`) name the functions and their values in the error.
        totals: ``[N]`` total rewards of one generation call, all processes (NaN = unknown: left out).
        reward_range: ``(lo, hi)``; a value more than 1e-6 x (hi - lo) outside raises.
        group_size: rollouts per prompt of the first round (the prompt of a first-round row is row // G).
        extra_round: the "rollout more" round (1 = the first extra one) `totals` comes from; None = TRL's first round.
        plan: prompt index of every row of an extra round.

    Raises:
        ValueError: naming the reward function(s), the value and the row; the same on every process (the rewards
            are gathered).
    """
    lo, hi = reward_range
    values = totals.detach().float().cpu().reshape(-1)  # [N]
    slack = 1e-6 * (hi - lo)
    outside = torch.isfinite(values) & ((values < lo - slack) | (values > hi + slack))
    if not bool(outside.any()):
        return
    row = int(torch.nonzero(outside)[0])
    value = float(values[row])
    names = [str(n) for n in getattr(trainer, "reward_func_names", [])]
    per_func = getattr(trainer, "_last_rewards_per_func", None)
    weights = getattr(trainer, "reward_weights", None)
    if per_func is not None and weights is not None and tuple(per_func.shape) == (values.numel(), len(names)):
        own = per_func[row].detach().float().cpu().tolist()
        w = [float(x) for x in weights.detach().float().cpu().tolist()]
        if len(names) == 1 and w[0] == 1.0:
            what = f"reward function {names[0]!r} gave {_number(value)}"
        else:
            terms = " + ".join(
                f"{name!r} ({_number(r)} x weight {_number(wi)})"
                for name, r, wi in zip(names, own, w, strict=True)
                if r == r  # a function that returned None for the row adds nothing
            )
            what = f"the weighted sum {_number(value)} of reward functions {terms}"
    elif len(names) == 1:
        what = f"reward function {names[0]!r} gave {_number(value)}"
    else:
        what = f"the weighted sum {_number(value)} of reward functions {names}"
    if extra_round is None:
        where = f"on completion row {row} of the generation batch (prompt {row // max(int(group_size), 1)})"
    else:
        prompt = int(plan[row]) if plan is not None else "?"
        where = f"on rollout {row} of 'rollout more' round {extra_round} (prompt {prompt} of the generation batch)"
    raise ValueError(
        f"{what} {where}, outside [budget_reward_min={lo!r}, budget_reward_max={hi!r}] ({int(outside.sum())} of "
        f"{int(torch.isfinite(values).sum())} known rewards are outside). V0.5 maps that range to [-1, 1]: set "
        "budget_reward_min / budget_reward_max to the range of the total (weighted) reward."
    )


def _metric_snapshot(trainer: Any) -> dict[str, tuple[int, int]]:
    return {k: (id(v), len(v)) for k, v in trainer._metrics["train"].items()}


def _restore_metrics(trainer: Any, snapshot: dict[str, tuple[int, int]]) -> None:
    """Undo the train metrics TRL appended during an extra round (replaced lists, e.g. ``num_tokens``, are kept)."""
    metrics = trainer._metrics["train"]
    for key in list(metrics):
        if key not in snapshot:
            del metrics[key]
        elif id(metrics[key]) == snapshot[key][0]:
            del metrics[key][snapshot[key][1] :]
