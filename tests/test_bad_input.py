"""Bad input and faults (efficient_rlvr/checks.py) on the real trainer: reward functions that raise or return the
wrong thing, non-finite rewards, and datasets that cannot be trained on.

Reward tests call the trainer's real `_calculate_rewards` (TRL 1.16.0's code under the guard) on hand-made batches of
2 prompts x G=4 completions, so the offending row is known; two short training runs check the metrics and the
error from `train()`; one two-process run (gloo) checks that a fault on one rank raises the same error on both.
Run as a script (`torchrun --nproc_per_node 2 tests/test_bad_input.py OUT MODEL`) this file is that two-process
job.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import socket
import subprocess
import sys
import time
import warnings

import datasets
import pytest
import torch

from efficient_rlvr import EfficientGRPOConfig, EfficientGRPOTrainer
from efficient_rlvr.checks import (
    FULL_CHECK_ROWS,
    RewardFunctionError,
    check_prompt_dataset,
    default_prompt_tokenizer,
)
from efficient_rlvr.run import load_tokenizer_for

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
G = 4


def _config(output_dir: str, **overrides) -> EfficientGRPOConfig:
    from grpo_args import cpu_grpo_kwargs

    defaults = dict(
        per_device_train_batch_size=8,  # 2 prompts x G
        num_generations=G,
        max_completion_length=16,
        max_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
    )
    return EfficientGRPOConfig(**cpu_grpo_kwargs(output_dir, **{**defaults, **overrides}))


def _trainer(model_dir: str, train_ds, reward_funcs, output_dir: str, **overrides) -> EfficientGRPOTrainer:
    return EfficientGRPOTrainer(
        model=model_dir,
        reward_funcs=reward_funcs,
        args=_config(output_dir, **overrides),
        train_dataset=train_ds,
        processing_class=load_tokenizer_for(model_dir),
    )


def _batch(train_ds, first: int = 0):
    """TRL's inputs for 2 prompts x G: rows, prompts, completions 'Answer: i' for row i, completion ids."""
    rows = [dict(train_ds[first + p]) for p in range(2) for _ in range(G)]
    prompts = [row["prompt"] for row in rows]
    completions = [[{"role": "assistant", "content": f"Answer: {i}"}] for i in range(len(rows))]
    return rows, prompts, completions, [[1, 2, 3]] * len(rows)


def _row_of(completion) -> int:
    return int(completion[0]["content"].split()[-1])


@pytest.fixture
def build(tiny_model_dir, chain_sum_splits, tmp_path):
    train_ds, _ = chain_sum_splits
    return lambda funcs, **kw: _trainer(tiny_model_dir, train_ds, funcs, str(tmp_path / "out"), **kw)


# ---------------------------------------------------------------------------------------------------- reward faults
def explodes_on_five(completions, **kwargs):
    return [1.0 / (5 - _row_of(c)) if _row_of(c) != 5 else 1 / 0 for c in completions]


def test_a_raising_reward_names_the_function_and_the_row(build, chain_sum_splits):
    trainer = build([explodes_on_five])
    rows, prompts, completions, ids = _batch(chain_sum_splits[0])
    with pytest.raises(RewardFunctionError) as info:
        trainer._calculate_rewards(rows, prompts, completions, ids)
    message = str(info.value)
    assert "reward function 'explodes_on_five' raised ZeroDivisionError" in message
    assert "completion row 5 of the generation batch (prompt 1; process 0, local row 5)" in message
    assert repr(prompts[5])[:60] in message
    assert isinstance(info.value.__cause__, ZeroDivisionError)  # the original exception is chained
    assert trainer.reward_funcs == [explodes_on_five]  # the guard put the user's functions back


class LengthJudge:
    """A callable class that drops the rewards of completions containing '3' (a batch of the wrong length)."""

    def __call__(self, completions, **kwargs):
        return [1.0 for c in completions if "3" not in c[0]["content"]]


class ConstantJudge:
    def __call__(self, completions, **kwargs):
        return [1.0] * (len(completions) - 1) if len(completions) > 1 else [1.0]


def test_a_wrong_length_names_the_class_and_the_row_that_misbehaves_alone(build, chain_sum_splits):
    rows, prompts, completions, ids = _batch(chain_sum_splits[0])
    with pytest.raises(
        RewardFunctionError, match=r"'LengthJudge' returned 7 rewards for 8 completions on completion row 3"
    ):
        build([LengthJudge()])._calculate_rewards(rows, prompts, completions, ids)
    # every single row is fine: the batch-level fault is reported without a row
    with pytest.raises(
        RewardFunctionError, match=r"'ConstantJudge' returned 7 rewards for 8 completions \(process 0; every"
    ):
        build([ConstantJudge()])._calculate_rewards(rows, prompts, completions, ids)


def not_a_number_on_two(completions, **kwargs):
    return ["yes" if _row_of(c) == 2 else 0.0 for c in completions]


def test_a_value_that_is_not_a_number_names_the_row(build, chain_sum_splits):
    rows, prompts, completions, ids = _batch(chain_sum_splits[0])
    with pytest.raises(
        RewardFunctionError,
        match=r"'not_a_number_on_two' returned 'yes', which is not a number or None on completion row 2",
    ):
        build([not_a_number_on_two])._calculate_rewards(rows, prompts, completions, ids)


async def async_explodes_on_six(completions, **kwargs):
    await asyncio.sleep(0)
    if any(_row_of(c) == 6 for c in completions):
        raise KeyError("no verifier for this row")
    return [0.5] * len(completions)


def test_an_async_reward_that_raises_is_reported_the_same_way(build, chain_sum_splits):
    trainer = build([async_explodes_on_six])
    rows, prompts, completions, ids = _batch(chain_sum_splits[0])
    with pytest.raises(
        RewardFunctionError, match=r"'async_explodes_on_six' raised KeyError: .* on completion row 6 "
    ) as info:
        trainer._calculate_rewards(rows, prompts, completions, ids)
    assert isinstance(info.value.__cause__, KeyError)


# ------------------------------------------------------------------------------------------------ non-finite rewards
def nonfinite_reward(completions, **kwargs):
    table = [math.nan, math.inf, None, -math.inf, 1, 0.0, True, torch.tensor(0.25)]
    return [table[_row_of(c)] for c in completions]


def half_reward(completions, **kwargs):
    return [0.5] * len(completions)


def test_nonfinite_rewards_count_as_none_and_are_counted(build, chain_sum_splits):
    trainer = build([nonfinite_reward, half_reward])
    rows, prompts, completions, ids = _batch(chain_sum_splits[0])
    trainer.model.train()
    with pytest.warns(UserWarning, match="'nonfinite_reward' returned nan for completion row 0"):
        per_func = trainer._calculate_rewards(rows, prompts, completions, ids)
    nan = math.nan
    expected = torch.tensor([[nan, nan, nan, nan, 1.0, 0.0, 1.0, 0.25], [0.5] * 8]).T
    torch.testing.assert_close(per_func, expected, equal_nan=True)
    # TRL's aggregation skips them like None: the total is the other function's reward alone on those rows
    torch.testing.assert_close(trainer.last_rewards(), torch.tensor([0.5, 0.5, 0.5, 0.5, 1.5, 0.5, 1.5, 0.75]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per function
        trainer._calculate_rewards(rows, prompts, completions, ids)
    logs = {}
    trainer.log(logs)
    assert logs["rewards/nonfinite"] == 6.0 and logs["rewards/nonfinite_total"] == 6.0  # nan, inf, -inf, twice
    trainer.model.eval()
    trainer._calculate_rewards(rows, prompts, completions, ids)  # evaluation: cleaned, not counted
    trainer.model.train()
    logs = {}
    trainer.log(logs)
    assert logs["rewards/nonfinite"] == 0.0 and logs["rewards/nonfinite_total"] == 6.0


def nan_on_odd_rows(completions, **kwargs):
    return [math.nan if i % 2 else float(i % 4 == 0) for i in range(len(completions))]  # per group: 1, nan, 0, nan


@pytest.mark.slow
def test_training_with_nonfinite_rewards_logs_them_and_keeps_a_finite_loss(build):
    trainer = build([nan_on_odd_rows])
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["rewards/nonfinite"] for entry in logs] == [4.0, 4.0]  # half of 8 completions per step
    assert [entry["rewards/nonfinite_total"] for entry in logs] == [4.0, 8.0]
    assert all(math.isfinite(entry["loss"]) and math.isfinite(entry["grad_norm"]) for entry in logs)
    assert all(entry["grad_norm"] > 0 for entry in logs)  # the scored rows (1 vs 0) still carry a gradient
    assert all(entry["reward"] == 0.5 for entry in logs)  # TRL's mean over the scored rows only


def raises_in_training(completions, **kwargs):
    raise RuntimeError("verifier crashed")


def test_a_reward_that_raises_during_training_stops_it_with_the_named_error(build):
    trainer = build([raises_in_training])
    with pytest.raises(
        RewardFunctionError, match="'raises_in_training' raised RuntimeError: verifier crashed on completion row 0"
    ):
        trainer.train()


@pytest.mark.slow
def test_a_fault_on_one_process_raises_the_same_error_on_every_process(tiny_model_dir, tmp_path):
    """Two CPU processes (gloo): rank 1's reward function raises on its local row 5, rank 0's is fine; both ranks
    raise (nobody hangs in the gather) and both name rank 1's row. Non-finite counts are summed over the ranks."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [  # torchrun directly (what `accelerate launch --multi_gpu` runs on CPU), without the launcher's imports
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        os.path.abspath(__file__),
        str(tmp_path),
        tiny_model_dir,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(REPO, "tests"), env.get("PYTHONPATH", "")])
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    for rank in ranks:
        assert rank["nonfinite"] == 3.0  # 1 on rank 0 + 2 on rank 1
        assert rank["error"].startswith("reward function 'fails_on_rank_one' raised ValueError: rank 1 row 5")
        assert "completion row 13 of the generation batch (prompt 3; process 1, local row 5)" in rank["error"]
    assert ranks[1]["cause"] == "ValueError" and ranks[0]["cause"] is None


def _two_process_main(out_dir: str, model_dir: str) -> None:
    from efficient_rlvr.tasks import load_task_splits

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])

    def fails_on_rank_one(completions, **kwargs):
        if rank == 1 and any(_row_of(c) == 5 for c in completions):
            raise ValueError("rank 1 row 5")
        return [1.0] * len(completions)

    def nonfinite_per_rank(completions, **kwargs):
        bad = {0: {0}, 1: {1, 2}}[rank]
        return [math.inf if _row_of(c) in bad else 0.0 for c in completions]

    train_ds, _ = load_task_splits("embedded", train_size=16, eval_size=4, seed=0)
    trainer = _trainer(model_dir, train_ds, [nonfinite_per_rank], os.path.join(out_dir, "run"))
    rows, prompts, completions, ids = _batch(train_ds, first=2 * rank)
    trainer.model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer._calculate_rewards(rows, prompts, completions, ids)
    record = {"nonfinite": trainer._reward_guard.nonfinite_total, "error": None, "cause": None}
    trainer.reward_funcs = [fails_on_rank_one]
    trainer.reward_func_names = ["fails_on_rank_one"]
    try:
        trainer._calculate_rewards(rows, prompts, completions, ids)
    except RewardFunctionError as err:
        record["error"] = str(err)
        record["cause"] = type(err.__cause__).__name__ if err.__cause__ is not None else None
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)
    trainer.accelerator.wait_for_everyone()


# ------------------------------------------------------------------------------------- V0.5 reward range (+-1 bound)
def two_on_the_first_row(completions, **kwargs):
    return [2.0] + [0.0] * (len(completions) - 1)


def always_one(completions, **kwargs):
    return [1.0] * len(completions)


def half_on_the_second_row(completions, **kwargs):
    return [0.0, 0.5] + [0.0] * (len(completions) - 2)


@pytest.mark.parametrize("method", ["budget_baseline", "budget_adaptive"])
def test_a_reward_outside_the_budget_range_names_the_function_and_the_value(build, method):
    """V0.5 maps [budget_reward_min, budget_reward_max] to [-1, 1]; a reward outside would silently break the bound."""
    trainer = build([two_on_the_first_row], max_steps=1, **{method: True})
    with pytest.raises(ValueError) as info:
        trainer.train()
    message = str(info.value)
    assert "reward function 'two_on_the_first_row' gave 2.0" in message
    assert "on completion row 0 of the generation batch (prompt 0)" in message
    assert "outside [budget_reward_min=0.0, budget_reward_max=1.0]" in message


class TwoAfterTheFirstCall:
    """In range for TRL's first round (all 1, far from the prior 0.5: worth rolling out more), 2.0 after it."""

    def __init__(self):
        self.calls = 0

    def __call__(self, completions, **kwargs):
        self.calls += 1
        return [1.0] * len(completions) if self.calls == 1 else [2.0] * len(completions)


def test_a_reward_outside_the_budget_range_in_a_rollout_more_round_is_refused(build):
    judge = TwoAfterTheFirstCall()
    trainer = build([judge], max_steps=1, budget_adaptive=True)
    with pytest.raises(ValueError, match=r"'TwoAfterTheFirstCall' gave 2.0 on rollout 0 of 'rollout more' round 1 "):
        trainer.train()


def test_a_weighted_sum_outside_the_budget_range_names_every_function(build):
    trainer = build([always_one, half_on_the_second_row], max_steps=1, budget_baseline=True)
    with pytest.raises(ValueError) as info:
        trainer.train()
    message = str(info.value)
    assert (
        "the weighted sum 1.5 of reward functions 'always_one' (1.0 x weight 1.0) + 'half_on_the_second_row' (0.5 x "
        "weight 1.0)" in message
    )
    assert "on completion row 1 of the generation batch (prompt 0)" in message
    assert "outside [budget_reward_min=0.0, budget_reward_max=1.0]" in message
    # the same rewards are fine once the range says so
    build([always_one, half_on_the_second_row], max_steps=1, budget_baseline=True, budget_reward_max=2.0).train()


# ---------------------------------------------------------------------------------------------------------- datasets
def _prompt_rows(texts):
    return datasets.Dataset.from_dict({"prompt": [[{"role": "user", "content": t}] for t in texts]})


def test_trainer_refuses_a_dataset_without_a_prompt_column(tiny_model_dir, tmp_path):
    ds = datasets.Dataset.from_dict({"question": ["1 + 1 =", "2 + 2 ="]})
    with pytest.raises(
        ValueError, match=r"train_dataset has no prompt column 'prompt'; its columns are \['question'\]"
    ):
        _trainer(tiny_model_dir, ds, [half_reward], str(tmp_path))


def test_trainer_refuses_an_empty_dataset(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"train_dataset is empty \(0 rows\)"):
        _trainer(tiny_model_dir, _prompt_rows([]), [half_reward], str(tmp_path))


def test_trainer_refuses_a_prompt_longer_than_the_model_takes(tiny_model_dir, tmp_path):
    texts = ["1 + 1 ="] * 6
    texts[3] = " ".join(["7 + 1"] * 200)  # ~600 tokens, max_position_embeddings = 512
    with pytest.raises(ValueError, match=r"train_dataset: the prompt in column 'prompt' at row 3 is \d+ tokens long"):
        _trainer(tiny_model_dir, _prompt_rows(texts), [half_reward], str(tmp_path))
    with pytest.raises(ValueError, match=r"more than max_position_embeddings=512"):
        _trainer(tiny_model_dir, _prompt_rows(texts), [half_reward], str(tmp_path))


def test_length_limit_is_exact_and_checks_the_vllm_cap(tiny_model_dir):
    tokenizer = load_tokenizer_for(tiny_model_dir)
    tokenize = default_prompt_tokenizer(tokenizer)
    ds = _prompt_rows(["1 + 1 =", "3 + 4 - 9 + 2 - 1 =", "5 ="])
    lengths = [len(ids) for ids in tokenize(list(ds["prompt"]))]
    longest = max(lengths)
    # the same count as TRL's generation path: chat template with the generation prompt
    rendered = tokenizer.apply_chat_template(
        ds[1]["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    assert longest == len(rendered["input_ids"])
    kw = dict(max_completion_length=40, max_positions=512, name="mini", column="prompt")
    info = check_prompt_dataset(ds, tokenize, vllm_max_model_length=longest + 40, **kw)  # exactly fits
    assert info["longest_prompt"] == longest and info["longest_row"] == 1
    with pytest.raises(
        ValueError, match=rf"mini: .* at row 1 is {longest} tokens .* more than vllm_max_model_length={longest + 39}"
    ):
        check_prompt_dataset(ds, tokenize, vllm_max_model_length=longest + 39, **kw)


def test_untokenizable_and_malformed_prompts_name_the_row(tiny_model_dir):
    tokenize = default_prompt_tokenizer(load_tokenizer_for(tiny_model_dir))
    kw = dict(max_completion_length=8, max_positions=512, name="mini")
    rows = [{"prompt": [{"role": "user", "content": "1 + 1 ="}]}, {"prompt": 17}]
    with pytest.raises(
        ValueError, match=r"mini: the prompt in column 'prompt' at row 1 must be a string or a non-empty"
    ):
        check_prompt_dataset(rows, tokenize, **kw)
    rows = [{"prompt": [{"role": "user", "content": "1 + 1 ="}]}, {"prompt": [{"role": "user", "text": "no content"}]}]
    with pytest.raises(ValueError, match=r"mini: the prompt in column 'prompt' at row 1 cannot be tokenized"):
        check_prompt_dataset(rows, tokenize, **kw)


def test_large_datasets_are_checked_on_their_longest_prompts_quickly(tiny_model_dir):
    tokenize = default_prompt_tokenizer(load_tokenizer_for(tiny_model_dir))
    n = 20 * FULL_CHECK_ROWS
    texts = [f"{i % 10} + {(i * 7) % 10} =" for i in range(n)]
    texts[54_321] = " ".join(["7 + 1"] * 200)
    kw = dict(max_completion_length=16, max_positions=512, column="prompt")
    for ds in (_prompt_rows(texts), datasets.Dataset.from_dict({"prompt": texts})):  # conversational and plain text
        start = time.perf_counter()
        with pytest.raises(ValueError, match=r"at row 54321 is \d+ tokens .*checked the 1024 longest of 81920 rows"):
            check_prompt_dataset(ds, tokenize, **kw)
        assert time.perf_counter() - start < 10.0
    # a shuffled view: rows are reported in the view's own indices
    view = _prompt_rows(texts).shuffle(seed=0)
    position = [i for i, p in enumerate(view[:]["prompt"]) if len(p[0]["content"]) > 100]
    with pytest.raises(ValueError, match=rf"at row {position[0]} is"):
        check_prompt_dataset(view, tokenize, **kw)


def test_streaming_datasets_get_the_column_check_only(tiny_model_dir):
    tokenize = default_prompt_tokenizer(load_tokenizer_for(tiny_model_dir))
    good = _prompt_rows(["1 + 1 ="] * 4).to_iterable_dataset()
    assert check_prompt_dataset(good, tokenize, max_completion_length=8, max_positions=512)["rows_checked"].startswith(
        "none"
    )
    wrong = datasets.Dataset.from_dict({"question": ["1 + 1 ="]}).to_iterable_dataset()
    with pytest.raises(ValueError, match="no prompt column 'prompt'"):
        check_prompt_dataset(wrong, tokenize, max_completion_length=8, max_positions=512)


def test_run_loading_names_the_dataset_and_column(tmp_path):
    from efficient_rlvr.run import RunArguments, load_datasets, resolve_model_path

    model_path = resolve_model_path("embedded")
    tokenizer = load_tokenizer_for(model_path)
    args = _config(str(tmp_path / "out"), max_completion_length=40)
    path = str(tmp_path / "data")
    texts = [f"{i} + 1 =" for i in range(40)]
    datasets.Dataset.from_dict({"question": texts, "answer": [str(i + 1) for i in range(40)]}).save_to_disk(path)
    run = RunArguments(dataset_name=path, dataset_prompt_column="problem", train_size=20, eval_size=8)
    with pytest.raises(
        ValueError, match=rf"dataset_name='{path}', dataset_prompt_column='problem': prompt_column 'problem'"
    ):
        load_datasets(run, args, tokenizer, model_path)
    run.dataset_prompt_column = "question"
    train_ds, eval_ds = load_datasets(run, args, tokenizer, model_path)
    assert len(train_ds) == 20 and len(eval_ds) == 8
    texts[0] = " ".join(["7 + 1"] * 200)  # too long for max_position_embeddings = 512
    long_path = str(tmp_path / "long")
    datasets.Dataset.from_dict({"question": texts}).save_to_disk(long_path)
    run = RunArguments(dataset_name=long_path, dataset_prompt_column="question", eval_size=8, task_seed=0)
    with pytest.raises(
        ValueError, match=r"dataset_name='.*long', dataset_prompt_column='question' \((train|eval) split\)"
    ):
        load_datasets(run, args, tokenizer, model_path)


if __name__ == "__main__":
    _two_process_main(sys.argv[1], sys.argv[2])
