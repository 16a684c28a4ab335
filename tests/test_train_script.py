"""The training script end to end: accelerate launch + YAML recipe + CLI overrides, vLLM colocate, outputs on disk."""

import json
import os
import subprocess
import sys

import pytest
from trl import ModelConfig

from efficient_rlvr import EfficientGRPOConfig
from efficient_rlvr.run import RunArguments, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_accelerate_launch_default_recipe_writes_model_metrics_and_plot(tmp_path):
    out = tmp_path / "run"
    cmd = [
        os.path.join(os.path.dirname(sys.executable), "accelerate"),
        "launch",
        "--config_file",
        os.path.join(ROOT, "accelerate_configs", "cpu_1proc.yaml"),
        os.path.join(ROOT, "examples", "train_grpo.py"),
        "--config",
        os.path.join(ROOT, "examples", "recipes", "default.yaml"),
        # CLI overrides the recipe: a few small steps
        "--max_steps=2",
        "--train_size=64",
        "--eval_size=8",
        "--eval_samples=1",
        "--per_device_train_batch_size=16",
        "--gradient_accumulation_steps=1",
        "--num_generations=4",
        "--eval_every_steps=1",
        f"--output_dir={out}",
    ]
    # In-process vLLM engines of earlier tests leave MASTER_PORT etc. pointing at this process's own rendezvous.
    dist_vars = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in dist_vars} | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "held-out accuracy before training" in result.stdout
    assert "[step    2/2]" in result.stdout  # live progress: one compact line per step ...
    assert "{'loss'" not in result.stdout and "'reward':" not in result.stdout  # ... not the full metric dicts
    assert "[step    1/2] held-out accuracy" in result.stdout  # measured along the way
    assert "vanilla trl.GRPOTrainer, methods-off recipe (docs/bench/bench.json" in result.stdout
    # TRL's known vLLM version notice is filtered (it was printed six times); other warnings are not
    assert "TRL currently supports vLLM versions" not in result.stderr
    assert "Warning" in result.stderr
    for name in (
        "model.safetensors",
        "config.json",
        "metrics.jsonl",
        "metrics.csv",
        "summary.json",
        "reward_vs_time.png",
    ):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2
    assert summary["rollouts_generated"] == 2 * 16  # 2 steps x 4 prompts x 4 generations
    assert 0.0 <= summary["eval_after"]["accuracy"] <= 1.0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step_records = [r for r in records if "reward" in r]
    assert len(step_records) == 2
    assert all(r["time/generation"] > 0 and r["time/update"] > 0 for r in step_records)
    assert step_records[-1]["sampling/sampling_logp_difference/max"] < 1e-4  # vLLM synced, float32
    # work counts per phase (the benchmark's GPU projection reads them)
    work = summary["work"]
    assert work["decode_tokens"] == summary["tokens_generated"] > 0
    assert 0 < work["decode_steps"] <= 2 * 48  # the longest completion of each of 2 generation calls, <= max length
    assert work["logprob_tokens"] > work["decode_tokens"]  # old log-probs (vLLM IS correction): prompt + completion
    assert work["update_tokens"] > summary["loss_tokens"]  # the loss forward sees prompt + completion tokens
    assert sum(r["work/decode_tokens"] for r in step_records) == work["decode_tokens"]


@pytest.mark.parametrize(
    ("run_kwargs", "match"),
    [
        ({"reward": "partial_credit"}, "reward must be one of"),
        ({"dataset_name": "no_such_task"}, "no_such_task"),
        ({"trainer": "verl"}, "trainer must be"),
    ],
)
def test_bad_run_arguments_fail_before_training(run_kwargs, match, tmp_path):
    args = EfficientGRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none")
    with pytest.raises(ValueError, match=match):
        train(RunArguments(**run_kwargs), args, ModelConfig(model_name_or_path="embedded"))
