"""Two-process run of HIVE selection + dynamic sampling, launched by tests/test_selection_training.py with
`accelerate launch --config_file accelerate_configs/cpu_2proc.yaml --multi_gpu tests/_selection_two_process.py OUT MODEL`
(`--multi_gpu` is needed: with the config file alone accelerate 1.15 starts a single process on CPU).

Each rank trains a few steps (transformers generation) and writes OUT/rank{r}.json with, per generation batch, the
global prompt keys the selection stage chose, the keys of the rows it handed to this rank, the entropies it used,
and the row count after the dynamic-sampling gate; the test compares the ranks.
"""

from __future__ import annotations

import json
import os
import sys

import torch

torch.set_num_threads(1)

from grpo_args import cpu_grpo_kwargs  # noqa: E402

from efficient_rlvr import EfficientGRPOConfig, EfficientGRPOTrainer  # noqa: E402
from efficient_rlvr.embedded import load_tokenizer  # noqa: E402
from efficient_rlvr.rewards import verifier_reward  # noqa: E402
from efficient_rlvr.selection import prompt_key  # noqa: E402
from efficient_rlvr.selection.stage import DynamicSamplingStage  # noqa: E402
from efficient_rlvr.tasks import load_task_splits  # noqa: E402


def main(out_dir: str, model_dir: str) -> None:
    train_ds, _ = load_task_splits("embedded", train_size=48, eval_size=8, seed=0)
    args = EfficientGRPOConfig(
        **cpu_grpo_kwargs(
            os.path.join(out_dir, "run"),
            per_device_train_batch_size=8,  # 2 prompts x G=4 per rank, 4 prompts per step
            num_generations=4,
            max_completion_length=16,
            max_steps=4,
            learning_rate=2e-4,
            lr_scheduler_type="constant",
            logging_steps=1,
            save_strategy="no",
            selection_history=True,
            selection_entropy=True,
            dynamic_sampling=True,
            dynamic_sampling_max_rounds=1,
        )
    )
    trainer = EfficientGRPOTrainer(
        model=model_dir,
        reward_funcs=[verifier_reward],
        args=args,
        train_dataset=train_ds,
        processing_class=load_tokenizer(model_dir),
    )
    stage = trainer.prompt_selection
    gate = next(s for s in trainer.batch_stages if isinstance(s, DynamicSamplingStage))
    record: list[dict] = []
    select, process = stage.select, gate.process

    def recording_select(trainer_, rows):
        out = select(trainer_, rows)
        record.append(
            {
                "global_keys": list(stage.last_keys),
                "local_keys": [prompt_key(r["prompt"]) for r in out],
                "entropy_threshold": stage.metrics().get("selection/entropy_threshold"),
                "history_p": [stage.history.p_easy, stage.history.p_hard],
            }
        )
        return out

    def recording_process(trainer_, rows, batch, rewards):
        out = process(trainer_, rows, batch, rewards)
        record[-1]["rows_after_gate"] = int(out["completion_ids"].shape[0])
        record[-1]["num_items_in_batch"] = float(out["num_items_in_batch"])
        record[-1]["local_tokens"] = float(out["completion_mask"].sum())
        return out

    stage.select = recording_select
    gate.process = recording_process
    trainer.train()
    rank = trainer.accelerator.process_index
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "world": trainer.accelerator.num_processes, "steps": record}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
