"""Run records: every logged metric with its wall-clock time, written as JSONL/CSV, and a reward-vs-time plot.

`MetricsRecorder` is an ordinary `transformers.TrainerCallback`, so it works with `trl.GRPOTrainer` as well as with
`EfficientGRPOTrainer` (the benchmark records both the same way).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import time
from collections.abc import Sequence
from typing import Any

from transformers import TrainerCallback


class MetricsRecorder(TrainerCallback):
    """Keep every training log with `wall_time` (seconds since training began) and write it out on the main process.

    Args:
        output_dir: where `metrics.jsonl` and `metrics.csv` go (written after every log, so a killed run keeps them).
        print_progress: print one compact line per log (step, reward, seconds) for live progress.
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
            print(
                f"[step {state.global_step:>4}/{state.max_steps}] {record['wall_time']:7.1f}s  "
                f"reward {logs['reward']:.3f}  zero-std groups {logs.get('frac_reward_zero_std', float('nan')):.2f}  "
                f"completion len {logs.get('completions/mean_length', float('nan')):.1f}",
                flush=True,
            )

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


def plot_reward_vs_time(
    runs: dict[str, Sequence[dict[str, Any]]],
    path: str,
    title: str = "reward vs wall-clock",
    evals: dict[str, Sequence[tuple[float, float]]] | None = None,
) -> str:
    """Plot training reward (and optional held-out points `(seconds, accuracy)`) against wall-clock for each run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for index, (name, records) in enumerate(runs.items()):
        points = [(r["wall_time"], r["reward"]) for r in records if r.get("reward") is not None]
        color = f"C{index}"
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, color=color, alpha=0.35, linewidth=1)
            ax.plot(xs, _smooth(ys), color=color, linewidth=2, label=f"{name} (train reward, smoothed)")
        for seconds, accuracy in (evals or {}).get(name, []):
            ax.scatter([seconds], [accuracy], color=color, marker="o", edgecolor="black", zorder=3)
    if evals:
        ax.scatter([], [], color="white", edgecolor="black", label="held-out accuracy")
    ax.set_xlabel("wall-clock seconds")
    ax.set_ylabel("reward / accuracy")
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
