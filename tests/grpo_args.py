"""GRPOConfig keyword arguments shared by the tests (imported by test modules and the multi-process scripts)."""

# One CPU process, float32, no trackers, seeded, plain sampling (top-k off), no KL term, dapo loss, quiet progress.
CPU_BASE = {
    "use_cpu": True,
    "bf16": False,
    "report_to": "none",
    "seed": 0,
    "top_k": 0,
    "beta": 0.0,
    "loss_type": "dapo",
    "disable_tqdm": True,
}
# A colocated vLLM engine sized for the embedded model's short prompts and completions.
VLLM_COLOCATE = {
    "use_vllm": True,
    "vllm_mode": "colocate",
    "vllm_max_model_length": 128,
    "vllm_gpu_memory_utilization": 0.3,
}

# Every method at once, sized for the embedded task (completions of 10-40 tokens, G = 4): HIVE (both stages), ARRoL
# pruning after a 1-step cold start, V0.5 baseline + adaptive budget, HES, cost-aware draws.
FULL_STACK = {
    "selection_history": True,
    "selection_entropy": True,
    "pruning": True,
    "pruning_l_detect": 12,
    "pruning_cold_start_steps": 1,
    "budget_baseline": True,
    "budget_adaptive": True,
    "budget_k_init": 4,
    "budget_k_max": 8,
    "hes_selection": True,
    "hes_keep_fraction": 0.75,
    "cost_aware_sampling": True,
    "cost_draw_fraction": 0.7,
}


def cpu_grpo_kwargs(output_dir: str, **overrides) -> dict:
    """`CPU_BASE` for `output_dir`, with `overrides` on top."""
    return {"output_dir": output_dir, **CPU_BASE, **overrides}


def verifier_trainer(model_dir: str, train_ds, kwargs: dict):
    """`EfficientGRPOTrainer` on a float32 model folder with the task's verifier reward and `kwargs` as its config."""
    import torch
    from transformers import AutoModelForCausalLM

    from efficient_rlvr import EfficientGRPOConfig, EfficientGRPOTrainer
    from efficient_rlvr.rewards import verifier_reward
    from efficient_rlvr.run import load_tokenizer_for

    return EfficientGRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        reward_funcs=[verifier_reward],
        args=EfficientGRPOConfig(**kwargs),
        train_dataset=train_ds,
        processing_class=load_tokenizer_for(model_dir),
    )
