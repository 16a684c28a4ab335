"""Where a step's seconds go, and how many rollouts and tokens were generated.

`PhaseTimer.attach(trainer)` wraps a few methods of one trainer instance (vanilla `trl.GRPOTrainer` or
`EfficientGRPOTrainer` alike; the class is not touched) and adds to the logged metrics, per optimizer step:

- `time/generation`: `_generate_single_turn` (vLLM or transformers generation, weight sync included);
- `time/reward`: `_calculate_rewards`;
- `time/logprobs`: `_get_per_token_logps_and_entropies` calls made while preparing a generation batch (old /
  reference log-probs), i.e. outside the loss;
- `time/update`: the rest of `training_step` (loss forward, backward; optimizer steps are counted by the
  Trainer outside `training_step` and are tiny here);
- `rollouts/generated`, `rollouts/tokens_generated`: completions and completion tokens this process generated this
  step, counted where they leave the generator (so rollouts that later stages drop, and tokens never decoded
  because a rollout was pruned, are counted as they happened); `rollouts/cumulative`,
  `rollouts/cumulative_tokens`: since the start;
- `loss/tokens`: policy-optimization tokens, the completion tokens of the rows that reach the loss (each drawn row
  counts every time it is drawn: cost-aware sampling draws with replacement); `loss/informative_rollouts`: rows
  reaching the loss with a non-zero advantage and at least one completion token (rollouts of groups with non-zero
  reward variance; inert padding rows and zero-variance groups are not counted); both also as `*_cumulative`;
- work counts per phase, so that a CPU run can be projected onto a GPU's cost profile (where generation dominates):
  `work/decode_tokens` (= `rollouts/tokens_generated`), `work/decode_steps` (the longest completion of each
  generation call: the engine's decode steps when the call's requests are scheduled in one wave, as they are here),
  `work/logprob_tokens` (prompt + completion tokens of the rows scored by the old / reference log-prob passes) and
  `work/update_tokens` (prompt + completion tokens of the rows reaching the loss, each forward + backward); their
  run totals are `PhaseTimer.work`.
"""

from __future__ import annotations

import functools
import time
from collections import defaultdict
from typing import Any


class PhaseTimer:
    """Per-phase wall-clock and generation counters for one trainer (see the module docstring)."""

    PHASES = ("generation", "reward", "logprobs", "update")
    WORK = ("decode_tokens", "decode_steps", "logprob_tokens", "update_tokens")

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)
        self._step: dict[str, float] = defaultdict(float)
        self._in_generation_batch = False
        self.rollouts = 0
        self.tokens = 0
        self.loss_tokens = 0
        self.informative_rollouts = 0
        self.work: dict[str, float] = {key: 0.0 for key in self.WORK}

    @classmethod
    def attach(cls, trainer: Any) -> PhaseTimer:
        timer = cls()
        timer._wrap(trainer, "_generate_single_turn", "generation", count_rollouts=True)
        timer._wrap(trainer, "_calculate_rewards", "reward")
        timer._wrap(trainer, "_get_per_token_logps_and_entropies", "logprobs", only_in_generation_batch=True)
        original_loss = trainer._compute_loss

        @functools.wraps(original_loss)
        def compute_loss(model: Any, inputs: dict[str, Any]) -> Any:
            if trainer.model.training:
                mask = inputs["completion_mask"]  # [b, C]
                tokens = mask.sum(dim=1)  # [b]
                informative = (inputs["advantages"].reshape(tokens.shape[0], -1)[:, 0] != 0) & (tokens > 0)  # [b]
                timer._step["loss_tokens"] += float(tokens.sum())
                timer._step["update_tokens"] += float(tokens.sum() + inputs["prompt_mask"].sum())
                timer._step["informative"] += float(informative.sum())
            return original_loss(model, inputs)

        trainer._compute_loss = compute_loss
        original_gs = trainer._generate_and_score_completions
        original_step = trainer.training_step

        @functools.wraps(original_gs)
        def generate_and_score(*args: Any, **kwargs: Any) -> Any:
            timer._in_generation_batch = True
            start = time.perf_counter()
            try:
                output = original_gs(*args, **kwargs)
            finally:
                timer._in_generation_batch = False
            timer._step["generation_batch"] += time.perf_counter() - start
            return output

        @functools.wraps(original_step)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            before = timer._step["generation_batch"]
            start = time.perf_counter()
            output = original_step(*args, **kwargs)
            timer._step["update"] += time.perf_counter() - start - (timer._step["generation_batch"] - before)
            if trainer._step % trainer.current_gradient_accumulation_steps == 0:
                timer._flush(trainer)
            return output

        trainer._generate_and_score_completions = generate_and_score
        trainer.training_step = training_step
        return timer

    def _wrap(
        self,
        trainer: Any,
        name: str,
        phase: str,
        only_in_generation_batch: bool = False,
        count_rollouts: bool = False,
    ) -> None:
        original = getattr(trainer, name)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if only_in_generation_batch and not self._in_generation_batch:
                return original(*args, **kwargs)
            start = time.perf_counter()
            try:
                output = original(*args, **kwargs)
            finally:
                self._step[phase] += time.perf_counter() - start
            if count_rollouts and trainer.model.training:
                completion_ids = output[0]  # `_generate_single_turn` returns (completion_ids, logprobs)
                self._step["rollouts"] += len(completion_ids)
                self._step["tokens"] += sum(len(ids) for ids in completion_ids)
                self._step["decode_steps"] += max((len(ids) for ids in completion_ids), default=0)
            if only_in_generation_batch and trainer.model.training:  # (model, input_ids, attention_mask, ...)
                mask = kwargs.get("attention_mask", args[2] if len(args) > 2 else None)
                if mask is not None:
                    self._step["logprob_tokens"] += float(mask.sum())
            return output

        setattr(trainer, name, timed)

    def _flush(self, trainer: Any) -> None:
        metrics = trainer._metrics["train"]
        for phase in self.PHASES:
            self.total[phase] += self._step[phase]
            metrics[f"time/{phase}"].append(self._step[phase])
        self.rollouts += int(self._step["rollouts"])
        self.tokens += int(self._step["tokens"])
        metrics["rollouts/generated"].append(self._step["rollouts"])
        metrics["rollouts/tokens_generated"].append(self._step["tokens"])
        metrics["rollouts/cumulative"].append(float(self.rollouts))
        metrics["rollouts/cumulative_tokens"].append(float(self.tokens))
        self.loss_tokens += int(self._step["loss_tokens"])
        self.informative_rollouts += int(self._step["informative"])
        metrics["loss/tokens"].append(self._step["loss_tokens"])
        metrics["loss/informative_rollouts"].append(self._step["informative"])
        metrics["loss/tokens_cumulative"].append(float(self.loss_tokens))
        metrics["loss/informative_rollouts_cumulative"].append(float(self.informative_rollouts))
        self._step["decode_tokens"] = self._step["tokens"]
        for key in self.WORK:
            self.work[key] += self._step[key]
            metrics[f"work/{key}"].append(self._step[key])
        self._step.clear()
