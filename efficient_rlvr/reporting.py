"""Run records: every logged metric with its wall-clock time, written as JSONL/CSV, a compact console line per
step, and an accuracy-vs-time plot.

`MetricsRecorder` is an ordinary `transformers.TrainerCallback`, so it works with `trl.GRPOTrainer` as well as with
`EfficientGRPOTrainer` (the benchmark records both the same way). `use_compact_console` replaces transformers'
progress callback, which prints every log's full metric dict, by one that keeps the progress bar and prints one
line per step (`step_line`); the full dicts go to `metrics.jsonl` only.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

# (metric key, label, format) of the optional parts of the console line, in pipeline order; shown when logged.
STEP_LINE_EXTRAS = (
    ("selection/skipped_easy", "skipped easy", "{:.0f}"),
    ("selection/skipped_hard", "skipped hard", "{:.0f}"),
    ("pruning/pruned_fraction", "pruned", "{:.2f}"),
    ("pruning/gated", "pruning gated", "{:.0f}"),
    ("cost/zero_adv_rows_skipped", "zero-adv rows skipped", "{:.0f}"),
    ("cost/draws", "draws", "{:.0f}"),
    ("budget/rollouts", "rollouts", "{:.0f}"),
    ("hes/kept_fraction", "hes kept", "{:.2f}"),
)


def step_line(record: dict[str, Any], max_steps: int) -> str:
    """One console line for a training log: step, training seconds, reward and zero-variance share of the scored
    rollouts, completion length, loss, and what each method did (when it logged it)."""
    parts = [f"[step {record.get('step', 0):>4}/{max_steps}]", f"{record.get('wall_time', float('nan')):7.1f}s"]
    for key, label, fmt in (
        ("reward", "reward", "{:.3f}"),
        ("frac_reward_zero_std", "zero-std groups", "{:.2f}"),
        ("completions/mean_length", "len", "{:.1f}"),
        ("loss", "loss", "{:.4f}"),
        *STEP_LINE_EXTRAS,
    ):
        value = record.get(key)
        if isinstance(value, int | float):
            parts.append(f"{label} {fmt.format(value)}")
    return "  ".join(parts)


class MetricsRecorder(TrainerCallback):
    """Keep every training log with `wall_time` (seconds since training began) and write it out on the main process.

    Args:
        output_dir: where `metrics.jsonl` and `metrics.csv` go (written after every log, so a killed run keeps them).
        print_progress: print `step_line` per training log (off when `use_compact_console` prints it instead).
    """

    def __init__(self, output_dir: str, print_progress: bool = True):
        self.output_dir = output_dir
        self.print_progress = print_progress
        self.records: list[dict[str, Any]] = []
        self._start: float | None = None
        self.paused_seconds = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def training_seconds(self) -> float:
        """Seconds since training began, without the time spent in `paused()` blocks (held-out evaluations)."""
        return 0.0 if self._start is None else time.perf_counter() - self._start - self.paused_seconds

    @contextlib.contextmanager
    def paused(self):
        """Stop the training clock inside the block (so periodic evaluations do not count as training time)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.paused_seconds += time.perf_counter() - start

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or self._start is None:
            return
        record = {"step": state.global_step, "wall_time": self.training_seconds(), **logs}
        self.records.append(record)
        self._write()
        if self.print_progress and "reward" in logs:
            print(step_line(record, state.max_steps), flush=True)

    def _write(self) -> None:
        os.makedirs(self.output_dir, exist_ok=True)
        with open(os.path.join(self.output_dir, "metrics.jsonl"), "w") as f:
            for record in self.records:
                f.write(json.dumps(record) + "\n")
        keys = sorted(
            {key for record in self.records for key in record}, key=lambda k: (k not in ("step", "wall_time"), k)
        )
        with open(os.path.join(self.output_dir, "metrics.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.records)


class _CompactProgress(ProgressCallback):
    """transformers' progress bar, with `step_line` under it instead of each log's full metric dict."""

    def __init__(self, recorder: MetricsRecorder, bar: bool):
        super().__init__()
        self.recorder = recorder
        self.bar = bar

    def on_train_begin(self, args, state, control, **kwargs):
        if self.bar:
            super().on_train_begin(args, state, control, **kwargs)
        self.current_step = 0

    def on_step_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            super().on_step_end(args, state, control, **kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            super().on_train_end(args, state, control, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "reward" not in logs:
            return
        record = self.recorder.records[-1] if self.recorder.records else {"step": state.global_step, **logs}
        line = step_line(record, state.max_steps)
        if self.training_bar is not None:
            self.training_bar.write(line)
        else:
            print(line, flush=True)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if self.bar:
            super().on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kwargs)


def use_compact_console(trainer: Any, recorder: MetricsRecorder) -> None:
    """Replace the trainer's progress/printer callback by a progress bar (unless ``disable_tqdm``) and one
    `step_line` per training log; every metric still reaches `recorder` (metrics.jsonl) and the trackers."""
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    recorder.print_progress = False
    # after the recorder, so that the line shows the record it has just written (its training clock)
    trainer.add_callback(_CompactProgress(recorder, bar=not trainer.args.disable_tqdm))


class StopAfterSeconds(TrainerCallback):
    """End training after the optimizer step at which `recorder`'s training clock (evaluations excluded) reaches
    `seconds`; `max_steps` still applies. The benchmark runs faster variants to vanilla's wall-clock this way.

    `seconds` may be a callable returning the limit, or None while it is not known yet (`after_run`: the limit is
    another run's training seconds once that run has finished)."""

    def __init__(self, recorder: MetricsRecorder, seconds: float | Callable[[], float | None]):
        if not callable(seconds) and not seconds > 0:
            raise ValueError(f"max_train_seconds must be > 0, got {seconds}.")
        self.recorder = recorder
        fixed = None if callable(seconds) else float(seconds)
        self.limit: Callable[[], float | None] = seconds if fixed is None else lambda: fixed

    def on_step_end(self, args, state, control, **kwargs):
        # The main process's clock decides for every process (evaluations pause it on the main process only).
        from accelerate import PartialState
        from accelerate.utils import broadcast

        state_ = PartialState()
        limit = self.limit()
        passed = limit is not None and self.recorder.training_seconds() >= limit
        stop = torch.tensor([float(passed)], device=state_.device)
        if state_.num_processes > 1:
            stop = broadcast(stop, from_process=0)
        if bool(stop.item()):
            control.should_training_stop = True


def after_run(summary_path: str, margin: float) -> Callable[[], float | None]:
    """A `StopAfterSeconds` limit: `margin` x the training seconds of the run whose `summary.json` is
    `summary_path`, once that file exists (None until then). The benchmark's variants stop this way a little after
    the vanilla run that trains beside them has finished."""
    if not margin > 0:
        raise ValueError(f"stop_after_run_margin must be > 0, got {margin}.")
    known: list[float] = []

    def limit() -> float | None:
        if not known and os.path.exists(summary_path):
            try:
                with open(summary_path) as f:
                    known.append(float(json.load(f)["train_seconds"]) * margin)
            except (OSError, ValueError, KeyError):  # being written: read it at the next step
                return None
        return known[0] if known else None

    return limit


class PeriodicEvaluation(TrainerCallback):
    """Run `evaluate()` every `every_steps` optimizer steps with the recorder's clock paused; keep the curve.

    `curve` holds `(training_seconds, step, accuracy)` points (main process only; `evaluate` returns a dict with an
    ``accuracy`` key, or an empty dict on other processes); the benchmark reads the time to a target accuracy off it.
    """

    def __init__(self, evaluate: Any, recorder: MetricsRecorder, every_steps: int):
        if every_steps < 1:
            raise ValueError(f"every_steps must be >= 1, got {every_steps}.")
        self.evaluate = evaluate
        self.recorder = recorder
        self.every_steps = every_steps
        self.curve: list[tuple[float, int, float]] = []

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every_steps or state.global_step == state.max_steps:
            return  # the final evaluation is the caller's
        with self.recorder.paused():
            result = self.evaluate()
        if "accuracy" in result:
            self.curve.append((self.recorder.training_seconds(), state.global_step, float(result["accuracy"])))
            print(
                f"[step {state.global_step:>4}/{state.max_steps}] held-out accuracy {result['accuracy']:.3f} "
                f"at {self.curve[-1][0]:.1f}s of training",
                flush=True,
            )


def plot_reward_vs_time(
    runs: dict[str, Sequence[dict[str, Any]]],
    path: str,
    title: str = "held-out accuracy and train reward vs wall-clock",
    evals: dict[str, Sequence[tuple[float, float]]] | None = None,
) -> str:
    """Plot held-out accuracy `(seconds, accuracy)` (the line that says whether training works) and the smoothed
    train reward of the scored rollouts against wall-clock training seconds, for each run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for index, (name, records) in enumerate(runs.items()):
        color = f"C{index}"
        curve = sorted((evals or {}).get(name, []))
        if curve:
            xs, ys = zip(*curve, strict=True)
            ax.plot(
                xs,
                ys,
                color=color,
                marker="o",
                markeredgecolor="black",
                linewidth=2.2,
                label=f"{name}: held-out accuracy",
            )
        points = [(r["wall_time"], r["reward"]) for r in records if r.get("reward") is not None]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(
                xs,
                _smooth(ys),
                color=color,
                linewidth=1,
                linestyle="--",
                alpha=0.7,
                label=f"{name}: train reward (scored rollouts, smoothed)",
            )
    ax.set_xlabel("training seconds (evaluation excluded)")
    ax.set_ylabel("accuracy / reward")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _smooth(values: Sequence[float], window: int = 9) -> list[float]:
    """Trailing moving average (the first points average over what exists)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out
