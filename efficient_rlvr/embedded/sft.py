"""The SFT recipe that builds the embedded base model (``efficient_rlvr/embedded/base``).

Recipe (defaults of this script):

- data: ``load_task_splits("embedded", train_size=40000, eval_size=400, seed=0)``: reasoning-gym chain_sum,
  1-digit operands, 2-5 terms; train rows never repeat an eval question. Each train row becomes a prompt-completion
  conversation whose assistant turn is the running-sum chain of thought (``3+4=7\\n7-9=-2\\nAnswer: -2``).
- tokenizer: :func:`build_tokenizer` (vocab 320, seed 0); model: :func:`build_model` (~0.87M parameters, seed 0).
- TRL ``SFTTrainer`` with completion-only loss: batch 64, AdamW lr 3e-3, cosine schedule over ``total_steps=900``
  with 45 warmup steps, gradient clipping 1.0, trainer seed 0, 2 torch threads.
- Training stops at ``stop_step`` (the schedule still spans 900 steps) and that state is the base model. The stop
  step was chosen by measured T=1 held-out accuracy (target 20-50%, with many prompts at 1/4..3/4 right); see
  ``base/README.md``. ``--snapshot_steps`` saves more checkpoints along the way, ``--evaluate`` scores them.

Usage::

    python -m efficient_rlvr.embedded.sft --output_dir DIR               # rebuild the base model in DIR
    python -m efficient_rlvr.embedded.sft --output_dir DIR --stop_step 900 --snapshot_steps 200,250,300 --evaluate
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

DEFAULT_STOP_STEP = 350


def sft_rows(dataset: Any) -> Any:
    """Prompt-completion conversations (running-sum solutions) from a chain_sum split."""
    from efficient_rlvr.tasks import chain_sum_solution

    def to_completion(row: dict[str, Any]) -> dict[str, Any]:
        expression = json.loads(row["metadata"])["expression"]
        return {"completion": [{"role": "assistant", "content": chain_sum_solution(expression)}]}

    keep = ["prompt"]
    return dataset.map(to_completion, remove_columns=[c for c in dataset.column_names if c not in keep])


def evaluate_folder(path: str, eval_dataset: Any, num_samples: int = 4, seed: int = 0) -> dict[str, float]:
    """Load a saved folder with the Auto classes and run :func:`evaluate_accuracy` on ``eval_dataset``."""
    from transformers import AutoModelForCausalLM

    from efficient_rlvr.embedded.tokenizer import load_tokenizer
    from efficient_rlvr.evaluation import evaluate_accuracy

    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    return evaluate_accuracy(model, tokenizer, eval_dataset, num_samples=num_samples, temperature=1.0, seed=seed)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train per ``args`` and save the ``stop_step`` model (plus snapshots) under ``args.output_dir``."""
    import torch
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from efficient_rlvr.embedded.model import build_model, save_model_and_tokenizer
    from efficient_rlvr.embedded.tokenizer import build_tokenizer
    from efficient_rlvr.tasks import load_task_splits

    if not 0 < args.stop_step <= args.total_steps:
        raise ValueError(f"stop_step must be in (0, total_steps={args.total_steps}], got {args.stop_step}")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    tokenizer = build_tokenizer(vocab_size=args.vocab_size, seed=0)
    model = build_model(tokenizer, seed=args.seed)
    train, evaluation = load_task_splits("embedded", train_size=args.train_size, eval_size=args.eval_size, seed=0)
    train_sft = sft_rows(train)
    snapshots = sorted({int(s) for s in args.snapshot_steps.split(",") if s.strip()} | {args.stop_step})
    os.makedirs(args.output_dir, exist_ok=True)
    log: list[dict[str, float]] = []

    class Snapshots(TrainerCallback):
        def on_log(self, _args, state, control, logs=None, **kwargs):
            if logs:
                log.append({"step": state.global_step, **{k: float(v) for k, v in logs.items()}})

        def on_step_end(self, _args, state, control, model=None, **kwargs):
            step = state.global_step
            if step in snapshots and step != args.stop_step:
                save_model_and_tokenizer(
                    model, tokenizer, os.path.join(args.output_dir, "checkpoints", f"step-{step}")
                )
            if step >= args.stop_step:
                control.should_training_stop = True
            return control

    config = SFTConfig(
        output_dir=os.path.join(args.output_dir, "trainer"),
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=args.warmup_steps,
        max_steps=args.total_steps,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=25,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=args.seed,
        data_seed=args.seed,
        completion_only_loss=True,
        max_length=128,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=train_sft, processing_class=tokenizer, callbacks=[Snapshots()]
    )
    t_train = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - t_train
    save_model_and_tokenizer(trainer.model, tokenizer, args.output_dir)
    summary: dict[str, Any] = {
        "stop_step": args.stop_step,
        "total_steps": args.total_steps,
        "seed": args.seed,
        "threads": args.threads,
        "train_rows": len(train_sft),
        "train_seconds": train_seconds,
        "total_seconds": time.perf_counter() - t0,
        "log": log,
    }
    if args.evaluate:
        summary["eval"] = {}
        for step in snapshots:
            path = (
                args.output_dir
                if step == args.stop_step
                else os.path.join(args.output_dir, "checkpoints", f"step-{step}")
            )
            if os.path.exists(os.path.join(path, "model.safetensors")):
                summary["eval"][step] = evaluate_folder(path, evaluation, num_samples=args.num_samples)
                print(f"step {step}: {json.dumps(summary['eval'][step])}", flush=True)
    with open(os.path.join(args.output_dir, "sft_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (defaults = the committed recipe)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--seed", type=int, default=0, help="model init and trainer seed")
    p.add_argument("--stop_step", type=int, default=DEFAULT_STOP_STEP)
    p.add_argument("--total_steps", type=int, default=900, help="length of the cosine schedule")
    p.add_argument("--warmup_steps", type=int, default=45)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--train_size", type=int, default=40000)
    p.add_argument("--eval_size", type=int, default=400)
    p.add_argument("--vocab_size", type=int, default=320)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--snapshot_steps", default="", help="comma-separated steps to save as checkpoints/step-N")
    p.add_argument("--evaluate", action="store_true", help="score the stop step and snapshots (T=1, k samples)")
    p.add_argument("--num_samples", type=int, default=4)
    return p.parse_args(argv)


if __name__ == "__main__":
    run(parse_args())
