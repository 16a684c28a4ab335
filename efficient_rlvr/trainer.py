"""`EfficientGRPOTrainer`: TRL's `GRPOTrainer` plus pluggable components that skip useless compute.

The trainer is a pipeline in one direction; each stage is a component the trainer calls, and with every method off
each stage is absent, so the trainer runs TRL's own code and behaves exactly like `trl.GRPOTrainer`:

    select prompts            `prompt_selection.select(trainer, rows)`             (HIVE; selection/stage.py)
    -> generate               `rollout_generation.generate(trainer, ...)`          (ARRoL pruning; pruning/stage.py)
    -> score                  TRL's reward functions (gathered over processes); the zero-advantage skip, as the
                              first batch stage, scores right after generation (`_generate`) so that its rows
                              skip TRL's old-log-prob pass (cost/skip.py), and TRL reuses those rewards
    -> baseline/advantages,   `stage.process(trainer, rows, batch, rewards)` for each of `batch_stages`, in order:
       drop rows              pruned rollouts, the zero-variance gate, the V0.5 baseline, HES trajectory selection,
                              zero-advantage rows (exact skip, cost/skip.py)
    -> minibatch sampling     `minibatch_sampler.split(trainer, batch, n)`        (Cost-Aware GRPO; cost/stage.py);
                              with the zero-advantage skip, micro-batches packed by length (batch.py)
    -> loss                   TRL's loss; rows carrying `sample_weights` are importance-weighted (cost/weighting.py);
                              with `old_logprobs_from_loss`, the vLLM importance ratio comes from the loss's own
                              forward pass and TRL's old-log-prob pass is off (cost/old_logprobs.py)

Every stage is a component (`state_dict`, `load_state_dict`, `metrics`; optionally `on_step_end(trainer)` after each
optimizer step). The order is fixed here and documented once, in this docstring.

Inherited unchanged from `trl.GRPOTrainer` (1.16.0): data loading and the repeat sampler, generation with
transformers or vLLM (server mode included), reward computation, advantage normalisation, the loss for every
`loss_type`, logging, evaluation and the model card. Changed: the colocated vLLM engine is built with the trainer's
dtype and synced with a weight reload that works on vLLM's CPU backend (`efficient_rlvr.generation`), and every
component's state is saved with the trainer's checkpoints and restored on resume.
"""

from __future__ import annotations

import os
from typing import Any, Protocol, runtime_checkable

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import (
    shuffle_sequence_dict,
    split_pixel_values_by_grid,
    unsplit_pixel_values_by_grid,
)

from .batch import annotate_rows, pack_rows_by_length, split_rows, zero_variance_share
from .config import EfficientGRPOConfig
from .generation import use_efficient_vllm_generation

COMPONENT_STATE_FILE = "efficient_rlvr_state.pt"


@runtime_checkable
class Component(Protocol):
    """What the trainer needs of a pipeline component (selector, pruner, sampler, baseline, ...)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def metrics(self) -> dict[str, float]: ...


class EfficientGRPOTrainer(GRPOTrainer):
    """Drop-in replacement for `trl.GRPOTrainer` (same arguments) configured by [`EfficientGRPOConfig`].

    Only the efficiency components are new; see the module docstring for what is inherited unchanged.
    """

    _tag_names = ["trl", "grpo", "efficient-rlvr"]
    _name = "EfficientGRPO"

    def __init__(
        self, model: Any, reward_funcs: Any, args: EfficientGRPOConfig | GRPOConfig | None = None, **kwargs: Any
    ):
        if args is None:
            model_name = model if isinstance(model, str) else model.config._name_or_path
            args = EfficientGRPOConfig(f"{str(model_name).split('/')[-1]}-EfficientGRPO")
        elif not isinstance(args, EfficientGRPOConfig):
            if not isinstance(args, GRPOConfig):
                raise TypeError(
                    f"EfficientGRPOTrainer(args=...) needs a GRPOConfig or an EfficientGRPOConfig, got "
                    f"{type(args).__name__}."
                )
            args = EfficientGRPOConfig.from_grpo_config(args)  # drop-in: same values, every method off (logged)
        with use_efficient_vllm_generation(args.resolved_vllm_dtype()):
            super().__init__(model, reward_funcs, args=args, **kwargs)
        self.prompt_selection: Any = None
        self.rollout_generation: Any = None
        self.batch_stages: list[Any] = []
        self.minibatch_sampler: Any = None
        self.old_logprobs: Any = None  # the importance ratio from the loss's forward pass (cost/old_logprobs.py)
        self._last_rewards_per_func: torch.Tensor | None = None
        self._scoring_inputs: list[dict[str, Any]] | None = None  # the rows of the generation in flight
        self._early_rewards: tuple[Any, torch.Tensor] | None = None  # (completions, rewards) scored before TRL does
        self._build_stages(args)
        # A stage that acts between generation and TRL's old-log-prob pass (the zero-advantage skip) may do so only
        # as the first batch stage: no earlier stage drops, reorders or re-weights rows.
        # Without the old-log-prob pass (`old_logprobs_from_loss`) there is nothing for it to trim.
        first = self.batch_stages[0] if self.batch_stages and self.old_logprobs is None else None
        self.early_scoring: Any = first if hasattr(first, "after_generation") else None
        stages = (self.prompt_selection, self.rollout_generation, *self.batch_stages, self.minibatch_sampler)
        self.components: dict[str, Component] = {
            type(stage).__name__: stage for stage in (*stages, self.old_logprobs) if stage is not None
        }
        if self.components:
            self.add_callback(_StepEndCallback(self))
        from .checks import check_training_setup

        check_training_setup(self)  # reward guard; train dataset columns, size and prompt lengths

    def _build_stages(self, args: EfficientGRPOConfig) -> None:
        """Build the stage of every method switched on (imports stay lazy: a method that is off costs nothing)."""
        if args.selection_history or args.selection_entropy:
            from .selection.stage import PromptSelectionStage

            self.prompt_selection = PromptSelectionStage(self, args)
        if args.pruning:
            from .pruning.stage import PruningStage

            self.rollout_generation = PruningStage(self, args)
            self.batch_stages.append(self.rollout_generation)
        if args.dynamic_sampling:
            from .selection.stage import DynamicSamplingStage

            self.batch_stages.append(DynamicSamplingStage(self, args))
        if args.budget_baseline or args.budget_adaptive:
            from .budget.stage import BudgetStage

            self.batch_stages.append(BudgetStage(self, args))
        if args.hes_selection:
            from .hes.stage import HESSelectionStage

            self.batch_stages.append(HESSelectionStage(self, args))
        if args.skip_zero_advantage:
            from .cost.skip import ZeroAdvantageSkip

            self.batch_stages.append(ZeroAdvantageSkip(self, args))
        if args.cost_aware_sampling:
            from .cost.stage import CostAwareStage

            self.minibatch_sampler = CostAwareStage(self, args)
        if args.old_logprobs_from_loss:
            from .cost.old_logprobs import OldLogprobsFromLoss

            self.old_logprobs = OldLogprobsFromLoss(self, args)

    # ------------------------------------------------------------------------------------------------------------
    # The pipeline. Each override below runs TRL's own code unchanged when its stage is off.
    def _prepare_inputs(self, generation_batch: Any) -> dict[str, Any]:
        # Overrides TRL 1.16.0 `GRPOTrainer._prepare_inputs`: prompt selection before generation, and minibatch
        # sampling instead of shuffle-and-split. Evaluation and off-stage paths are TRL's.
        if not self.model.training or not (self.prompt_selection or self.batch_stages or self.minibatch_sampler):
            return super()._prepare_inputs(generation_batch)
        generate_every = self.args.steps_per_generation * self.num_iterations
        if self._step % generate_every == 0 or self._buffered_inputs is None:
            if self.prompt_selection is not None:
                generation_batch = self.prompt_selection.select(self, generation_batch)
            batch = split_pixel_values_by_grid(self._generate_and_score_completions(generation_batch))
            if self.minibatch_sampler is not None:
                batches = self.minibatch_sampler.split(self, batch, self.args.steps_per_generation)
            elif self.args.skip_zero_advantage:  # token-normalised losses: length-packed micro-batches, same step
                batches = pack_rows_by_length(shuffle_sequence_dict(batch), self.args.steps_per_generation)
            else:  # TRL's shuffle-and-split; stages may have dropped rows, so chunks may differ by one row
                batches = split_rows(shuffle_sequence_dict(batch), self.args.steps_per_generation)
            self._buffered_inputs = [unsplit_pixel_values_by_grid(b) for b in batches]
        return self._buffered_inputs[self._step % self.args.steps_per_generation]

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        # Overrides TRL 1.16.0 `GRPOTrainer._generate_single_turn` only when a rollout stage (pruning) is on.
        if self.rollout_generation is None or not self.model.training:
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images=has_tool_images
            )
        return self.rollout_generation.generate(self, prompt_ids, images, multimodal_fields, num_generations)

    def _generate(self, prompts: list) -> tuple:
        # Extends TRL 1.16.0 `GRPOTrainer._generate`: the early-scoring stage sees the rollouts before TRL's
        # old-log-prob pass (cost/skip.py leaves the zero-advantage rows out of it).
        generated = super()._generate(prompts)
        if self.early_scoring is not None and self.model.training:
            self.early_scoring.after_generation(self, self._scoring_inputs, prompts, generated)
        return generated

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        # Extends TRL 1.16.0 `GRPOTrainer._calculate_rewards`: keeps the gathered rewards for the batch stages;
        # reward-function faults raise on every process, non-finite rewards count as None (checks.py). Rollouts
        # already scored after generation (`early_scoring`) are not scored again.
        early, self._early_rewards = self._early_rewards, None
        if early is not None and early[0] is completions:
            self._last_rewards_per_func = early[1]
            return early[1]
        from .checks import reward_guard

        guard = reward_guard(self)
        compute = super()._calculate_rewards
        rewards_per_func = guard.calculate(self, compute, inputs, prompts, completions, completion_ids_list)
        self._last_rewards_per_func = rewards_per_func
        return rewards_per_func

    def last_rewards(self) -> torch.Tensor:
        """Total reward of every rollout of the last generation batch, all processes: `[N_global]`, NaN = unscorable.

        Same aggregation as TRL's logged `reward` (weighted sum over reward functions, NaN when every function
        returned None).
        """
        per_func = self._last_rewards_per_func  # [N_global, F]
        rewards = (per_func * self.reward_weights.to(per_func.device).unsqueeze(0)).nansum(dim=1)
        rewards[torch.isnan(per_func).all(dim=1)] = torch.nan
        return rewards

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        # Extends TRL 1.16.0 `GRPOTrainer._generate_and_score_completions`: the batch stages run on its output;
        # with `old_logprobs_from_loss`, TRL's old-log-prob pass is off for it and for the stages' extra generations.
        if self.old_logprobs is None or not self.model.training:
            return self._generate_score_and_process(inputs)
        with self.old_logprobs.generation(self, len(inputs)):
            return self._generate_score_and_process(inputs)

    def _generate_score_and_process(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        self._scoring_inputs = inputs
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._scoring_inputs = None
        if not self.model.training:
            return output
        rewards = self.last_rewards() if self.batch_stages else None
        if self.batch_stages:  # each row carries its reward and group, so stages may drop or add rows (batch.py)
            output = annotate_rows(output, rewards, self.accelerator.process_index, self.num_generations)
        for stage in self.batch_stages:
            output = stage.process(self, inputs, output, rewards)
        if rewards is not None:  # TRL's frac_reward_zero_std counts pruned rollouts as scored 0: judge on known ones
            self._metrics["train"]["frac_reward_zero_std_known"].append(
                zero_variance_share(rewards, self.num_generations)
            )
        if self.prompt_selection is not None:
            self.prompt_selection.observe(self, inputs, rewards if rewards is not None else self.last_rewards())
        return output

    def _compute_loss(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor:
        # Extends TRL 1.16.0 `GRPOTrainer._compute_loss`: the vLLM importance ratio from this forward pass
        # (`old_logprobs_from_loss`), importance weights of sampled minibatches.
        compute = super()._compute_loss
        if self.old_logprobs is not None:
            compute = self.old_logprobs.loss(self, compute)
        if "sample_weights" not in inputs:
            return compute(model, inputs)
        return self.minibatch_sampler.weighted_loss(self, model, inputs, compute)

    # ------------------------------------------------------------------------------------------------------------
    # Logging: every component reports what it saved under its own namespace.
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training:
            for component in self.components.values():
                logs.update(component.metrics())
            from .checks import pop_reward_metrics

            logs.update(pop_reward_metrics(self))
        super().log(logs, start_time)

    # ------------------------------------------------------------------------------------------------------------
    # Model card: extends TRL 1.16.0 `create_model_card` (used by `push_to_hub` and TRL's `_save_checkpoint`) with
    # the methods switched on, their papers, non-default efficiency fields and the run's savings (efficient_rlvr.card).
    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
    ) -> None:
        from .card import create_model_card

        create_model_card(self, model_name=model_name, dataset_name=dataset_name, tags=tags)

    # ------------------------------------------------------------------------------------------------------------
    # Checkpoints keep every component's state (history, buffers, optimizers, RNGs).
    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        if self.components and self.args.should_save:
            checkpoint_folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            output_dir = os.path.join(self._get_output_dir(trial=trial), checkpoint_folder)
            state = {name: component.state_dict() for name, component in self.components.items()}
            torch.save(state, os.path.join(output_dir, COMPONENT_STATE_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or not self.components:
            return
        path = os.path.join(checkpoint, COMPONENT_STATE_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"Checkpoint {checkpoint} has no {COMPONENT_STATE_FILE}: it was not written by EfficientGRPOTrainer "
                f"with the same methods enabled ({sorted(self.components)}), so their state cannot be restored."
            )
        state = torch.load(path, weights_only=False)
        for name, component in self.components.items():
            if name not in state:
                raise KeyError(f"{path} has no state for component {name!r} (it has {sorted(state)}).")
            component.load_state_dict(state[name])


class _StepEndCallback(TrainerCallback):
    """Calls `on_step_end(trainer)` of every component after each optimizer step (refits, p adaptation, ...)."""

    def __init__(self, trainer: EfficientGRPOTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        for component in self.trainer.components.values():
            hook = getattr(component, "on_step_end", None)
            if hook is not None:
                hook(self.trainer)
