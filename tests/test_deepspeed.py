"""DeepSpeed ZeRO-2 and ZeRO-3 on CPU (DS_ACCELERATOR=cpu, gloo) with the methods on.

Each run is launched the way a user launches one: `accelerate launch --config_file accelerate_configs/zero{2,3}.yaml
--num_processes 1 --mixed_precision no` (the configs are written for GPUs; these flags adapt them to this machine,
and `use_cpu=True` in the training arguments puts DeepSpeed on its CPU accelerator). This file is also the worker
(`accelerate launch ... tests/test_deepspeed.py OUT MODEL USE_VLLM`). Three runs, side by side, 2 steps each with a
checkpoint after each step: ZeRO-2 and ZeRO-3 with a colocated vLLM and every method (HIVE selection, ARRoL pruning,
Cost-Aware sampling, the V0.5 baseline, HES selection), and ZeRO-3 with transformers generation and every method but
pruning (which needs vLLM). The worker writes what the tests check to OUT/result.pt:

- ZeRO is really on (ZeRO-3: every policy parameter is partitioned at rest), and the stages' extra policy forwards
  (prompt entropy, HES token entropies) see the complete weights: the values they computed during training equal a
  plain transformers model loaded from the consolidated checkpoint of the step before; training goes on after them
  (under ZeRO-3 a forward through DeepSpeed's hooks outside the training forward used to break TRL's fused LM-head
  loss: "The size of tensor a (0) must match ..." in the backward, or "Cannot partition a param in flight");
- vLLM generates from the gathered weights after the update (TRL's sampled-token log-prob difference);
- the pruning quality head (its own module and Adam, outside the DeepSpeed engine) is a plain, complete module,
  and `efficient_rlvr_state.pt` holds it whole;
- ZeRO-2 and ZeRO-3 agree on the first step (same data, same weights: same rewards, loss and gradient norm).

Two processes per stage were run by hand (see docs/scale_out.md): too slow for the suite on 2 cores.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys

import pytest
import torch

torch.set_num_threads(1)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 2
METHODS = dict(
    selection_history=True,
    selection_entropy=True,
    pruning=True,
    pruning_l_detect=8,
    pruning_cold_start_steps=1,
    pruning_gate_min_auc=0.0,
    cost_aware_sampling=True,
    budget_baseline=True,
    hes_selection=True,
)
# With transformers generation (pruning needs the colocated engine). Under ZeRO-3 this is the case where a stage
# forward through DeepSpeed's hooks broke TRL's fused LM-head loss on the next backward.
METHODS_WITHOUT_VLLM = {k: v for k, v in METHODS.items() if not k.startswith("pruning")}
# name -> (ZeRO stage, colocated vLLM)
RUNS = {"zero2": (2, True), "zero3": (3, True), "zero3_hf": (3, False)}


def _deepspeed_unavailable() -> str | None:
    """Why DeepSpeed cannot run here, or None. Checks the real conditions (package, CPU accelerator, compiler)."""
    if importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed (the 'deepspeed' extra: pip install 'efficient-rlvr[deepspeed]')"
    import shutil

    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler: DeepSpeed's CPU accelerator JIT-builds its shm_comm op at startup"
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Worker (runs under `accelerate launch`, one process).
def _worker(out_dir: str, model_dir: str, use_vllm: bool) -> None:
    from grpo_args import VLLM_COLOCATE, cpu_grpo_kwargs

    import efficient_rlvr.hes.stage as hes_stage
    import efficient_rlvr.selection.stage as selection_stage
    from efficient_rlvr import EfficientGRPOConfig, EfficientGRPOTrainer
    from efficient_rlvr.embedded import load_tokenizer
    from efficient_rlvr.rewards import verifier_reward
    from efficient_rlvr.tasks import load_task_splits

    train_ds, _ = load_task_splits("embedded", train_size=64, eval_size=8, seed=0)
    args = EfficientGRPOConfig(
        **cpu_grpo_kwargs(
            os.path.join(out_dir, "run"),
            per_device_train_batch_size=16,  # 4 prompts x 4 generations
            num_generations=4,
            max_completion_length=40,
            max_steps=STEPS,
            learning_rate=1e-3,
            lr_scheduler_type="constant",
            logging_steps=1,
            save_strategy="steps",
            save_steps=1,
            **(VLLM_COLOCATE | METHODS if use_vllm else METHODS_WITHOUT_VLLM),
        )
    )
    trainer = EfficientGRPOTrainer(
        model=model_dir,
        reward_funcs=[verifier_reward],
        args=args,
        train_dataset=train_ds,
        processing_class=load_tokenizer(model_dir),
    )
    policy = trainer.accelerator.unwrap_model(trainer.model)
    at_rest = [(n, getattr(p, "ds_numel", None), p.numel()) for n, p in policy.named_parameters()]

    # Record the inputs and outputs of the stages' policy forwards (the real functions run unchanged).
    calls: dict[str, list] = {"token_entropies": [], "prompt_entropy": []}

    def recording(name, fn):
        def wrapper(model, *tensors, **kwargs):
            result = fn(model, *tensors, **kwargs)
            calls[name].append(
                {"step": trainer.state.global_step, "inputs": [t.cpu() for t in tensors], "kwargs": kwargs}
                | {"result": result.cpu()}
            )
            return result

        return wrapper

    hes_stage.token_entropies = recording("token_entropies", hes_stage.token_entropies)
    selection_stage.prompt_entropy = recording("prompt_entropy", selection_stage.prompt_entropy)
    trainer.train()

    head = trainer.rollout_generation.head if use_vllm else torch.nn.Module()
    result = {
        "zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage,
        "policy_at_rest": at_rest,
        "head_params": {
            n: (hasattr(p, "ds_id"), tuple(p.shape), p.detach().cpu().clone()) for n, p in head.named_parameters()
        },
        "head_in_engine": any(p is q for p in head.parameters() for q in trainer.model_wrapped.parameters()),
        "log_history": trainer.state.log_history,
        "calls": calls,
    }
    if trainer.accelerator.is_main_process:
        torch.save(result, os.path.join(out_dir, "result.pt"))


# ---------------------------------------------------------------------------------------------------------------------
# Tests.
pytestmark = pytest.mark.skipif(_deepspeed_unavailable() is not None, reason=str(_deepspeed_unavailable()))


def _launch(stage: int, use_vllm: bool, out_dir: str, model_dir: str) -> subprocess.Popen:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        os.path.join(os.path.dirname(sys.executable), "accelerate"),
        "launch",
        "--config_file",
        os.path.join(REPO, "accelerate_configs", f"zero{stage}.yaml"),
        "--num_processes",
        "1",
        "--mixed_precision",
        "no",
        "--main_process_port",
        str(port),
        os.path.abspath(__file__),
        out_dir,
        model_dir,
        str(int(use_vllm)),
    ]
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "PYTHONPATH": os.path.join(REPO, "tests") + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    log = open(os.path.join(out_dir, "log.txt"), "w")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def runs(base_model_dir, tmp_path_factory) -> tuple[dict[str, tuple[str, dict]], dict[str, str]]:
    """The `RUNS`, launched side by side (each is one single-threaded process)."""
    dirs = {name: str(tmp_path_factory.mktemp(name)) for name in RUNS}
    procs = {name: _launch(*RUNS[name], dirs[name], base_model_dir) for name in RUNS}
    out, failed = {}, {}
    for name, proc in procs.items():
        proc.wait(timeout=900)
        if proc.returncode != 0:
            failed[name] = open(os.path.join(dirs[name], "log.txt")).read()[-6000:]
        else:
            out[name] = (dirs[name], torch.load(os.path.join(dirs[name], "result.pt"), weights_only=False))
    return out, failed


def _run(runs, name: str) -> tuple[str, dict]:
    out, failed = runs
    if name in failed:
        pytest.fail(f"the {name} run failed:\n{failed[name]}")
    return out[name]


def _step_logs(result: dict) -> list[dict]:
    return [h for h in result["log_history"] if "reward" in h]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_trains_every_method_under_zero(runs, name):
    stage, use_vllm = RUNS[name]
    _, result = _run(runs, name)
    assert result["zero_stage"] == stage
    partitioned = [ds_numel is not None and numel == 0 for _, ds_numel, numel in result["policy_at_rest"]]
    assert all(partitioned) if stage == 3 else not any(partitioned)
    logs = _step_logs(result)
    assert len(logs) == STEPS
    for key in ("selection/entropy_threshold", "budget/rollouts", "hes/scored_rollouts", "cost/draws"):
        assert key in logs[-1], key
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    if use_vllm:
        assert "pruning/keep_rate" in logs[-1]
        # vLLM sampled the second step after an update: its token log-probs match the trainer's (gathered sync).
        assert all(h["sampling/sampling_logp_difference/max"] < 1e-4 for h in logs)


@pytest.mark.slow
def test_zero2_and_zero3_agree_on_the_first_step(runs):
    first2, first3 = _step_logs(_run(runs, "zero2")[1])[0], _step_logs(_run(runs, "zero3")[1])[0]
    assert first2["reward"] == first3["reward"]
    for key in ("loss", "grad_norm", "hes/mean", "selection/entropy_threshold"):
        assert first3[key] == pytest.approx(first2[key], rel=1e-4, abs=1e-6), key


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_stage_forwards_see_the_complete_policy(runs, name):
    """The entropies the stages computed at step 2 equal a plain model loaded from checkpoint-1 (the weights then)."""
    from transformers import AutoModelForCausalLM

    from efficient_rlvr.hes.score import token_entropies
    from efficient_rlvr.selection.entropy import prompt_entropy

    out_dir, result = _run(runs, name)
    model = AutoModelForCausalLM.from_pretrained(os.path.join(out_dir, "run", "checkpoint-1"), dtype=torch.float32)
    for fn_name, fn in (("token_entropies", token_entropies), ("prompt_entropy", prompt_entropy)):
        calls = [c for c in result["calls"][fn_name] if c["step"] == 1]
        assert calls, fn_name
        for call in calls:
            expected = fn(model, *call["inputs"], **call["kwargs"])
            torch.testing.assert_close(call["result"], expected, rtol=0, atol=1e-4)
        first = [c for c in result["calls"][fn_name] if c["step"] == 0][0]  # before the update: differs from step 1
        assert (first["result"] - fn(model, *first["inputs"], **first["kwargs"])).abs().max() > 1e-4, fn_name


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_checkpoint_holds_the_complete_quality_head(runs, name):
    from efficient_rlvr.pruning.stage import quality_head_from_state
    from efficient_rlvr.trainer import COMPONENT_STATE_FILE

    out_dir, result = _run(runs, name)
    assert not result["head_in_engine"]
    assert result["head_params"]
    for _, (is_zero_param, shape, _) in result["head_params"].items():
        assert not is_zero_param and 0 not in shape  # a plain module: never partitioned, complete on every process
    checkpoint = os.path.join(out_dir, "run", f"checkpoint-{STEPS}")
    state = torch.load(os.path.join(checkpoint, COMPONENT_STATE_FILE), weights_only=False)
    assert set(state) == {
        "PromptSelectionStage",
        "PruningStage",
        "BudgetStage",
        "HESSelectionStage",
        "CostAwareStage",
    }
    head = quality_head_from_state(checkpoint)
    saved = dict(head.named_parameters())
    for param_name, (_, shape, live) in result["head_params"].items():
        assert tuple(saved[param_name].shape) == shape
        torch.testing.assert_close(saved[param_name].detach(), live, rtol=0, atol=0)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], bool(int(sys.argv[3])))
