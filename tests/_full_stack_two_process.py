"""Two-process run of every method at once, launched by tests/test_multiprocess.py with
`accelerate launch --config_file accelerate_configs/cpu_2proc.yaml --multi_gpu tests/_full_stack_two_process.py OUT
MODEL` (each process drives its own colocated vLLM engine, in-process).

Methods: HIVE (history + entropy), ARRoL pruning, V0.5 (baseline + adaptive budget), HES and cost-aware sampling.
Each rank writes OUT/rank{r}.json with, per generation batch: the global prompt keys selected, this rank's prompt
keys, the global pruned flags and head checksum, the budget's per-prompt rollout counts, the HES keep mask, the
cost sampler's global draws, the global token count and this rank's row/token counts and whether every row it
trains on has a known reward (no pruned or dropped rollout); at the end a checksum of the policy parameters.
"""

from __future__ import annotations

import json
import os
import sys

import torch

torch.set_num_threads(1)

from grpo_args import FULL_STACK, VLLM_COLOCATE, cpu_grpo_kwargs  # noqa: E402

from efficient_rlvr import EfficientGRPOConfig, EfficientGRPOTrainer  # noqa: E402
from efficient_rlvr.batch import ROLLOUT_REWARDS  # noqa: E402
from efficient_rlvr.embedded import load_tokenizer  # noqa: E402
from efficient_rlvr.rewards import verifier_reward  # noqa: E402
from efficient_rlvr.selection import prompt_key  # noqa: E402
from efficient_rlvr.tasks import load_task_splits  # noqa: E402


def main(out_dir: str, model_dir: str) -> None:
    train_ds, _ = load_task_splits("embedded", train_size=96, eval_size=8, seed=0)
    args = EfficientGRPOConfig(
        **cpu_grpo_kwargs(
            os.path.join(out_dir, "run"),
            per_device_train_batch_size=16,  # 4 prompts x G=4 per rank, 8 prompts per step
            num_generations=4,
            max_completion_length=40,
            max_steps=4,
            learning_rate=5e-4,
            lr_scheduler_type="constant",
            logging_steps=1,
            save_strategy="no",
            **VLLM_COLOCATE,
            **FULL_STACK,
        )
    )
    trainer = EfficientGRPOTrainer(
        model=model_dir,
        reward_funcs=[verifier_reward],
        args=args,
        train_dataset=train_ds,
        processing_class=load_tokenizer(model_dir),
    )
    selection, pruning = trainer.prompt_selection, trainer.rollout_generation
    budget, hes = trainer.batch_stages[1], trainer.batch_stages[2]
    sampler = trainer.minibatch_sampler
    record: list[dict] = []
    select, hes_process, split = selection.select, hes.process, sampler.split

    def recording_select(trainer_, rows):
        out = select(trainer_, rows)
        record.append({"global_keys": list(selection.last_keys), "local_keys": [prompt_key(r["prompt"]) for r in out]})
        return out

    def recording_hes(trainer_, rows, batch, rewards):
        out = hes_process(trainer_, rows, batch, rewards)
        step = record[-1]
        history = pruning.history[-1]
        flags = trainer_.accelerator.gather(torch.tensor(history["aborted"], dtype=torch.long)).tolist()
        step["pruned_global"] = flags
        step["pruned_local"] = [int(a) for a in history["aborted"]]
        step["calibrator_ready"] = bool(pruning.calibrator.ready)
        step["head_checksum"] = float(sum(p.double().sum() for p in pruning.head.parameters()))
        step["budget_counts"] = budget.last_step["counts"].tolist()
        step["hes_keep"] = hes.last_selection["keep"].long().tolist()
        real = out["completion_mask"].sum(1) > 0
        step["trained_rewards_known"] = bool(torch.isfinite(out[ROLLOUT_REWARDS][real]).all())
        return out

    def recording_split(trainer_, batch, n):
        chunks = split(trainer_, batch, n)
        step = record[-1]
        step["cost_draws"] = sampler.last_draw["rows"].tolist()
        step["num_items_in_batch"] = [float(c["num_items_in_batch"]) for c in chunks]
        step["local_rows"] = [int(c["completion_ids"].shape[0]) for c in chunks]
        return chunks

    selection.select, hes.process, sampler.split = recording_select, recording_hes, recording_split
    trainer.train()
    rank = trainer.accelerator.process_index
    checksum = float(sum(p.detach().double().sum() for p in trainer.model.parameters()))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "world": trainer.accelerator.num_processes, "steps": record, "params": checksum}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
