"""Data loading for RLVR training: reasoning-gym tasks generated locally, or any ``datasets`` dataset.

Every split returned here has a conversational ``prompt`` column (``[{"role": "user", "content": ...}]``, the format
TRL's GRPOTrainer applies the chat template to) plus the columns the rewards read:

- reasoning-gym rows: ``question`` (str), ``answer`` (str), ``task`` (the reasoning-gym task name) and ``metadata``
  (the entry's metadata as a JSON string, so :func:`efficient_rlvr.rewards.verifier_reward` can rebuild the entry
  and call the task's own ``score_answer``);
- other datasets: whatever columns they have (an ``answer`` column for
  :func:`efficient_rlvr.rewards.math_verify_reward`); a plain-string prompt column is wrapped as one user message.
  Train rows whose prompt equals an eval prompt are dropped.

The embedded default task is reasoning-gym ``chain_sum`` with 1-digit operands and 2-5 terms
(:data:`EMBEDDED_TASK_KWARGS`); it is what ``task="chain_sum"`` gives when no task options are passed, and it is
also addressable as the preset name ``"embedded"``.

Held-out splits: reasoning-gym items are a function of ``seed + index`` for most tasks, so train and eval are
generated from seed ranges that cannot overlap (eval starts at ``seed + EVAL_SEED_OFFSET``) and, in addition, every
train row whose question text equals an eval question is dropped and replaced by a fresh one, so no eval prompt is
ever seen in training. Repeats inside one split are kept (chain_sum has only 200 distinct 2-term problems, so a
split deduplicated within itself would under-represent short problems).
"""

from __future__ import annotations

import json
import os
from typing import Any

import datasets

# 1-digit operands (0-9), 2-5 terms, only + and -: learnable by a ~0.9M-parameter model on CPU.
EMBEDDED_TASK_KWARGS: dict[str, Any] = {
    "min_terms": 2,
    "max_terms": 5,
    "min_digits": 1,
    "max_digits": 1,
    "allow_negation": False,
}

# Named presets: name -> (reasoning-gym task, default task options).
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "embedded": ("chain_sum", EMBEDDED_TASK_KWARGS),
    "chain_sum": ("chain_sum", EMBEDDED_TASK_KWARGS),
}

# Eval items are generated from seed + EVAL_SEED_OFFSET (train from seed): disjoint index ranges for
# train_size < EVAL_SEED_OFFSET.
EVAL_SEED_OFFSET = 100_000_000


def chain_sum_solution(expression: str) -> str:
    """Running-sum chain of thought for a chain_sum expression, ending in an ``Answer:`` line.

    ``"3 + 4 - 9"`` -> ``"3+4=7\\n7-9=-2\\nAnswer: -2"``; a single term gives ``"Answer: <term>"``.
    """
    parts = expression.replace("=", "").split()
    if len(parts) == 0 or len(parts) % 2 == 0:
        raise ValueError(f"expression must alternate terms and +/- operators, got {expression!r}")
    total = int(parts[0])
    lines = []
    for i in range(1, len(parts), 2):
        op, term = parts[i], int(parts[i + 1])
        if op not in ("+", "-"):
            raise ValueError(f"expression operators must be + or -, got {op!r} in {expression!r}")
        new_total = total + term if op == "+" else total - term
        lines.append(f"{total}{op}{term}={new_total}")
        total = new_total
    lines.append(f"Answer: {total}")
    return "\n".join(lines)


def resolve_task(task: str, task_kwargs: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """Map a task or preset name plus options to ``(reasoning_gym_task_name, options)``.

    Preset options are defaults that explicitly passed options override.
    """
    import reasoning_gym.factory

    task_kwargs = dict(task_kwargs or {})
    if task in PRESETS:
        name, defaults = PRESETS[task]
        return name, {**defaults, **task_kwargs}
    if task not in reasoning_gym.factory.DATASETS:
        known = sorted(set(PRESETS) | set(reasoning_gym.factory.DATASETS))
        raise ValueError(f"task {task!r} is not a preset or reasoning-gym task; known: {', '.join(known)}")
    return task, task_kwargs


def is_reasoning_gym_task(name: str) -> bool:
    """True if ``name`` is a preset name or a registered reasoning-gym task."""
    import reasoning_gym.factory

    return name in PRESETS or name in reasoning_gym.factory.DATASETS


def _rg_rows(task: str, size: int, seed: int, task_kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    import reasoning_gym

    name, options = resolve_task(task, task_kwargs)
    generator = reasoning_gym.create_dataset(name, size=size, seed=seed, **options)
    rows = []
    for entry in generator:
        rows.append(
            {
                "prompt": [{"role": "user", "content": entry["question"]}],
                "question": entry["question"],
                "answer": str(entry["answer"]),
                "task": name,
                "metadata": json.dumps(entry["metadata"], sort_keys=True, default=str),
            }
        )
    return rows


def make_reasoning_gym_dataset(task: str, size: int, seed: int, **task_kwargs: Any) -> datasets.Dataset:
    """Generate ``size`` reasoning-gym items locally as a ``datasets.Dataset``.

    Args:
        task: reasoning-gym task name (e.g. ``"chain_sum"``) or a preset name (``"embedded"``).
        size: number of rows (> 0).
        seed: generator seed (reasoning-gym items are deterministic given seed and index).
        **task_kwargs: the task's config options (e.g. ``min_terms=2``); override preset defaults.

    Returns:
        Columns ``prompt`` (conversational), ``question``, ``answer``, ``task``, ``metadata`` (JSON string).
    """
    if size <= 0:
        raise ValueError(f"size must be > 0, got {size}")
    return datasets.Dataset.from_list(_rg_rows(task, size, seed, task_kwargs))


def _to_conversational(value: Any, column: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise ValueError(
        f"prompt column {column!r} must hold strings or lists of {{'role', 'content'}} messages, got {type(value)}"
    )


def _is_packaged_builder(name: str) -> bool:
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    return name in _PACKAGED_DATASETS_MODULES


def _load_any(name_or_path: str, **load_kwargs: Any) -> datasets.Dataset | datasets.DatasetDict:
    saved = ("dataset_info.json", "dataset_dict.json", "state.json")
    if os.path.isdir(name_or_path) and any(os.path.exists(os.path.join(name_or_path, f)) for f in saved):
        return datasets.load_from_disk(name_or_path)
    return datasets.load_dataset(name_or_path, **load_kwargs)


def _prepare_external(ds: datasets.Dataset, prompt_column: str, size: int | None, seed: int, what: str):
    if prompt_column not in ds.column_names:
        raise ValueError(f"prompt_column {prompt_column!r} not found in the {what} split; columns: {ds.column_names}")
    if len(ds) == 0:
        raise ValueError(f"the {what} split is empty")
    if size is not None and size < len(ds):
        ds = ds.shuffle(seed=seed).select(range(size))

    def convert(row: dict[str, Any]) -> dict[str, Any]:
        return {"prompt": _to_conversational(row[prompt_column], prompt_column)}

    if prompt_column != "prompt" and "prompt" in ds.column_names:
        ds = ds.remove_columns("prompt")
    return ds.map(convert, remove_columns=[prompt_column] if prompt_column != "prompt" else None)


def load_task_splits(
    name_or_path: str | datasets.Dataset | datasets.DatasetDict = "embedded",
    train_size: int | None = 5000,
    eval_size: int | None = 400,
    seed: int = 0,
    prompt_column: str = "prompt",
    train_split: str = "train",
    eval_split: str | None = "test",
    task_kwargs: dict[str, Any] | None = None,
    **load_kwargs: Any,
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Return ``(train, eval)`` datasets with a conversational ``prompt`` column.

    Args:
        name_or_path: a preset (``"embedded"``), a reasoning-gym task name (generated locally), a Hub dataset name,
            a local path (``datasets.load_from_disk`` folder, or anything ``datasets.load_dataset`` accepts), or an
            in-memory ``Dataset`` / ``DatasetDict``.
        train_size: rows in the train split (reasoning-gym: exactly this many, ``None`` means 5000; external: at most
            this many, a seeded shuffle picks them, ``None`` keeps all).
        eval_size: rows in the held-out split, same rules (reasoning-gym ``None`` means 400).
        seed: generation / shuffling seed. Reasoning-gym eval rows come from ``seed + EVAL_SEED_OFFSET``.
        prompt_column: column holding the prompt in an external dataset (strings or message lists).
        train_split, eval_split: split names of an external dataset; if ``eval_split`` is ``None`` or missing, the
            held-out rows are split off the train split (``eval_size`` rows, or 10% when ``eval_size`` is None).
        task_kwargs: reasoning-gym task options (override preset defaults).
        **load_kwargs: passed to ``datasets.load_dataset`` (e.g. ``name=...`` for a config).

    Raises:
        ValueError: unknown task / missing prompt column / empty split / non-positive sizes.
    """
    for arg, value in (("train_size", train_size), ("eval_size", eval_size)):
        if value is not None and value <= 0:
            raise ValueError(f"{arg} must be > 0 or None, got {value}")

    if isinstance(name_or_path, datasets.Dataset | datasets.DatasetDict):
        loaded = name_or_path
        name_or_path = "<in-memory dataset>"
    elif is_reasoning_gym_task(name_or_path):
        return _rg_splits(name_or_path, train_size or 5000, eval_size or 400, seed, task_kwargs or {})
    else:
        loaded = _load_path_or_hub(name_or_path, **load_kwargs)
    return _external_splits(loaded, name_or_path, train_size, eval_size, seed, prompt_column, train_split, eval_split)


def _load_path_or_hub(name_or_path: str, **load_kwargs: Any) -> datasets.Dataset | datasets.DatasetDict:
    if not os.path.exists(name_or_path) and "/" not in name_or_path and not _is_packaged_builder(name_or_path):
        # Not a path, not a Hub-style "owner/name", not "json"/"csv"/...: most likely a misspelt task.
        resolve_task(name_or_path)  # raises ValueError listing the known tasks
    try:
        return _load_any(name_or_path, **load_kwargs)
    except (FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as err:
        raise ValueError(
            f"name_or_path {name_or_path!r} is neither a reasoning-gym task nor a loadable dataset: {err}"
        ) from err


def _external_splits(
    loaded: datasets.Dataset | datasets.DatasetDict,
    name_or_path: str,
    train_size: int | None,
    eval_size: int | None,
    seed: int,
    prompt_column: str,
    train_split: str,
    eval_split: str | None,
) -> tuple[datasets.Dataset, datasets.Dataset]:
    if isinstance(loaded, datasets.DatasetDict):
        if train_split not in loaded:
            raise ValueError(f"train_split {train_split!r} not in {name_or_path!r}; available: {list(loaded)}")
        train = loaded[train_split]
        evaluation = loaded[eval_split] if eval_split is not None and eval_split in loaded else None
    else:
        train, evaluation = loaded, None
    if len(train) == 0:
        raise ValueError(f"the train split {train_split!r} of {name_or_path!r} is empty")
    if evaluation is None:
        n_eval = eval_size if eval_size is not None else max(1, len(train) // 10)
        if n_eval >= len(train):
            raise ValueError(f"eval_size {n_eval} leaves no train rows (train split has {len(train)} rows)")
        parts = train.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
        train, evaluation = parts["train"], parts["test"]
    evaluation = _prepare_external(evaluation, prompt_column, eval_size, seed, "eval")
    train = _prepare_external(train, prompt_column, None, seed, "train")
    # Drop train rows whose prompt is also an eval prompt, then cut to train_size.
    held_out = {json.dumps(p, sort_keys=True) for p in evaluation["prompt"]}
    train = train.filter(lambda row: json.dumps(row["prompt"], sort_keys=True) not in held_out)
    if len(train) == 0:
        raise ValueError(f"no train rows of {name_or_path!r} remain after removing the eval prompts")
    if train_size is not None and train_size < len(train):
        train = train.shuffle(seed=seed).select(range(train_size))
    return train, evaluation


def _rg_splits(
    task: str, train_size: int, eval_size: int, seed: int, task_kwargs: dict[str, Any]
) -> tuple[datasets.Dataset, datasets.Dataset]:
    if train_size >= EVAL_SEED_OFFSET:
        raise ValueError(f"train_size must be < {EVAL_SEED_OFFSET}, got {train_size}")
    eval_rows = _rg_rows(task, eval_size, seed + EVAL_SEED_OFFSET, task_kwargs)
    held_out = {row["question"] for row in eval_rows}
    train_rows: list[dict[str, Any]] = []
    next_seed, want = seed, train_size
    # Draw in chunks of consecutive seeds until train_size rows that are not eval questions are collected.
    for _ in range(1000):
        chunk = _rg_rows(task, want, next_seed, task_kwargs)
        next_seed += want
        train_rows.extend(row for row in chunk if row["question"] not in held_out)
        if len(train_rows) >= train_size:
            break
        want = max(train_size - len(train_rows), 16)
    else:
        raise ValueError(f"task {task!r} with {task_kwargs} cannot give {train_size} rows disjoint from eval")
    train_rows = train_rows[:train_size]
    return datasets.Dataset.from_list(train_rows), datasets.Dataset.from_list(eval_rows)
