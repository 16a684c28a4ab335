"""`make bench`: vanilla `trl.GRPOTrainer` against `EfficientGRPOTrainer` variants on the same recipe and seeds.

Each (variant, seed) runs `examples/train_grpo.py` in its own process (a fresh vLLM engine and a clean clock), with
the recipe plus the variant's flags. Vanilla TRL runs with only the CPU-safe vLLM weight sync added (TRL's own sync
fails on vLLM-CPU; see `efficient_rlvr.generation`). Written to `--output_dir`:

- `bench.json`: machine, package versions, and per run: held-out accuracy before/after, seconds, seconds per step,
  time per phase (generation, reward, log-probs, update), rollouts and tokens generated, mean share of
  zero-variance groups, and the logged metrics of each method's namespace;
- `reward_vs_time.png`, `phases.png`.

Usage: `python -m efficient_rlvr.bench [--variants trl,efficient] [--seeds 0,1,2] [--max_steps N]`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from typing import Any

from .reporting import plot_reward_vs_time

# variant name -> flags added to the recipe. Each method adds its variant here.
VARIANTS: dict[str, list[str]] = {
    "trl": ["--trainer", "trl"],
    "efficient": ["--trainer", "efficient"],
    # HIVE: history sampler + entropy median filter (SPEC defaults: keep ratio 0.5, so 2B candidates per step go
    # through one prompt-only forward pass); the optimizer still gets the recipe's prompts x 8 rollouts per step.
    "hive": ["--trainer", "efficient", "--selection_history", "true", "--selection_entropy", "true"],
    # DAPO dynamic sampling: zero-variance groups dropped after scoring, refilled for up to 3 extra rounds.
    "dynamic_sampling": ["--trainer", "efficient", "--dynamic_sampling", "true"],
    # Cost-Aware GRPO: 180 draws = 70% of the default recipe's 256 rollouts per step (128 x gradient accumulation 2).
    # Zero-variance groups carry no policy gradient (30-44% of groups on this task, notes/embedded-default.md), so
    # ~70% draws keep about as many gradient-carrying terms as vanilla while p ~ |A|/sqrt(c) skips the inert ones;
    # with M = N draws the saving would come only from preferring short rollouts (a few % here: lengths vary little).
    "cost_aware": ["--trainer", "efficient", "--cost_aware_sampling", "true", "--cost_num_draws", "180"],
    # V0.5: k_init = num_generations = 4 rollouts for the same 32 prompts per step as the recipe (64 x gradient
    # accumulation 2 = 128 first-round rows), then "rollout more" up to k_max 16 (defaults); mean k was ~8-9 in a
    # pilot, i.e. about the recipe's 8 rollouts per prompt.
    "v05": [
        "--trainer",
        "efficient",
        "--budget_baseline",
        "true",
        "--budget_adaptive",
        "true",
        "--num_generations",
        "4",
        "--per_device_train_batch_size",
        "64",
    ],
    # HES Pos-High / Neg-Rand: the recipe's rollouts, half of each group's correct / incorrect ones kept for the loss.
    "hes": ["--trainer", "efficient", "--hes_selection", "true"],
    # ARRoL: completions here are ~10-45 tokens (not ~thousands), so L_detect is 12 instead of 512 (about a third of
    # the generated tokens lie past it); a 5-step cold start instead of 20 leaves most of a short run pruned. The
    # final checkpoint (head included) is kept for examples/eval_vote.py (one save at the end of training).
    "arrol": [
        "--trainer",
        "efficient",
        "--pruning",
        "true",
        "--pruning_l_detect",
        "12",
        "--pruning_cold_start_steps",
        "5",
        "--save_strategy",
        "steps",
        "--save_steps",
        "1000000",
    ],
    # The same pruning at the same keep rate (kappa 0.5 of the rollouts reaching L_detect), survivors chosen at random.
    "random_prune": [
        "--trainer",
        "efficient",
        "--pruning",
        "true",
        "--pruning_mode",
        "random",
        "--pruning_l_detect",
        "12",
        "--pruning_cold_start_steps",
        "5",
    ],
}
PACKAGES = ("torch", "trl", "transformers", "vllm-cpu", "accelerate", "reasoning-gym", "efficient_rlvr")


def run_one(recipe: str, variant: str, seed: int, output_dir: str, extra: list[str]) -> dict[str, Any]:
    """Train one (variant, seed) in a subprocess and return its summary with its metric records."""
    run_dir = os.path.join(output_dir, f"{variant}-seed{seed}")
    script = os.path.join(os.path.dirname(os.path.abspath(recipe)), "..", "train_grpo.py")
    cmd = [sys.executable, script, "--config", recipe, "--output_dir", run_dir, "--seed", str(seed)]
    cmd += VARIANTS[variant] + extra
    print(f"== {variant} seed {seed}: {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    summary.update(variant=variant, seed=seed, process_seconds=time.perf_counter() - start, records=records)
    return summary


def summarize(run: dict[str, Any]) -> dict[str, Any]:
    """The figures of one run that go into bench.json (records are reduced to means and the curve)."""
    records = [r for r in run["records"] if "reward" in r]
    steps = max(len(records), 1)
    namespaced = {}
    for record in records[-1:]:
        namespaced = {k: v for k, v in record.items() if k.split("/")[0] in NAMESPACES}
    return {
        "variant": run["variant"],
        "seed": run["seed"],
        "steps": run["steps"],
        "train_seconds": run["train_seconds"],
        "seconds_per_step": run["seconds_per_step"],
        "phase_seconds_per_step": {k: v / steps for k, v in run["phase_seconds"].items()},
        "rollouts_generated": run["rollouts_generated"],
        "tokens_generated": run["tokens_generated"],
        "frac_reward_zero_std": sum(r.get("frac_reward_zero_std", 0.0) for r in records) / steps,
        "eval_accuracy_before": run["eval_before"].get("accuracy"),
        "eval_accuracy_after": run["eval_after"].get("accuracy"),
        "final_method_metrics": namespaced,
        "reward_curve": [(r["wall_time"], r["reward"]) for r in records],
    }


NAMESPACES = ("selection", "pruning", "cost", "budget", "hes")


def plot_phases(results: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['variant']}\nseed {r['seed']}" for r in results]
    fig, ax = plt.subplots(figsize=(max(4, 1.3 * len(results)), 4))
    bottom = [0.0] * len(results)
    for i, phase in enumerate(("generation", "reward", "logprobs", "update")):
        values = [r["phase_seconds_per_step"].get(phase, 0.0) for r in results]
        ax.bar(labels, values, bottom=bottom, label=phase, color=f"C{i}")
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_ylabel("seconds per step")
    ax.set_title("time per phase")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="examples/recipes/default.yaml")
    parser.add_argument("--variants", default="trl,efficient", help=f"comma-separated, from {sorted(VARIANTS)}")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds")
    parser.add_argument("--max_steps", type=int, default=None, help="override the recipe's max_steps")
    parser.add_argument("--output_dir", default="outputs/bench")
    args, passthrough = parser.parse_known_args(argv)

    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {sorted(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if not os.path.exists(args.recipe):
        raise SystemExit(f"--recipe: {args.recipe} does not exist")
    extra = passthrough + (["--max_steps", str(args.max_steps)] if args.max_steps else [])

    os.makedirs(args.output_dir, exist_ok=True)
    runs = [run_one(args.recipe, v, s, args.output_dir, extra) for v in variants for s in seeds]
    results = [summarize(run) for run in runs]
    record = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "packages": {name: _version(name) for name in PACKAGES},
        "recipe": args.recipe,
        "extra_flags": extra,
        "results": results,
    }
    with open(os.path.join(args.output_dir, "bench.json"), "w") as f:
        json.dump(record, f, indent=2)
    plot_reward_vs_time(
        {f"{r['variant']} s{r['seed']}": r["records"] for r in runs},
        os.path.join(args.output_dir, "reward_vs_time.png"),
        evals={
            f"{r['variant']} s{r['seed']}": [(r["train_seconds"], r["eval_after"]["accuracy"])]
            for r in runs
            if "accuracy" in r["eval_after"]
        },
    )
    plot_phases(results, os.path.join(args.output_dir, "phases.png"))
    for r in results:
        print(
            f"{r['variant']:>12} seed {r['seed']}: {r['seconds_per_step']:.2f} s/step, "
            f"held-out {r['eval_accuracy_before']:.3f} -> {r['eval_accuracy_after']:.3f}, "
            f"rollouts {r['rollouts_generated']}, zero-std groups {r['frac_reward_zero_std']:.2f}"
        )
    return record


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
