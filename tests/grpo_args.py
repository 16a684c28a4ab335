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
    "pruning_gate_min_auc": 0.0,  # prune from step 2 whatever the head ranks (the gate has its own tests)
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


def free_port() -> int:
    """A TCP port that is free right now on 127.0.0.1 (for a launcher's rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_cpu_processes(script: str, *args: str, timeout: int = 900):
    """`accelerate launch` `script args...` on two CPU processes (gloo, accelerate_configs/cpu_2proc.yaml) from the
    repository root; returns the `subprocess.CompletedProcess` (output captured as text).

    `--multi_gpu` is needed: with the config file alone accelerate 1.15 starts a single process on CPU. The children
    get their own rendezvous port and none of this process's MASTER_* / RANK variables (a colocated engine built here
    earlier sets them), one thread each, and the repository on PYTHONPATH.
    """
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    inherited = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    env = {k: v for k, v in os.environ.items() if k not in inherited}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([repo, env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    cmd += [os.path.join(repo, "accelerate_configs", "cpu_2proc.yaml"), "--multi_gpu"]
    cmd += ["--main_process_port", str(free_port()), str(script), *map(str, args)]
    return subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
