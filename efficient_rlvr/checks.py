"""Bad input and faults: reward functions that fail, non-finite rewards, datasets that cannot be trained on.

Reward functions (`RewardGuard`, used by `EfficientGRPOTrainer._calculate_rewards`). TRL 1.16.0 calls every reward
function once per generation batch on each process and then all-gathers the rewards. If one process's function raises
(or TRL's own length check raises there), that process stops while the others wait in the gather: a hang, or an error
on one rank only. The guard wraps each callable reward function for the duration of the call:

- an exception, a result of the wrong length, a result that is not a list of numbers / None: the wrapper records the
  fault and returns a placeholder so TRL reaches its gather on every process; then every process all-gathers a small
  status tensor (one extra collective per generation batch) and, if any process had a fault, every process raises the
  same `RewardFunctionError` naming the function (TRL's name: ``__name__`` or the class name), the offending
  completion row of the generation batch (global index, process and local row) and its prompt. To find the row after
  a batched call failed, the function is called again on single rows, in order, until one fails (the fault's own
  process only; the original exception is chained as ``__cause__`` there). A wrong-length batch whose single rows all
  succeed is reported without a row.
- NaN or +-inf rewards become None (TRL's "no reward": NaN in ``rewards_per_func``, skipped by its ``nansum`` /
  ``nanmean``), with one warning per function, and are counted: ``rewards/nonfinite`` (non-finite rewards since the
  previous training log, all processes) and ``rewards/nonfinite_total`` (since the trainer was built; not restored on
  resume). Reward models (``nn.Module``) are not wrapped; their non-finite outputs are counted and replaced by NaN on
  the gathered tensor.

Datasets (`check_prompt_dataset`, run by `check_training_setup` at the end of the trainer's ``__init__`` and by
`efficient_rlvr.run` before the model is loaded): a missing prompt column, an empty split, a prompt that cannot be
tokenized, and prompts too long for the model (longest tokenized prompt + ``max_completion_length`` >
``max_position_embeddings``, or > ``vllm_max_model_length`` when a colocated vLLM engine is capped) raise ValueError
naming the dataset, the column and the row index. Cost: a map-style dataset of up to `FULL_CHECK_ROWS` rows is
tokenized entirely, in batches; a larger one is ranked by prompt length in characters (vectorised over the Arrow
column) and only its `LONGEST_ROWS_CHECKED` longest prompts are tokenized (a token count can in principle peak
outside them; without an Arrow column, a seeded sample of `FULL_CHECK_ROWS` rows is tokenized instead). An
`IterableDataset` (streaming) is checked only for its prompt column, from its declared features, when it has any.
The checks are deterministic, so every process raises the same error.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "FULL_CHECK_ROWS",
    "LONGEST_ROWS_CHECKED",
    "RewardFunctionError",
    "RewardGuard",
    "check_prompt_dataset",
    "check_training_setup",
    "model_max_positions",
    "pop_reward_metrics",
    "reward_guard",
]

# Map-style datasets up to this many rows are tokenized entirely (batches of TOKENIZE_BATCH prompts).
FULL_CHECK_ROWS = 4096
# Larger datasets: the prompts longest in characters that are tokenized.
LONGEST_ROWS_CHECKED = 1024
TOKENIZE_BATCH = 256
# Characters of a prompt quoted in an error message.
PREVIEW_CHARS = 200


class RewardFunctionError(RuntimeError):
    """A reward function raised, or returned something other than one number (or None) per completion."""


def _preview(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= PREVIEW_CHARS else text[:PREVIEW_CHARS] + "...'"


def _row_kwargs(kwargs: dict[str, Any], n: int, i: int) -> dict[str, Any]:
    """`kwargs` restricted to row `i`: every list/tuple of length `n` becomes its one-element slice."""
    return {k: (v[i : i + 1] if isinstance(v, list | tuple) and len(v) == n else v) for k, v in kwargs.items()}


class _Fault:
    """A reward-function fault on this process: which function, which row (or None), what happened."""

    def __init__(self, func_index: int, name: str, row: int | None, problem: str, cause: BaseException | None):
        self.func_index = func_index
        self.name = name
        self.row = row
        self.problem = problem
        self.cause = cause


class _Call:
    """One guarded `_calculate_rewards` call on this process: faults and non-finite counts of its functions."""

    def __init__(self, n: int, prompts: Sequence[Any], group_size: int):
        self.n = n
        self.prompts = prompts
        self.group_size = max(int(group_size), 1)
        self.fault: _Fault | None = None
        self.nonfinite = 0
        self.nonfinite_by_func: dict[str, tuple[int, Any]] = {}  # name -> (first row, value)

    def _single_row_problem(self, out: Any) -> str | None:
        if isinstance(out, str | bytes) or not hasattr(out, "__len__"):
            return f"returned {type(out).__name__} for one completion, expected a list of 1 reward"
        if len(out) != 1:
            return f"returned {len(out)} rewards for one completion"
        return None

    def fail(self, index: int, name: str, row: int | None, problem: str, cause: BaseException | None) -> None:
        if self.fault is None:
            self.fault = _Fault(index, name, row, problem, cause)

    def clean(self, index: int, name: str, out: Any) -> list[float | None] | None:
        """Rewards as floats / None (non-finite -> None, counted); None when `out` is malformed (fault recorded)."""
        if isinstance(out, str | bytes) or not hasattr(out, "__iter__"):
            self.fail(index, name, None, f"returned {type(out).__name__}, expected a list of {self.n} rewards", None)
            return None
        out = list(out)
        if len(out) != self.n:
            self.fail(index, name, None, f"returned {len(out)} rewards for {self.n} completions", None)
            return None
        values: list[float | None] = []
        for i, value in enumerate(out):
            if value is None:
                values.append(None)
                continue
            try:
                if isinstance(value, str | bytes):
                    raise TypeError
                number = float(value)
            except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor with more than one element
                self.fail(index, name, i, f"returned {_preview(value)}, which is not a number or None", None)
                return None
            if not math.isfinite(number):
                self.nonfinite += 1
                self.nonfinite_by_func.setdefault(name, (i, value))
                values.append(None)
            else:
                values.append(number)
        return values


def _wrap_sync(func: Callable, index: int, name: str, call: _Call) -> Callable:
    def guarded(**kwargs: Any) -> list[float | None]:
        try:
            out = func(**kwargs)
        except Exception as err:  # reported on every process by RewardGuard
            row = _first_failing_row_sync(func, kwargs, call) if call.fault is None else None
            call.fail(index, name, row, _raised(err), err)
            return [0.0] * call.n
        values = call.clean(index, name, out)
        if values is not None:
            return values
        if call.fault.func_index == index and call.fault.row is None:
            call.fault.row = _first_failing_row_sync(func, kwargs, call)
        return [0.0] * call.n

    return guarded


def _wrap_async(func: Callable, index: int, name: str, call: _Call) -> Callable:
    async def guarded(**kwargs: Any) -> list[float | None]:
        try:
            out = await func(**kwargs)
        except Exception as err:  # reported on every process by RewardGuard
            row = await _first_failing_row_async(func, kwargs, call) if call.fault is None else None
            call.fail(index, name, row, _raised(err), err)
            return [0.0] * call.n
        values = call.clean(index, name, out)
        if values is not None:
            return values
        if call.fault.func_index == index and call.fault.row is None:
            call.fault.row = await _first_failing_row_async(func, kwargs, call)
        return [0.0] * call.n

    return guarded


def _raised(err: BaseException) -> str:
    return f"raised {type(err).__name__}: {err}"


def _first_failing_row_sync(func: Callable, kwargs: dict[str, Any], call: _Call) -> int | None:
    for i in range(call.n):
        try:
            if call._single_row_problem(func(**_row_kwargs(kwargs, call.n, i))) is not None:
                return i
        except Exception:
            return i
    return None


async def _first_failing_row_async(func: Callable, kwargs: dict[str, Any], call: _Call) -> int | None:
    for i in range(call.n):
        try:
            if call._single_row_problem(await func(**_row_kwargs(kwargs, call.n, i))) is not None:
                return i
        except Exception:
            return i
    return None


def _is_async(func: Callable) -> bool:
    from trl.trainer.utils import is_async_callable

    return is_async_callable(func)


class RewardGuard:
    """Runs TRL's `_calculate_rewards` with guarded reward functions; counts non-finite rewards (module docstring)."""

    def __init__(self) -> None:
        self.nonfinite_window = 0  # since the last training log
        self.nonfinite_total = 0
        self._global_count = 0  # non-finite rewards of callable functions in the last call, all processes
        self._warned: set[str] = set()

    def calculate(
        self,
        trainer: Any,
        compute: Callable[..., torch.Tensor],
        inputs: list[dict[str, Any]],
        prompts: list[Any],
        completions: list[Any],
        completion_ids_list: list[list[int]],
    ) -> torch.Tensor:
        """`compute(inputs, prompts, completions, completion_ids_list)` (TRL's `_calculate_rewards`) with every
        callable reward function guarded; returns its gathered `[N_global, F]` rewards with +-inf replaced by NaN.

        Raises:
            RewardFunctionError: on every process, if a reward function failed on any process.
        """
        training = trainer.model.training
        group_size = trainer.num_generations if training else getattr(trainer, "num_generations_eval", 1)
        call = _Call(len(prompts), prompts, group_size)
        originals = trainer.reward_funcs
        names = list(trainer.reward_func_names)
        guarded = []
        for i, func in enumerate(originals):
            if isinstance(func, nn.Module):
                guarded.append(func)
            elif _is_async(func):
                guarded.append(_wrap_async(func, i, names[i], call))
            else:
                guarded.append(_wrap_sync(func, i, names[i], call))
        trainer.reward_funcs = guarded
        try:
            rewards_per_func = compute(inputs, prompts, completions, completion_ids_list)  # [N_global, F]
        finally:
            trainer.reward_funcs = originals
        self._raise_on_any_fault(trainer, call)
        modules = [i for i, f in enumerate(originals) if isinstance(f, nn.Module)]
        module_nonfinite = 0
        if modules:
            module_nonfinite = int((~torch.isfinite(rewards_per_func[:, modules])).sum())  # gathered: global count
        rewards_per_func = rewards_per_func.masked_fill(torch.isinf(rewards_per_func), float("nan"))
        nonfinite = self._global_count + module_nonfinite
        if training:
            self.nonfinite_window += nonfinite
            self.nonfinite_total += nonfinite
        for name, (row, value) in call.nonfinite_by_func.items():
            if name not in self._warned:
                self._warned.add(name)
                warnings.warn(
                    f"reward function {name!r} returned {value!r} for completion row {row} (process "
                    f"{trainer.accelerator.process_index}): non-finite rewards are treated as None (no reward) and "
                    "counted in rewards/nonfinite; this warning is shown once per function.",
                    stacklevel=2,
                )
        return rewards_per_func

    def _raise_on_any_fault(self, trainer: Any, call: _Call) -> None:
        accelerator = trainer.accelerator
        fault = call.fault
        status = torch.tensor(
            [[float(fault is not None), float(call.nonfinite)]], dtype=torch.float64, device=accelerator.device
        )  # [1, 2]
        if accelerator.num_processes > 1:
            from accelerate.utils import gather

            status = gather(status)  # [P, 2]
        self._global_count = int(status[:, 1].sum())
        if not bool(status[:, 0].any()):
            return
        message = self._describe(fault, call, accelerator.process_index) if fault is not None else ""
        if accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            messages = gather_object([message])
            first = next(m for m in messages if m)
            if not message:
                message = f"{first} (raised on every process; the traceback is on the process that failed)"
        if fault is not None and fault.cause is not None:
            raise RewardFunctionError(message) from fault.cause
        raise RewardFunctionError(message)

    @staticmethod
    def _describe(fault: _Fault, call: _Call, rank: int) -> str:
        text = f"reward function {fault.name!r} {fault.problem}"
        if fault.row is None:
            where = f" (process {rank}; every completion row succeeded when scored alone)"
        else:
            row = rank * call.n + fault.row
            where = (
                f" on completion row {row} of the generation batch (prompt {row // call.group_size}; process {rank}, "
                f"local row {fault.row}); prompt: {_preview(call.prompts[fault.row])}"
            )
        return text + where

    def metrics(self) -> dict[str, float]:
        """`rewards/nonfinite` (since the last training log) and `rewards/nonfinite_total`, all processes."""
        return {
            "rewards/nonfinite": float(self.nonfinite_window),
            "rewards/nonfinite_total": float(self.nonfinite_total),
        }


def reward_guard(trainer: Any) -> RewardGuard:
    """The trainer's `RewardGuard` (created on first use)."""
    guard = getattr(trainer, "_reward_guard", None)
    if guard is None:
        guard = RewardGuard()
        trainer._reward_guard = guard
    return guard


def pop_reward_metrics(trainer: Any) -> dict[str, float]:
    """The guard's metrics for a training log; starts a new `rewards/nonfinite` window."""
    guard = reward_guard(trainer)
    out = guard.metrics()
    guard.nonfinite_window = 0
    return out


# ---------------------------------------------------------------------------------------------------------------
# Datasets
def model_max_positions(model: Any) -> int | None:
    """`max_position_embeddings` of a model (its text config for multimodal models), or None if it has none."""
    config = getattr(model, "config", model)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, numbers.Integral) and value > 0 else None


def _is_conversational(prompt: Any) -> bool:
    return isinstance(prompt, list) and len(prompt) > 0 and isinstance(prompt[0], dict) and "role" in prompt[0]


def default_prompt_tokenizer(tokenizer: Any, chat_template_kwargs: dict[str, Any] | None = None) -> Callable:
    """`fn(prompts) -> list of token-id lists`, tokenizing as TRL does for generation (chat template with
    `add_generation_prompt=True` for conversational prompts, the plain tokenizer for text)."""
    kwargs = dict(chat_template_kwargs or {})

    def tokenize(prompts: list[Any]) -> list[list[int]]:
        if _is_conversational(prompts[0]):
            out = tokenizer.apply_chat_template(
                prompts, add_generation_prompt=True, tokenize=True, return_dict=True, **kwargs
            )
            return list(out["input_ids"])
        return list(tokenizer(text=list(prompts))["input_ids"])

    return tokenize


def _char_lengths(dataset: Any, column: str) -> np.ndarray | None:
    """Characters per prompt of a map-style Arrow dataset, vectorised; None if the column's type is not handled."""
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        arr = dataset.data.column(column).combine_chunks()
        if dataset._indices is not None:
            arr = arr.take(dataset._indices.column(0).combine_chunks())
        if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
            return np.asarray(pc.fill_null(pc.utf8_length(arr), 0).to_numpy(zero_copy_only=False), dtype=np.int64)
        if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
            flat = pc.list_flatten(arr)
            if not pa.types.is_struct(flat.type) or flat.type.get_field_index("content") < 0:
                return None
            content = flat.field("content")
            if not (pa.types.is_string(content.type) or pa.types.is_large_string(content.type)):
                return None
            lengths = pc.fill_null(pc.utf8_length(content), 0).to_numpy(zero_copy_only=False)
            parents = pc.list_parent_indices(arr).to_numpy(zero_copy_only=False)
            return np.bincount(parents, weights=lengths, minlength=len(arr)).astype(np.int64)
    except (AttributeError, KeyError, TypeError, pa.ArrowException):
        return None
    return None


def _rows_to_check(dataset: Any, column: str, seed: int) -> tuple[list[int], str]:
    n = len(dataset)
    if n <= FULL_CHECK_ROWS:
        return list(range(n)), f"all {n} rows"
    chars = _char_lengths(dataset, column)
    if chars is not None:
        longest = np.argsort(-chars, kind="stable")[:LONGEST_ROWS_CHECKED]
        return sorted(int(i) for i in longest), f"the {LONGEST_ROWS_CHECKED} longest of {n} rows (by characters)"
    sample = np.random.default_rng(seed).choice(n, size=FULL_CHECK_ROWS, replace=False)
    return sorted(int(i) for i in sample), f"a sample of {FULL_CHECK_ROWS} of {n} rows"


def _column_names(dataset: Any) -> list[str] | None:
    names = getattr(dataset, "column_names", None)
    if names is None:
        features = getattr(dataset, "features", None)
        names = list(features) if features is not None else None
    return list(names) if names is not None else None


def check_prompt_dataset(
    dataset: Any,
    tokenize: Callable[[list[Any]], list[list[int]]] | None,
    *,
    max_completion_length: int,
    max_positions: int | None = None,
    vllm_max_model_length: int | None = None,
    name: str = "train_dataset",
    column: str = "prompt",
    seed: int = 0,
) -> dict[str, Any]:
    """Refuse a dataset that cannot be trained on (ValueError naming `name`, `column` and the row index).

    Args:
        dataset: a `datasets.Dataset`, any sized indexable of dict rows, or an `IterableDataset` (column check only).
        tokenize: `fn(prompts) -> token-id lists`, as the trainer tokenizes prompts; None skips the length check.
        max_completion_length: tokens generated per completion.
        max_positions: the model's `max_position_embeddings` (None: no limit from the model).
        vllm_max_model_length: `max_model_len` of a colocated vLLM engine (None: not capped).
        name: how errors call the dataset.
        column: the prompt column.
        seed: seed of the row sample when a large dataset has no Arrow prompt column (module docstring).

    Returns:
        What was checked: `rows_checked` (description), `longest_prompt` tokens and its `longest_row` (when measured).
    """
    sized = hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")
    if sized and len(dataset) == 0:
        raise ValueError(f"{name} is empty (0 rows): there is nothing to train on.")
    columns = _column_names(dataset)
    if columns is not None and column not in columns:
        raise ValueError(f"{name} has no prompt column {column!r}; its columns are {columns}.")
    if not sized:  # streaming: nothing more is cheap
        return {"rows_checked": "none (iterable dataset)"}
    if columns is None and column not in dataset[0]:
        raise ValueError(f"{name} has no prompt column {column!r}; row 0 has {sorted(dataset[0])}.")
    limits = [(n, what) for n, what in ((max_positions, "max_position_embeddings"),) if n is not None]
    if vllm_max_model_length is not None:
        limits.append((int(vllm_max_model_length), "vllm_max_model_length"))
    if tokenize is None or not limits:
        return {"rows_checked": "none (no length limit)"}
    rows, described = _rows_to_check(dataset, column, seed)
    longest, longest_row = -1, -1
    for start in range(0, len(rows), TOKENIZE_BATCH):
        idx = rows[start : start + TOKENIZE_BATCH]
        prompts = _prompts_at(dataset, idx, column, name)
        lengths = _token_lengths(tokenize, prompts, idx, name, column)
        for i, length in zip(idx, lengths, strict=True):
            if length > longest:
                longest, longest_row = length, i
    limit, what = min(limits)
    if longest + max_completion_length > limit:
        raise ValueError(
            f"{name}: the prompt in column {column!r} at row {longest_row} is {longest} tokens long; with "
            f"max_completion_length={max_completion_length} that needs {longest + max_completion_length} positions, "
            f"more than {what}={limit}. Shorten or drop the long prompts, lower max_completion_length, or raise "
            f"{what} (checked {described})."
        )
    return {"rows_checked": described, "longest_prompt": longest, "longest_row": longest_row}


def _prompts_at(dataset: Any, idx: list[int], column: str, name: str) -> list[Any]:
    try:
        batch = dataset[idx] if hasattr(dataset, "select") else None
    except (TypeError, KeyError, IndexError):
        batch = None
    if isinstance(batch, dict) and column in batch:
        prompts = list(batch[column])
    else:
        prompts = [dataset[i][column] for i in idx]
    for i, prompt in zip(idx, prompts, strict=True):
        if not (isinstance(prompt, str) or _is_conversational(prompt)):
            raise ValueError(
                f"{name}: the prompt in column {column!r} at row {i} must be a string or a non-empty list of "
                f"{{'role', 'content'}} messages, got {_preview(prompt)}."
            )
    return prompts


def _token_lengths(tokenize: Callable, prompts: list[Any], idx: list[int], name: str, column: str) -> list[int]:
    kinds = {_is_conversational(p) for p in prompts}
    try:
        if len(kinds) == 1:
            return [len(ids) for ids in tokenize(prompts)]
    except Exception:  # find the row below
        pass
    lengths = []
    for i, prompt in zip(idx, prompts, strict=True):
        try:
            lengths.append(len(tokenize([prompt])[0]))
        except Exception as err:
            raise ValueError(
                f"{name}: the prompt in column {column!r} at row {i} cannot be tokenized "
                f"({type(err).__name__}: {err}): {_preview(prompt)}"
            ) from err
    return lengths


def check_training_setup(trainer: Any) -> None:
    """End of `EfficientGRPOTrainer.__init__`: install the reward guard and check the train dataset (module doc)."""
    reward_guard(trainer)
    dataset = trainer.train_dataset
    if dataset is None:
        return
    args = trainer.args
    tokenize = None
    if not getattr(trainer, "_is_vlm", False) and getattr(trainer, "environment_factories", None) is None:

        def tokenize(prompts: list[Any]) -> list[list[int]]:
            return list(trainer._tokenize_prompts(prompts)[0])

    vllm_cap = None
    if getattr(trainer, "use_vllm", False) and getattr(args, "vllm_mode", None) == "colocate":
        vllm_cap = args.vllm_max_model_length
    check_prompt_dataset(
        dataset,
        tokenize,
        max_completion_length=int(args.max_completion_length),
        max_positions=model_max_positions(trainer.accelerator.unwrap_model(trainer.model)),
        vllm_max_model_length=vllm_cap,
        name="train_dataset",
        column="prompt",
        seed=int(args.seed),
    )
