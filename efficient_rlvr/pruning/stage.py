"""ARRoL online rollout pruning wired into `EfficientGRPOTrainer` (SPEC section 2; arXiv 2603.24840).

`PruningStage` is the trainer's rollout generator (`generate`, replacing TRL 1.16 `_generate_single_turn` in training
mode) and its first batch stage (`process`). One step:

1. Generation (`generate`). The weights are synced exactly as TRL does (when ``state.global_step`` differs from
   ``_last_loaded_step``), then this process's rows (TRL order: each prompt ``num_generations`` times in a row) run
   through `StepwiseRolloutEngine` on ``trainer.vllm_generation.llm`` with TRL's colocate SamplingParams
   (`sampling_params_from_trl`) and an `OnlinePruningCallback`: when a rollout first has ``pruning_l_detect``
   generated tokens, the quality head scores the final-norm hidden state from which that token was sampled; once
   its group's running rollouts all got there (normally the same engine step), the calibrator turns the scores into
   survival probabilities, by default the group-relative rule ``p_i = clip(kappa + delta + lambda sign(q_bar_g -
   rho) (q_bar_g - q_i), p_min, p_max)`` (``pruning_survival_rule``; ``q_bar_g`` the group's mean posterior, its
   finished rollouts scored at their last token; ``delta`` makes the mean ``p`` of the rollouts decided in that
   step ``kappa``), and each rollout is aborted inside vLLM with probability ``1 - p``: it stops with ``L_detect``
   tokens (a few more if its group waited for a lagging member) and the scheduler gives its slot to the others.
   The decision timing under preemption is in `efficient_rlvr.pruning.callback`. Rollouts that finish at or before
   ``L_detect`` are never pruned; a group keeps at least ``pruning_min_survivors`` rollouts. Returns TRL's
   ``(completion_ids, logprobs)`` (top-1 sampled-token logprobs, as TRL keeps ``lp[0]``). ``pruning_mode="random"``
   keeps every decided rollout with probability ``kappa`` instead (the paper's random-pruning baseline; the head
   still learns). ``pruning_scorer="confidence"`` scores by DeepConf's trace confidence of the sampled tokens (from
   the log-probs vLLM returns; `efficient_rlvr.pruning.confidence`) instead of the head: no hidden states are
   captured, the head is not trained, and the recorded "states" below are the ``[2]`` confidence features.
2. Old log-probs. TRL computes them in `_generate_and_score_completions` before any batch stage runs. After a
   generation with pruned rows, `generate` installs `efficient_rlvr.logprobs.PartialLogprobPass`: the no-grad pass
   over exactly this generation's rows runs the model on the surviving rows only; the pruned rows get their vLLM
   sampling log-probs as "old" log-probs (importance ratio exactly 1). The wrapper is removed in `process` (or at the
   next `generate`), so the loss never sees it. The filled values only reach rows that `process` drops before the
   loss; TRL's logged IS metrics include the pruned tokens with a difference of 0 unless
   ``mask_truncated_completions`` already masks them (pruned rows have no EOS).
3. Batch stage (`process`). The pruned flags of all processes are gathered; the pruned entries of the shared
   ``rewards`` tensor (and of the trainer's per-function rewards) are set to NaN in place; the advantages of the
   global batch are recomputed over the survivors with TRL's ``scale_rewards`` / ``multi_objective_aggregation``
   semantics (`survivor_advantages`: a pruned rollout counts as unscorable, a group left with one known rollout gets
   advantage 0); this process's slice replaces ``advantages`` and the pruned rows are dropped with
   `efficient_rlvr.batch.keep_rows` (``num_items_in_batch`` recounted globally; `keep_rows` gives every process the
   same row count, topped up with inert rows, because TRL's loss all-gathers per-sequence metrics). The kept rows
   carry ``rollout_rewards`` / ``rollout_groups`` (as V0.5's stage does) so that HES can still find its groups.
   TRL's own logged ``reward``, ``reward_std``, ``frac_reward_zero_std``, ``rewards/*`` and ``completions/*`` are
   computed before this stage over every rollout (a pruned one, cut at L_detect, scored 0 and counted as clipped);
   this stage replaces them with the same statistics over the unpruned rollouts (`describe_scored_rollouts`), so
   logs, trackers and plots describe the rollouts that were scored; pruned ones are counted under ``pruning/``.
4. Learning (`on_step_end`, after every optimizer step). The finished rollouts' detect-position and last-token hidden
   states (recorded during generation, no extra forward) and rewards are gathered from every process in `process`;
   after the optimizer step the head takes one BCE/Adam step on them (labels ``reward > pruning_correct_threshold``),
   the out-of-sample ``L_detect`` scores (before the update) and labels of those that reached ``L_detect`` enter the
   calibrator's buffer (rollouts that finished before it are never pruned and would distort ``q``), and the
   calibrator is refitted. Steps without a generation (``num_iterations > 1``) only refit. Cold start: for the first
   ``pruning_cold_start_steps`` optimizer steps the calibrator is not ready and nothing is pruned, while the head and
   the buffer learn.

Multi-process (each process prunes its own rows with its own engine): group ids are global (row ``r * N_local + i``
belongs to group ``(r * N_local + i) // G``); a group split across processes keeps at least ``pruning_min_survivors``
rollouts in each part. The head starts from the same seed (``args.seed``) and is trained on the same gathered data in
the same order on every process, so the heads and calibrators are identical; with several processes the head weights
are also broadcast from process 0 after each update, so floating-point drift cannot split them. The decision RNG is
reseeded before each generation from ``(args.seed, process_index, generation counter)``: decisions differ between
processes (different rollouts) but are reproducible, and the checkpoint written by process 0 (counter identical on
all processes) restores every process's RNG.

Checkpoints (`state_dict`): head weights and its Adam state, the calibrator's buffer and table, the callback's RNG
and counters, the generation counter, learning data not yet consumed, cumulative totals.

Metrics (``pruning/``): global pruned fraction, kept rows, mean reward of the kept rollouts, kept positive ratio
``rho_hat`` and ``rho_hat (1 - rho_hat)`` per group over the survivors' known rewards (``pruning/rho_hat``,
``pruning/rho_hat_var``; all groups, and groups with a pruned rollout), tokens generated and tokens not generated
(estimate: a pruned rollout would have run as long as its group's kept rollouts that passed L_detect; cumulative),
rollouts pruned and log-prob rows skipped (cumulative), head loss / accuracy / AUC on the step's finished rollouts
(before the update), delta, prior, mean survival probability, ``pruning/realised_keep_rate`` (survivors over decided
rollouts after the cold start, global, cumulative over the run; ``pruning/realised_keep_rate_step`` for the last
batch), hook and callback seconds, head seconds.

Not supported (refused at construction): vision inputs, tools / ``rollout_func``, vLLM sleep mode, tensor parallelism,
a vLLM engine in another process (hidden states need ``VLLM_ENABLE_V1_MULTIPROCESSING=0``). Generations requested
again within an already processed generation batch (dynamic-sampling refill, V0.5 "rollout more") run unpruned
through TRL's own path: their rows never pass through `process`. Batch stages that need the batch in generation
order (dynamic sampling, V0.5) cannot follow this stage, since it drops rows.

Deviations / choices where the paper is silent (constants below): the survival rule is SPEC's group-relative
correction of the appendix formula (in which ``rho`` cancels; ``pruning_survival_rule="literal"`` keeps it for
comparison); ``delta`` is solved over the rollouts decided in one engine step rather than over the buffer (which
holds survivors only); head width 128 and one Adam step per optimizer step on the step's finished rollouts; Laplace
alpha 1; one shared FIFO buffer of ``pruning_buffer_size`` labelled ``L_detect`` scores (the prior is its positive
fraction); the head scores the state that produced token L_detect (the engine's position convention, also used for
training). A group split across processes is decided per part, ``q_bar`` over the part's rollouts.
"""

from __future__ import annotations

import math
import time
import warnings
from collections import deque
from typing import Any

import torch

from ..batch import ROLLOUT_GROUPS, ROLLOUT_REWARDS, keep_rows, local_row_count, zero_variance_share
from ..logprobs import PartialLogprobPass, partial_pass_allowed
from .calibration import BinnedCalibrator
from .callback import OnlinePruningCallback
from .engine import RolloutResult, StepwiseRolloutEngine, in_process_model_runner, sampling_params_from_trl
from .gate import HeadGate
from .head import QualityHead, QualityHeadTrainer

__all__ = ["PruningStage", "quality_head_from_state", "survivor_advantages"]

# Not config fields (EfficientGRPOConfig has none): the head's hidden width (paper: 128), Adam steps of the head per
# optimizer step, and the Laplace smoothing of the calibration histograms (paper: 1).
HEAD_INNER_SIZE = 128
HEAD_UPDATES_PER_STEP = 1
CALIBRATION_ALPHA = 1.0
# Diagnostics kept in memory (not checkpointed): the last generations' decisions and the head's out-of-sample scores.
HISTORY_LENGTH = 64
# The gate's smoothing: mixed groups of the last GATE_WINDOW steps, at least GATE_MIN_GROUPS of them (gate.py).
GATE_WINDOW = 10
GATE_MIN_GROUPS = 8


def survivor_advantages(
    rewards_per_func: torch.Tensor,
    reward_weights: torch.Tensor,
    keep: torch.Tensor,
    num_generations: int,
    scale_rewards: str = "group",
    aggregation: str = "sum_then_normalize",
) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL 1.16's GRPO advantages of a global batch, with the rollouts where ``keep`` is False left out.

    A dropped rollout is treated exactly like TRL treats an unscorable one (every reward function returned None): it
    is left out of the group mean and std and gets advantage 0. A group left with one known rollout gets advantage 0.

    Args:
        rewards_per_func: ``[N, F]`` rewards per reward function (NaN = that function returned None), groups of
            ``num_generations`` consecutive rows.
        reward_weights: ``[F]`` weights of the reward functions.
        keep: ``[N]`` bool, False = pruned.
        num_generations: group size G.
        scale_rewards: TRL's ``scale_rewards``: "group", "batch" or "none".
        aggregation: TRL's ``multi_objective_aggregation``: "sum_then_normalize" or "normalize_then_sum".

    Returns:
        ``(rewards [N], advantages [N])`` float32 on the input's device; rewards are the weighted sums, NaN where
        dropped or unscorable.
    """
    from trl.trainer.utils import nanstd

    if rewards_per_func.dim() != 2 or rewards_per_func.shape[0] % num_generations:
        raise ValueError(
            f"rewards_per_func must be [N, F] with N a multiple of num_generations={num_generations}, "
            f"got {tuple(rewards_per_func.shape)}"
        )
    per_func = rewards_per_func.detach().to(torch.float32).clone()  # [N, F]
    keep = keep.to(device=per_func.device, dtype=torch.bool).reshape(-1)  # [N]
    if keep.numel() != per_func.shape[0]:
        raise ValueError(f"keep must have {per_func.shape[0]} entries, got {keep.numel()}")
    per_func[~keep] = torch.nan
    unscorable = torch.isnan(per_func).all(dim=1)  # [N]
    weights = reward_weights.to(per_func).unsqueeze(0)  # [1, F]
    G = num_generations
    rewards = (per_func * weights).nansum(dim=1)  # [N]
    rewards[unscorable] = torch.nan
    if aggregation == "sum_then_normalize":
        grouped = rewards.view(-1, G)  # [B, G]
        mean = torch.nanmean(grouped, dim=1).repeat_interleave(G)  # [N]
        if scale_rewards in ("group", "none"):
            std = nanstd(grouped, dim=1).repeat_interleave(G) if G > 1 else torch.zeros_like(rewards)
        elif scale_rewards == "batch":
            std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
        else:
            raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")
        advantages = rewards - mean
        if scale_rewards != "none":
            advantages = advantages / (std + 1e-4)
    elif aggregation == "normalize_then_sum":
        grouped = per_func.view(-1, G, per_func.shape[1])  # [B, G, F]
        mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
        std_k = nanstd(grouped, dim=1, keepdim=True) if G > 1 else torch.zeros_like(mean_k)
        reward_k = ((grouped - mean_k) / (std_k + 1e-4)).view(-1, per_func.shape[1])  # [N, F]
        normalized = (reward_k * weights).nansum(dim=1)  # [N]
        normalized[unscorable] = torch.nan
        std = nanstd(normalized).expand_as(normalized) if normalized.numel() > 1 else torch.zeros_like(normalized)
        advantages = (normalized - torch.nanmean(normalized)) / (std + 1e-4)
    else:
        raise ValueError(
            f"multi_objective_aggregation must be 'sum_then_normalize' or 'normalize_then_sum', got {aggregation!r}"
        )
    advantages = torch.nan_to_num(advantages, nan=0.0)
    known_per_group = (~torch.isnan(rewards)).view(-1, G).sum(dim=1).repeat_interleave(G)  # [N]
    advantages = advantages.masked_fill(known_per_group <= 1, 0.0)
    return rewards, advantages


def describe_scored_rollouts(
    trainer: Any,
    rewards: torch.Tensor,
    per_func: torch.Tensor,
    pruned: torch.Tensor,
    lengths: torch.Tensor,
    truncated: torch.Tensor,
) -> None:
    """Make TRL's logged rollout metrics of this generation describe the scored (unpruned) rollouts only.

    TRL 1.16 appends ``reward``, ``reward_std``, ``frac_reward_zero_std``, ``rewards/<func>/{mean,std}`` and
    ``completions/*`` for the generation batch before any batch stage runs, counting a pruned rollout (cut at
    L_detect, usually without an answer) as scored and as truncated. Their last entries are replaced by the same
    statistics over the unpruned rollouts; the pruned ones are counted under ``pruning/``.

    Args:
        trainer: the trainer whose ``_metrics["train"]`` holds this generation's entries last.
        rewards: ``[N_global]`` total rewards, NaN where pruned or unscorable.
        per_func: ``[N_global, F]`` rewards per function, NaN where pruned (or ``rewards`` as ``[N, 1]``).
        pruned: ``[N_global]`` bool.
        lengths: ``[N_global]`` completion lengths in tokens.
        truncated: ``[N_global]`` bool, True where the completion has no EOS (as TRL counts ``clipped_ratio``).
    """
    from trl.trainer.utils import nanstd

    metrics = trainer._metrics["train"]

    def replace(key: str, value: float) -> None:
        if metrics.get(key):
            metrics[key][-1] = value

    rewards = rewards.detach().float().cpu()
    replace("reward", float(torch.nanmean(rewards)))
    replace("reward_std", float(nanstd(rewards)))
    replace("frac_reward_zero_std", zero_variance_share(rewards, trainer.num_generations))
    per_func = per_func.detach().float().cpu().reshape(rewards.numel(), -1)  # [N, F]
    for i, name in enumerate(getattr(trainer, "reward_func_names", [])[: per_func.shape[1]]):
        replace(f"rewards/{name}/mean", float(torch.nanmean(per_func[:, i])))
        replace(f"rewards/{name}/std", float(nanstd(per_func[:, i])))
    kept = ~pruned.cpu()
    kept_lengths, kept_truncated = lengths.cpu()[kept].float(), truncated.cpu()[kept]
    if kept_lengths.numel() == 0:
        return
    replace("completions/mean_length", float(kept_lengths.mean()))
    replace("completions/min_length", float(kept_lengths.min()))
    replace("completions/max_length", float(kept_lengths.max()))
    replace("completions/clipped_ratio", float(kept_truncated.float().mean()))
    terminated = kept_lengths[~kept_truncated]
    terminated = terminated if terminated.numel() else torch.zeros(1)  # TRL's convention for none terminated
    replace("completions/mean_terminated_length", float(terminated.mean()))
    replace("completions/min_terminated_length", float(terminated.min()))
    replace("completions/max_terminated_length", float(terminated.max()))


def quality_head_from_state(state: dict[str, Any] | str, device: str | torch.device = "cpu") -> QualityHead:
    """The trained :class:`QualityHead` from a `PruningStage` state, or from a checkpoint folder / state file.

    Accepts ``PruningStage.state_dict()``, the trainer's ``efficient_rlvr_state.pt`` (or the checkpoint folder that
    holds it), whose ``"PruningStage"`` entry is that state.
    """
    if isinstance(state, str):
        import os

        path = os.path.join(state, "efficient_rlvr_state.pt") if os.path.isdir(state) else state
        state = torch.load(path, weights_only=False, map_location="cpu")
    if "PruningStage" in state:
        state = state["PruningStage"]
    weights = state["callback"]["head"]["head"]
    first, last = weights["net.0.weight"], weights["net.2.weight"]  # [inner, H], [1, inner]
    head = QualityHead(int(first.shape[1]), int(last.shape[1]))
    head.load_state_dict(weights)
    return head.to(device).eval()


class PruningStage:
    """ARRoL online rollout pruning as the trainer's rollout generator and first batch stage (module docstring).

    Args:
        trainer: the `EfficientGRPOTrainer` (TRL's init done; vLLM colocate engine built).
        args: its `EfficientGRPOConfig`: reads the ``pruning_*`` fields, ``seed``, ``max_completion_length`` and the
            vLLM settings.
    """

    def __init__(self, trainer: Any, args: Any):
        kappa, p_min, p_max = float(args.pruning_keep_rate), float(args.pruning_p_min), float(args.pruning_p_max)
        if not p_min <= kappa <= p_max:
            raise ValueError(
                f"pruning_keep_rate must be in [pruning_p_min, pruning_p_max] = [{p_min}, {p_max}], got {kappa}: "
                "survival probabilities are clipped to that range, so their mean cannot reach the keep rate."
            )
        if not (args.use_vllm and args.vllm_mode == "colocate"):
            raise ValueError(
                f"pruning needs use_vllm=True and vllm_mode='colocate' (got use_vllm={args.use_vllm}, "
                f"vllm_mode={args.vllm_mode!r})."
            )
        if getattr(args, "vllm_enable_sleep_mode", False):
            raise ValueError("pruning drives the vLLM engine step by step: it needs vllm_enable_sleep_mode=False.")
        if int(getattr(args, "vllm_tensor_parallel_size", 1)) != 1:
            raise ValueError(
                f"pruning needs vllm_tensor_parallel_size=1, got {args.vllm_tensor_parallel_size} (each process "
                "drives its own engine and aborts its own requests)."
            )
        if getattr(trainer, "rollout_func", None) is not None or getattr(trainer, "tools", None):
            raise ValueError(
                "pruning replaces TRL's single-turn generation: it cannot run with tools or rollout_func."
            )
        llm = trainer.vllm_generation.llm
        try:
            in_process_model_runner(llm)
        except RuntimeError as error:
            raise ValueError(
                "pruning reads hidden states from the colocated vLLM model: set VLLM_ENABLE_V1_MULTIPROCESSING=0 "
                "before the trainer builds its engine."
            ) from error
        self.engine = StepwiseRolloutEngine(llm)
        if args.pruning_l_detect >= args.max_completion_length:
            warnings.warn(
                f"pruning_l_detect={args.pruning_l_detect} >= max_completion_length={args.max_completion_length}: "
                "no rollout can be pruned.",
                stacklevel=2,
            )

        model = trainer.accelerator.unwrap_model(trainer.model)
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.seed = int(args.seed)
        self.num_generations = int(trainer.num_generations)
        self.l_detect = int(args.pruning_l_detect)
        self.correct_threshold = float(args.pruning_correct_threshold)
        self.head = QualityHead(int(config.hidden_size), HEAD_INNER_SIZE, seed=self.seed).to(
            trainer.accelerator.device
        )
        self.head_trainer = QualityHeadTrainer(
            self.head,
            lr=float(args.pruning_head_lr),
            reward_threshold=self.correct_threshold,
            updates_per_step=HEAD_UPDATES_PER_STEP,
        )
        self.calibrator = BinnedCalibrator(
            num_bins=int(args.pruning_num_bins),
            alpha=CALIBRATION_ALPHA,
            buffer_size=int(args.pruning_buffer_size),
            kappa=kappa,
            lam=float(args.pruning_lambda),
            rho=float(args.pruning_rho),
            p_min=p_min,
            p_max=p_max,
            cold_start_steps=int(args.pruning_cold_start_steps),
            survival_rule=str(args.pruning_survival_rule),
        )
        self.callback = OnlinePruningCallback(
            self.head_trainer,
            self.calibrator,
            l_detect=self.l_detect,
            min_survivors_per_group=int(args.pruning_min_survivors),
            rng=self.seed,
            reward_threshold=self.correct_threshold,
            mode=args.pruning_mode,
            scorer=args.pruning_scorer,
            gate=HeadGate(float(args.pruning_gate_min_auc), window=GATE_WINDOW, min_groups=GATE_MIN_GROUPS),
        )
        self.generation_calls = 0
        self.last_result: RolloutResult | None = None
        self._pending_key: tuple[int, int] | None = None
        self._processed_key: tuple[int, int] | None = None
        # per generation: (detect states, last states, rewards, reached L_detect, global group ids)
        self._learning: list[tuple[torch.Tensor, ...]] = []
        self._logprob_pass: PartialLogprobPass | None = None
        self._step_metrics: dict[str, float] = {}
        self._head_metrics: dict[str, float] = {}
        self._totals = {
            "rollouts": 0,
            "rollouts_pruned": 0,
            "tokens_generated": 0.0,
            "tokens_not_generated": 0.0,
            "logprob_rows_skipped": 0,
            "unpruned_extra_generations": 0,
            "decided": 0,
            "decided_kept": 0,
        }
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY_LENGTH)
        self.head_history: deque[dict[str, Any]] = deque(maxlen=HISTORY_LENGTH)

    # ------------------------------------------------------------------------------------------------------------
    # Generation
    def _decision_seed(self, process_index: int) -> int:
        return ((self.seed * 1_000_003 + process_index) * 1_000_033 + self.generation_calls) % (2**63 - 1)

    def rollout(self, trainer: Any, prompt_ids: list[list[int]], num_generations: int) -> RolloutResult:
        """Sync weights as TRL does, then generate this process's rows with online pruning; returns the full result.

        Rows are TRL's (each prompt ``num_generations`` times in a row); group ids are global over processes.
        """
        from trl.extras.profiling import profiling_context

        if trainer.state.global_step != trainer._last_loaded_step:
            with profiling_context(trainer, "sync_weights"):
                trainer.vllm_generation.sync_weights()
            trainer._last_loaded_step = trainer.state.global_step
        n = len(prompt_ids)
        rank = trainer.accelerator.process_index
        group_ids = [(rank * n + i) // num_generations for i in range(n)]
        self.callback.rng.manual_seed(self._decision_seed(rank))
        self.generation_calls += 1
        params = sampling_params_from_trl(trainer.vllm_generation)
        with profiling_context(trainer, "vLLM.generate"):
            result = self.engine.generate(prompt_ids, params, callbacks=[self.callback], group_ids=group_ids)
        self.last_result = result
        return result

    def generate(
        self,
        trainer: Any,
        prompt_ids: list[list[int]],
        images: Any,
        multimodal_fields: dict[str, Any] | None,
        num_generations: int,
    ) -> tuple[list[list[int]], list[list[float]] | None]:
        """TRL's `_generate_single_turn` in training mode, with online pruning: ``(completion_ids, logprobs)``."""
        if (images is not None and any(images)) or multimodal_fields:
            raise ValueError("pruning supports text-only prompts (no images or multimodal fields).")
        key = (int(trainer.state.global_step), int(trainer._step))
        if key == self._processed_key:
            # An extra generation inside an already processed batch (refill / rollout more): TRL's path, unpruned.
            from trl import GRPOTrainer

            self._totals["unpruned_extra_generations"] += 1
            return GRPOTrainer._generate_single_turn(trainer, prompt_ids, images, multimodal_fields, num_generations)
        self._release_logprob_pass()
        result = self.rollout(trainer, prompt_ids, num_generations)
        self._pending_key = key
        logprobs = None if result.logprobs is None else [[lp[0] for lp in seq] for seq in result.logprobs]
        if any(result.aborted) and partial_pass_allowed(trainer):
            fill = logprobs or [[0.0] * len(c) for c in result.completion_ids]
            fill = [[math.nan if x is None else float(x) for x in row] for row in fill]
            self._logprob_pass = PartialLogprobPass(trainer, result.completion_ids, fill, result.aborted)
        return [list(c) for c in result.completion_ids], logprobs

    def _release_logprob_pass(self) -> None:
        if self._logprob_pass is not None:
            self._logprob_pass.remove()
            # its own rows only: the zero-advantage skip may have added rows to the same pass (cost/skip.py)
            skipped = sum(self.last_result.aborted) if self._logprob_pass.calls and self.last_result else 0
            self._totals["logprob_rows_skipped"] += skipped
            self._step_metrics["pruning/logprob_rows_skipped"] = float(skipped)
            self._logprob_pass = None

    # ------------------------------------------------------------------------------------------------------------
    # Batch stage
    def process(
        self, trainer: Any, rows: list[dict[str, Any]], batch: dict[str, Any], rewards: torch.Tensor | None
    ) -> dict[str, Any]:
        """Invalidate pruned rollouts, recompute advantages over survivors, drop the pruned rows (module docstring)."""
        self._step_metrics = {"pruning/logprob_rows_skipped": 0.0}
        self._release_logprob_pass()
        result = self.last_result
        n = local_row_count(batch)
        if result is None or self._pending_key is None or len(result.request_ids) != n or n != len(rows):
            raise RuntimeError(
                "PruningStage.process needs the rollouts its generate() produced for this batch, in generation order: "
                "it must be the first batch stage and the batch must come from TRL's single-turn generation."
            )
        accelerator = trainer.accelerator
        device = batch["completion_ids"].device
        rank, G = accelerator.process_index, self.num_generations
        generation = self.callback.metrics()
        lengths = [len(c) for c in result.completion_ids]
        pruned_local = torch.tensor(result.aborted, dtype=torch.bool)  # [n]
        decided = [d for d in self.callback.decisions if not d.cold_start]
        stats = torch.tensor(
            [
                float((~pruned_local).sum()),
                float(generation.get("pruning/tokens_not_generated_estimate", 0.0)),
                float(sum(lengths)),
                float(self._step_metrics["pruning/logprob_rows_skipped"]),
                float(len(decided)),
                float(sum(not d.pruned for d in decided)),
            ],
            dtype=torch.float64,
        )
        eos_and_pad = {*trainer.eos_token_ids, trainer._tokenizer.pad_token_id}
        truncated_local = torch.tensor([not c or c[-1] not in eos_and_pad for c in result.completion_ids])  # [n]
        rows_local = torch.stack([pruned_local, torch.tensor(lengths), truncated_local]).to(torch.float64)  # [3, n]
        width = 3 * n + stats.numel()
        local = torch.cat([rows_local.reshape(-1), stats]).to(device)  # [3n + 6]
        gathered = accelerator.gather(local).cpu().view(-1, width)  # [P, 3n + 6]
        per_row = gathered[:, : 3 * n].view(-1, 3, n).transpose(0, 1).reshape(3, -1)  # [3, N_global]
        pruned, lengths_global, truncated = per_row[0].bool(), per_row[1], per_row[2].bool()
        kept_counts, saved, generated, skipped, num_decided, num_decided_kept = gathered[:, 3 * n :].unbind(dim=1)
        self._totals["decided"] += int(num_decided.sum())
        self._totals["decided_kept"] += int(num_decided_kept.sum())
        self._step_metrics["pruning/realised_keep_rate_step"] = (
            float(num_decided_kept.sum() / num_decided.sum()) if float(num_decided.sum()) > 0 else float("nan")
        )

        # Rewards and advantages of the global batch, pruned rollouts unknown.
        if rewards is None:
            rewards = trainer.last_rewards()
        per_func = getattr(trainer, "_last_rewards_per_func", None)
        if per_func is None:
            per_func = rewards.detach().reshape(-1, 1)
            weights = torch.ones(1)
        else:
            weights = trainer.reward_weights
        _, advantages = survivor_advantages(
            per_func,
            weights,
            ~pruned,
            G,
            scale_rewards=getattr(trainer, "scale_rewards", "group"),
            aggregation=getattr(trainer, "multi_objective_aggregation", "sum_then_normalize"),
        )
        rewards[pruned.to(rewards.device)] = torch.nan
        if per_func is not rewards and per_func.dim() == 2:
            per_func[pruned.to(per_func.device)] = torch.nan
        describe_scored_rollouts(trainer, rewards, per_func, pruned, lengths_global, truncated)
        rows_slice = slice(rank * n, (rank + 1) * n)
        out = dict(batch)
        out["advantages"] = advantages[rows_slice].to(
            device=batch["advantages"].device, dtype=batch["advantages"].dtype
        )
        out[ROLLOUT_REWARDS] = rewards.detach()[rows_slice].float().to(device)
        out[ROLLOUT_GROUPS] = (torch.arange(rank * n, (rank + 1) * n) // G).to(device)
        out = keep_rows(out, ~pruned_local, accelerator, min_rows=int(trainer.args.steps_per_generation))

        # Learning data: finished rollouts of every process (identical on all of them, in process order); the
        # calibration mask marks those that reached L_detect.
        local_rewards = rewards.detach()[rows_slice].float().cpu().tolist()
        ids, detect, last, values = self.callback.training_batch(local_rewards, result.request_ids)
        calibrate = self.callback.reached_detect(ids)
        groups = torch.tensor(self.callback.group_ids(ids), dtype=torch.long)  # [n_finished] global group ids
        if accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            parts = gather_object([(detect.cpu(), last.cpu(), values.cpu(), calibrate, groups)])
            detect, last, values, calibrate, groups = (torch.cat([p[k] for p in parts]) for k in range(5))
        self._learning.append((detect, last, values, calibrate, groups))

        self._processed_key, self._pending_key = self._pending_key, None
        self._record(trainer, result, rewards.detach().float().cpu(), pruned, saved, generated, skipped, kept_counts)
        return out

    def _record(
        self,
        trainer: Any,
        result: RolloutResult,
        rewards: torch.Tensor,
        pruned: torch.Tensor,
        saved: torch.Tensor,
        generated: torch.Tensor,
        skipped: torch.Tensor,
        kept_counts: torch.Tensor,
    ) -> None:
        G = self.num_generations
        grouped = rewards.view(-1, G)  # [B, G], NaN = pruned / unknown
        known = ~torch.isnan(grouped)
        positive = (grouped > self.correct_threshold) & known
        has = known.any(dim=1)
        rho = positive.sum(dim=1).float() / known.sum(dim=1).clamp(min=1).float()  # [B]
        touched = pruned.view(-1, G).any(dim=1) & has  # groups with at least one pruned rollout

        def mean(x: torch.Tensor, mask: torch.Tensor) -> float:
            return float(x[mask].mean()) if bool(mask.any()) else float("nan")

        num = int(pruned.numel())
        num_pruned = int(pruned.sum())
        self._totals["rollouts"] += num
        self._totals["rollouts_pruned"] += num_pruned
        self._totals["tokens_generated"] += float(generated.sum())
        self._totals["tokens_not_generated"] += float(saved.sum())
        self._step_metrics.update(
            {
                "pruning/pruned_fraction": num_pruned / num if num else 0.0,
                "pruning/kept_rows": float(kept_counts.sum()),
                "pruning/reward_kept": float(torch.nanmean(rewards)) if bool(known.any()) else float("nan"),
                "pruning/rho_hat": mean(rho, has),
                "pruning/rho_hat_var": mean(rho * (1 - rho), has),
                "pruning/rho_hat_pruned_groups": mean(rho, touched),
                "pruning/rho_hat_var_pruned_groups": mean(rho * (1 - rho), touched),
                "pruning/tokens_generated": float(generated.sum()),
                "pruning/tokens_not_generated": float(saved.sum()),
                "pruning/logprob_rows_skipped": float(skipped.sum()),
            }
        )
        # Diagnostics of this process's rows (tests, analysis): decisions with the ARRoL survival probability the
        # calibrated rule gave at decision time (also during the cold start and in random mode).
        decisions = {d.request_id: d for d in self.callback.decisions}
        n = len(result.request_ids)
        scores = torch.full((n,), math.nan)
        arrol_survival = torch.full((n,), math.nan)
        for i, rid in enumerate(result.request_ids):
            if rid in decisions:
                scores[i] = decisions[rid].score
                arrol_survival[i] = decisions[rid].arrol_probability
        rank = trainer.accelerator.process_index
        self.history.append(
            {
                "global_step": int(trainer.state.global_step),
                "cold_start": not self.calibrator.ready,
                "rewards": rewards[rank * n : (rank + 1) * n].clone(),
                "group_ids": list(result.group_ids),
                "lengths": [len(c) for c in result.completion_ids],
                "aborted": list(result.aborted),
                "aborted_at": list(result.aborted_at),
                "finish_reasons": list(result.finish_reasons),
                "scores": scores,
                "arrol_survival": arrol_survival,
                "survival": torch.tensor(
                    [decisions[r].survival_probability if r in decisions else math.nan for r in result.request_ids]
                ),
            }
        )

    # ------------------------------------------------------------------------------------------------------------
    # After every optimizer step
    def on_step_end(self, trainer: Any) -> None:
        """Train the head on the gathered finished rollouts, fill the buffer and refit (or only refit)."""
        start = time.perf_counter()
        if self._learning:
            detect, last, values, calibrate, groups = (torch.cat(parts) for parts in zip(*self._learning, strict=True))
            self._learning.clear()
            self._head_metrics = self.callback.learn(detect, last, values, calibrate=calibrate, groups=groups)
            if trainer.accelerator.num_processes > 1:
                from accelerate.utils import broadcast

                with torch.no_grad():
                    for param in self.head.parameters():
                        param.copy_(broadcast(param.detach().clone(), from_process=0))
            self.head_history.append(
                {
                    "global_step": int(trainer.state.global_step),
                    "scores": self.callback.last_scores.clone(),
                    "labels": self.callback.last_labels.clone(),
                }
            )
        else:
            self.calibrator.refit()
        self._head_metrics["pruning/head_seconds"] = time.perf_counter() - start

    # ------------------------------------------------------------------------------------------------------------
    # Component protocol
    def metrics(self) -> dict[str, float]:
        """``pruning/``: last generation (this process), last batch (global), head and calibrator, cumulative totals."""
        out = self.callback.metrics()
        out.pop("pruning/total_pruned_fraction", None)  # local; the global totals follow
        out.pop("pruning/realised_keep_rate", None)
        out.update(self._head_metrics)
        out.update(self._step_metrics)
        out.update(
            {
                "pruning/rollouts_total": float(self._totals["rollouts"]),
                "pruning/rollouts_pruned_total": float(self._totals["rollouts_pruned"]),
                "pruning/pruned_fraction_total": (
                    self._totals["rollouts_pruned"] / self._totals["rollouts"] if self._totals["rollouts"] else 0.0
                ),
                "pruning/tokens_generated_total": float(self._totals["tokens_generated"]),
                "pruning/tokens_not_generated_total": float(self._totals["tokens_not_generated"]),
                "pruning/logprob_rows_skipped_total": float(self._totals["logprob_rows_skipped"]),
                "pruning/unpruned_extra_generations": float(self._totals["unpruned_extra_generations"]),
                "pruning/realised_keep_rate": (
                    self._totals["decided_kept"] / self._totals["decided"] if self._totals["decided"] else float("nan")
                ),
            }
        )
        return out

    def state_dict(self) -> dict[str, Any]:
        """Head + Adam state, calibrator, RNG and counters (via the callback), unconsumed learning data, totals."""
        return {
            "callback": self.callback.state_dict(),
            "generation_calls": self.generation_calls,
            "learning": [tuple(t.cpu().clone() for t in entry) for entry in self._learning],
            "totals": dict(self._totals),
            "head_metrics": dict(self._head_metrics),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.callback.load_state_dict(state["callback"])
        self.generation_calls = int(state["generation_calls"])
        self._learning = []
        for entry in state.get("learning", []):
            detect, last, values = (t.clone() for t in entry[:3])
            # checkpoints from before the calibration mask: every row enters the buffer; before the gate: no groups
            # (each rollout its own group: no within-group pair, so the gate learns nothing from them)
            calibrate = entry[3].clone() if len(entry) > 3 else torch.ones(values.numel(), dtype=torch.bool)
            groups = entry[4].clone() if len(entry) > 4 else -1 - torch.arange(values.numel())
            self._learning.append((detect, last, values, calibrate, groups))
        self._totals.update(state.get("totals", {}))
        self._head_metrics = dict(state.get("head_metrics", {}))
        self.last_result = None
        self._pending_key = None
        self._processed_key = None
