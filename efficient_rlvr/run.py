"""The training job behind `make train`, `examples/train_grpo.py` and the benchmark.

`train(run_args, training_args, model_args)` loads the model (the embedded default, a local folder or a Hub name),
the task splits (a reasoning-gym task generated locally, or a `datasets` dataset), measures held-out accuracy before
and after training, trains with `EfficientGRPOTrainer` (or vanilla `trl.GRPOTrainer` for comparisons), and writes the
model, `metrics.jsonl` / `metrics.csv`, `summary.json` and `reward_vs_time.png` to `training_args.output_dir`.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from trl import GRPOConfig, GRPOTrainer, ModelConfig, get_peft_config

from .config import EfficientGRPOConfig
from .generation import use_efficient_vllm_generation
from .profiling import PhaseTimer
from .reporting import (
    MetricsRecorder,
    PeriodicEvaluation,
    StopAfterSeconds,
    after_run,
    plot_reward_vs_time,
    use_compact_console,
)
from .trainer import EfficientGRPOTrainer

EMBEDDED = "embedded"


@dataclass
class RunArguments:
    """What to train on and how to measure it (the model itself comes from `ModelConfig.model_name_or_path`)."""

    dataset_name: str = field(
        default="embedded",
        metadata={
            "help": "'embedded' (reasoning-gym chain_sum, 1-digit operands, 2-5 terms), any reasoning-gym task name "
            "(generated locally), a Hub dataset name or a local dataset path with a prompt column."
        },
    )
    dataset_prompt_column: str = field(default="prompt", metadata={"help": "Prompt column of an external dataset."})
    train_size: int = field(default=5000, metadata={"help": "Training prompts (reasoning-gym: generated)."})
    eval_size: int = field(default=400, metadata={"help": "Held-out prompts for accuracy before/after training."})
    task_seed: int = field(default=0, metadata={"help": "Seed of the generated task data and splits."})
    reward: str = field(
        default="verifier",
        metadata={"help": "'verifier' (the task's own scorer, strict 0/1) or 'math_verify' (answer column)."},
    )
    eval_samples: int = field(default=4, metadata={"help": "Samples per held-out prompt (temperature 1)."})
    eval_max_new_tokens: int | None = field(
        default=None, metadata={"help": "Generation length for evaluation (default: max_completion_length)."}
    )
    trainer: str = field(
        default="efficient",
        metadata={"help": "'efficient' (EfficientGRPOTrainer) or 'trl' (vanilla trl.GRPOTrainer, for comparisons)."},
    )
    torch_threads: int | None = field(
        default=None, metadata={"help": "torch.set_num_threads for this process (None: torch's default)."}
    )
    max_train_seconds: float | None = field(
        default=None,
        metadata={
            "help": "Also stop after the optimizer step at which this many training seconds (evaluations excluded) "
            "have passed; max_steps still applies. None: max_steps only."
        },
    )
    stop_after_run: str | None = field(
        default=None,
        metadata={
            "help": "Another run's summary.json: once it exists, also stop after the optimizer step at which this run's "
            "training clock passes that run's training seconds x stop_after_run_margin (the benchmark's variants stop "
            "so, a little after the vanilla run beside them). None: no such limit."
        },
    )
    stop_after_run_margin: float = field(
        default=1.15, metadata={"help": "Multiplier of the other run's training seconds for stop_after_run."}
    )
    reference_record: str | None = field(
        default="docs/bench/bench.json",
        metadata={
            "help": "Benchmark record (`make bench`'s bench.json) whose vanilla TRL runs are printed next to this run's "
            "final accuracy and time. None: print nothing."
        },
    )
    eval_every_steps: int | None = field(
        default=None,
        metadata={
            "help": "Also measure held-out accuracy every N optimizer steps (training clock paused; the benchmark "
            "reads time-to-reward off this curve). None: only before and after training."
        },
    )


def resolve_model_path(name_or_path: str | None) -> str:
    """'embedded' (or None) -> the committed SFT base model folder; anything else is returned unchanged."""
    if name_or_path in (None, EMBEDDED):
        from .embedded import base_model_path

        return base_model_path()
    return name_or_path


def load_tokenizer_for(model_path: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a model folder or Hub name, with left padding (TRL pads prompts on the left).

    `AutoTokenizer` may reload a saved tokenizer with right padding (the embedded one, for instance): batched
    generation then silently breaks, so the side is forced here.
    """
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def reward_functions(name: str) -> list:
    from .rewards import math_verify_reward, verifier_reward

    table = {"verifier": [verifier_reward], "math_verify": [math_verify_reward]}
    if name not in table:
        raise ValueError(f"reward must be one of {sorted(table)}, got {name!r}")
    return table[name]


def load_datasets(
    run_args: RunArguments,
    training_args: GRPOConfig,
    tokenizer: PreTrainedTokenizerBase,
    model_path: str,
) -> tuple[Any, Any]:
    """The (train, eval) splits of `run_args.dataset_name`, checked before any model weights are loaded.

    Errors are ValueErrors naming `dataset_name` / `dataset_prompt_column`: a dataset that cannot be loaded, a missing
    prompt column, an empty split, or a prompt too long for the model (tokenized prompt + `max_completion_length`
    beyond `max_position_embeddings`, or beyond `vllm_max_model_length` for a colocated vLLM engine; the held-out
    split is checked against its generation length `eval_max_new_tokens`). Large splits are checked on their longest
    prompts only (see `efficient_rlvr.checks`).
    """
    from transformers import AutoConfig

    from .checks import check_prompt_dataset, default_prompt_tokenizer, model_max_positions
    from .tasks import is_reasoning_gym_task, load_task_splits

    name, column = run_args.dataset_name, run_args.dataset_prompt_column
    where = f"dataset_name={name!r}"
    if is_reasoning_gym_task(name):
        if column != "prompt":
            warnings.warn(
                f"dataset_prompt_column={column!r} is ignored: {where} is a reasoning-gym task, generated with a "
                "'prompt' column.",
                stacklevel=2,
            )
    else:
        where += f", dataset_prompt_column={column!r}"
    try:
        train_ds, eval_ds = load_task_splits(
            name,
            train_size=run_args.train_size,
            eval_size=run_args.eval_size,
            seed=run_args.task_seed,
            prompt_column=column,
        )
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err
    max_positions = model_max_positions(AutoConfig.from_pretrained(model_path))
    tokenize = default_prompt_tokenizer(tokenizer, getattr(training_args, "chat_template_kwargs", None))
    colocated = getattr(training_args, "use_vllm", False) and getattr(training_args, "vllm_mode", "") == "colocate"
    vllm_cap = training_args.vllm_max_model_length if colocated else None
    for split, ds, length, cap in (
        ("train", train_ds, training_args.max_completion_length, vllm_cap),
        ("eval", eval_ds, run_args.eval_max_new_tokens or training_args.max_completion_length, None),
    ):
        check_prompt_dataset(
            ds,
            tokenize,
            max_completion_length=int(length),
            max_positions=max_positions,
            vllm_max_model_length=cap,
            name=f"{where} ({split} split)",
            column="prompt",  # load_task_splits puts every prompt in a 'prompt' column
            seed=run_args.task_seed,
        )
    return train_ds, eval_ds


def train(run_args: RunArguments, training_args: GRPOConfig, model_args: ModelConfig | None = None) -> dict[str, Any]:
    """Run one training job and return its summary (also written to `summary.json`)."""
    from .evaluation import evaluate_accuracy

    if run_args.trainer not in ("efficient", "trl"):
        raise ValueError(f"trainer must be 'efficient' or 'trl', got {run_args.trainer!r}")
    if run_args.max_train_seconds is not None and not run_args.max_train_seconds > 0:
        raise ValueError(f"max_train_seconds must be > 0, got {run_args.max_train_seconds}.")
    if not run_args.stop_after_run_margin > 0:
        raise ValueError(f"stop_after_run_margin must be > 0, got {run_args.stop_after_run_margin}.")
    if run_args.torch_threads is not None:
        torch.set_num_threads(run_args.torch_threads)
    model_args = model_args or ModelConfig()
    rewards = reward_functions(run_args.reward)  # fail on a bad name before any data or model work
    model_path = resolve_model_path(model_args.model_name_or_path)
    tokenizer = load_tokenizer_for(model_path)
    train_ds, eval_ds = load_datasets(run_args, training_args, tokenizer, model_path)
    dtype = model_args.dtype if model_args.dtype not in (None, "auto") else "float32"
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))

    trainer_cls = EfficientGRPOTrainer if run_args.trainer == "efficient" else GRPOTrainer
    recorder = MetricsRecorder(training_args.output_dir)
    # Vanilla TRL gets the CPU-safe vLLM weight sync too (its own fails on vLLM-CPU); nothing else changes.
    vllm_dtype = training_args.resolved_vllm_dtype() if isinstance(training_args, EfficientGRPOConfig) else "auto"
    with use_efficient_vllm_generation(vllm_dtype):
        trainer = trainer_cls(
            model=model,
            reward_funcs=rewards,
            args=training_args,
            train_dataset=train_ds,
            processing_class=tokenizer,
            callbacks=[recorder],
            peft_config=get_peft_config(model_args),
        )
    timer = PhaseTimer.attach(trainer)
    use_compact_console(trainer, recorder)
    is_main = trainer.accelerator.is_main_process
    eval_kwargs = {
        "num_samples": run_args.eval_samples,
        "temperature": 1.0,
        "max_new_tokens": run_args.eval_max_new_tokens or training_args.max_completion_length,
        "seed": run_args.task_seed,
        "reward_fn": rewards[0],
    }

    def held_out() -> dict[str, Any]:
        start = time.perf_counter()
        model_for_eval = trainer.accelerator.unwrap_model(trainer.model)
        was_training = model_for_eval.training
        result = evaluate_accuracy(model_for_eval, tokenizer, eval_ds, **eval_kwargs)
        model_for_eval.train(was_training)
        result["seconds"] = time.perf_counter() - start
        return result

    before = held_out() if is_main else {}
    periodic = None
    if run_args.eval_every_steps:
        periodic = PeriodicEvaluation(lambda: held_out() if is_main else {}, recorder, run_args.eval_every_steps)
        trainer.add_callback(periodic)
    if run_args.max_train_seconds is not None:
        trainer.add_callback(StopAfterSeconds(recorder, run_args.max_train_seconds))
    if run_args.stop_after_run is not None:
        trainer.add_callback(
            StopAfterSeconds(recorder, after_run(run_args.stop_after_run, run_args.stop_after_run_margin))
        )
    if is_main:
        print(f"held-out accuracy before training: {_fmt_eval(before)}", flush=True)
    trainer.accelerator.wait_for_everyone()
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    train_seconds = time.perf_counter() - start - recorder.paused_seconds
    trainer.save_model(training_args.output_dir)
    after = held_out() if is_main else {}

    summary: dict[str, Any] = {}
    if is_main:
        print(f"held-out accuracy after training:  {_fmt_eval(after)}", flush=True)
        summary = {
            "trainer": run_args.trainer,
            "model": model_path,
            "dataset": run_args.dataset_name,
            "train_seconds": train_seconds,
            "steps": trainer.state.global_step,
            "seconds_per_step": train_seconds / max(trainer.state.global_step, 1),
            "phase_seconds": dict(timer.total),
            "rollouts_generated": timer.rollouts,
            "tokens_generated": timer.tokens,
            "loss_tokens": timer.loss_tokens,
            "informative_rollouts": timer.informative_rollouts,
            "work": dict(timer.work),
            "eval_seconds_during_training": recorder.paused_seconds,
            "eval_curve": [(0.0, 0, before.get("accuracy"))]
            + (periodic.curve if periodic else [])
            + [(train_seconds, trainer.state.global_step, after.get("accuracy"))],
            "eval_before": before,
            "eval_after": after,
            "run_args": asdict(run_args),
        }
        with open(os.path.join(training_args.output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2, default=str)
        plot_reward_vs_time(
            {run_args.trainer: recorder.records},
            os.path.join(training_args.output_dir, "reward_vs_time.png"),
            title=f"{run_args.dataset_name}: train reward and held-out accuracy (T=1)",
            evals={run_args.trainer: [(t, acc) for t, _, acc in summary["eval_curve"]]},
        )
        if run_args.reference_record:
            print(reference_lines(summary, run_args.reference_record), flush=True)
    trainer.accelerator.wait_for_everyone()
    return summary


def reference_lines(summary: dict[str, Any], record_path: str) -> str:
    """This run's final held-out accuracy and training time next to vanilla TRL's on the benchmark record (the
    methods-off recipe, `make bench`): its median over seeds, and when this run's curve first reached it."""
    accuracy = summary["eval_after"].get("accuracy")
    mine = f"this run ({summary['trainer']}): held-out accuracy {accuracy:.3f} after {summary['steps']} steps, " + (
        f"{summary['train_seconds']:.0f} s of training"
    )
    if not os.path.exists(record_path):
        return mine + f"\n(no benchmark record at {record_path} to compare with)"
    with open(record_path) as f:
        results = [r for r in json.load(f).get("results", []) if r.get("variant") == "trl"]
    if not results:
        return mine + f"\n({record_path} holds no vanilla TRL run)"
    import statistics

    final = statistics.median(r["eval_accuracy_after"] for r in results)
    seconds = statistics.median(r["train_seconds"] for r in results)
    steps = statistics.median(r["steps"] for r in results)
    lines = [
        mine,
        f"vanilla trl.GRPOTrainer, methods-off recipe ({record_path}, median of {len(results)} seed(s), 2 runs at a "
        f"time with 1 thread each): held-out accuracy {final:.3f} after {steps:.0f} steps, {seconds:.0f} s",
    ]
    reached = next((t for t, _, acc in summary["eval_curve"] if acc is not None and acc >= final), None)
    if reached is not None:
        lines.append(f"this run first reached vanilla's final accuracy at {reached:.0f} s of training")
    else:
        lines.append("this run did not reach vanilla's final accuracy")
    lines.append("(seconds compare only on the same machine and thread setting as the record)")
    return "\n".join(lines)


def _fmt_eval(result: dict[str, Any]) -> str:
    keys = ("accuracy", "greedy_accuracy", "frac_all_wrong", "frac_all_right", "seconds")
    return ", ".join(f"{k} {result[k]:.3f}" for k in keys if isinstance(result.get(k), float | int))
