"""Check that vanilla TRL GRPO improves the embedded base model on CPU (a script, not a test).

Runs ``trl.GRPOTrainer`` (HF generate, ``use_vllm=False``) from :func:`base_model_path` on the embedded task with the
strict :func:`verifier_reward`, and measures held-out accuracy (``eval_size`` prompts x ``num_samples`` samples at
T=1, plus greedy) before, every ``eval_every`` steps, and after training. Defaults follow the shared notes: 32
prompts x 8 generations per step, lr 2e-4 constant, beta 0, dapo loss, group reward scaling, T=1 (top-k 0, top-p 1),
``mask_truncated_completions=True``, at most 48 completion tokens, 5,000 training prompts, 100 steps.

Usage::

    python -m efficient_rlvr.embedded.check_grpo --output_dir /tmp/grpo_check [--max_steps 100] [--threads 2]

Writes ``summary.json`` in ``output_dir`` (evaluations, train-reward quarters, seconds per step).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train with GRPO from the base model and return the summary (also written to ``summary.json``)."""
    import torch
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from efficient_rlvr.embedded.model import base_model_path
    from efficient_rlvr.embedded.tokenizer import load_tokenizer
    from efficient_rlvr.evaluation import evaluate_accuracy
    from efficient_rlvr.rewards import verifier_reward
    from efficient_rlvr.tasks import load_task_splits

    torch.set_num_threads(args.threads)
    os.makedirs(args.output_dir, exist_ok=True)
    path = args.model or base_model_path()
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    train, evaluation = load_task_splits(
        "embedded", train_size=args.train_size, eval_size=args.eval_size, seed=0, task_kwargs=args.task_kwargs
    )
    # The held-out set is always the default embedded one, whatever the training mix.
    if args.task_kwargs:
        evaluation = load_task_splits("embedded", train_size=1, eval_size=args.eval_size, seed=0)[1]

    def evaluate(tag: str) -> dict[str, float]:
        metrics = evaluate_accuracy(
            model, tokenizer, evaluation, num_samples=args.num_samples, temperature=1.0, max_new_tokens=48, seed=1
        )
        print(f"[eval {tag}] " + json.dumps({k: round(v, 4) for k, v in metrics.items()}), flush=True)
        return metrics

    summary: dict[str, Any] = {"args": vars(args), "evals": {}, "log": []}
    summary["evals"]["0"] = evaluate("step 0")

    class Monitor(TrainerCallback):
        def __init__(self) -> None:
            self.eval_seconds = 0.0

        def on_log(self, _args, state, control, logs=None, **kwargs):
            if logs:
                summary["log"].append({"step": state.global_step, **{k: float(v) for k, v in logs.items()}})

        def on_step_end(self, _args, state, control, model=None, **kwargs):
            step = state.global_step
            if args.eval_every and step % args.eval_every == 0 and step < args.max_steps:
                t = time.perf_counter()
                summary["evals"][str(step)] = evaluate(f"step {step}")
                self.eval_seconds += time.perf_counter() - t

    config = GRPOConfig(
        output_dir=os.path.join(args.output_dir, "trainer"),
        per_device_train_batch_size=args.prompts_per_step * args.num_generations,
        num_generations=args.num_generations,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_steps=args.max_steps,
        beta=0.0,
        loss_type="dapo",
        scale_rewards="group",
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_completion_length=48,
        mask_truncated_completions=True,
        use_vllm=False,
        use_cpu=True,
        bf16=False,
        report_to="none",
        logging_steps=args.logging_steps,
        save_strategy="no",
        seed=args.seed,
        disable_tqdm=True,
    )
    monitor = Monitor()
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[verifier_reward],
        args=config,
        train_dataset=train,
        processing_class=tokenizer,
        callbacks=[monitor],
    )
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    summary["train_seconds"] = wall - monitor.eval_seconds
    summary["seconds_per_step"] = summary["train_seconds"] / args.max_steps
    summary["evals"][str(args.max_steps)] = evaluate(f"step {args.max_steps}")
    rewards = [row["reward"] for row in summary["log"] if "reward" in row]
    if rewards:
        q = max(1, len(rewards) // 4)
        summary["train_reward_quarters"] = [
            sum(rewards[i : i + q]) / len(rewards[i : i + q]) for i in range(0, len(rewards), q)
        ]
    if args.save_model:
        trainer.save_model(os.path.join(args.output_dir, "final"))
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    before, after = summary["evals"]["0"], summary["evals"][str(args.max_steps)]
    print(
        f"T=1 accuracy {before['accuracy']:.4f} -> {after['accuracy']:.4f}; greedy {before['greedy_accuracy']:.4f} -> "
        f"{after['greedy_accuracy']:.4f}; 0/k prompts {before['frac_all_wrong']:.4f} -> {after['frac_all_wrong']:.4f}; "
        f"{summary['seconds_per_step']:.2f} s/step",
        flush=True,
    )
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (defaults = the settings of the shared notes)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--model", default=None, help="model folder (default: the committed base)")
    p.add_argument("--max_steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--prompts_per_step", type=int, default=32)
    p.add_argument("--num_generations", type=int, default=8)
    p.add_argument("--train_size", type=int, default=5000)
    p.add_argument("--eval_size", type=int, default=400)
    p.add_argument("--num_samples", type=int, default=4)
    p.add_argument("--eval_every", type=int, default=50)
    p.add_argument("--logging_steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task_kwargs", type=json.loads, default=None, help="training mix, e.g. '{\"max_terms\": 4}'")
    p.add_argument("--save_model", action="store_true")
    return p.parse_args(argv)


if __name__ == "__main__":
    run(parse_args())
