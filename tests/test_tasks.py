"""Data loading: reasoning-gym generation, held-out splits, external datasets, errors."""

import json

import datasets
import pytest

from efficient_rlvr.tasks import (
    EMBEDDED_TASK_KWARGS,
    chain_sum_solution,
    load_task_splits,
    make_reasoning_gym_dataset,
    resolve_task,
)


def test_chain_sum_solution_hand_computed():
    assert chain_sum_solution("3 + 4 - 9") == "3+4=7\n7-9=-2\nAnswer: -2"
    assert chain_sum_solution("5 - 5") == "5-5=0\nAnswer: 0"
    assert chain_sum_solution("0 - 9 - 9 - 9 + 1 =") == "0-9=-9\n-9-9=-18\n-18-9=-27\n-27+1=-26\nAnswer: -26"
    with pytest.raises(ValueError, match="operator"):
        chain_sum_solution("3 * 4")


def test_make_dataset_columns_and_embedded_config():
    ds = make_reasoning_gym_dataset("embedded", size=300, seed=7)
    assert ds.column_names == ["prompt", "question", "answer", "task", "metadata"]
    assert len(ds) == 300
    terms = set()
    for row in ds:
        assert row["prompt"] == [{"role": "user", "content": row["question"]}]
        assert row["task"] == "chain_sum"
        meta = json.loads(row["metadata"])
        operands = meta["expression"].split()[::2]
        assert all(len(x) == 1 and x.isdigit() for x in operands)
        terms.add(meta["num_terms"])
        # The chain of thought ends in the task's own answer.
        assert chain_sum_solution(meta["expression"]).endswith(f"Answer: {row['answer']}")
    assert terms == {2, 3, 4, 5}
    # "chain_sum" without options is the embedded preset; explicit options override preset defaults.
    assert make_reasoning_gym_dataset("chain_sum", size=20, seed=7)["question"] == ds["question"][:20]
    assert resolve_task("chain_sum", {"max_terms": 3}) == ("chain_sum", {**EMBEDDED_TASK_KWARGS, "max_terms": 3})


def test_other_reasoning_gym_task():
    ds = make_reasoning_gym_dataset("leg_counting", size=5, seed=0)
    assert set(ds["task"]) == {"leg_counting"} and all(a.isdigit() for a in ds["answer"])


def test_splits_are_disjoint_sized_and_deterministic():
    train, evaluation = load_task_splits("embedded", train_size=3000, eval_size=400, seed=0)
    assert len(train) == 3000 and len(evaluation) == 400
    assert not set(train["question"]) & set(evaluation["question"])
    # 2-term problems (200 distinct) are common to both generators: the dedup must have removed some.
    assert sum(json.loads(m)["num_terms"] == 2 for m in evaluation["metadata"]) > 50
    train2, evaluation2 = load_task_splits("chain_sum", train_size=3000, eval_size=400, seed=0)
    assert train2["question"] == train["question"] and evaluation2["question"] == evaluation["question"]
    # The eval split does not depend on train_size.
    assert load_task_splits("embedded", train_size=10, eval_size=400, seed=0)[1]["question"] == evaluation["question"]
    assert (
        load_task_splits("embedded", train_size=10, eval_size=50, seed=1)[1]["question"] != evaluation["question"][:50]
    )


def test_local_dataset_with_string_prompts(tmp_path):
    rows = {"problem": [f"What is {i} + {i}?" for i in range(20)], "answer": [str(2 * i) for i in range(20)]}
    path = str(tmp_path / "ds")
    datasets.Dataset.from_dict(rows).save_to_disk(path)
    train, evaluation = load_task_splits(path, train_size=None, eval_size=5, seed=0, prompt_column="problem")
    assert len(train) == 15 and len(evaluation) == 5
    assert set(train.column_names) == {"prompt", "answer"}
    assert not set(a for a in train["answer"]) & set(evaluation["answer"])
    for row in evaluation:
        i = int(row["answer"]) // 2
        assert row["prompt"] == [{"role": "user", "content": f"What is {i} + {i}?"}]


def test_local_json_dataset_dict_with_conversational_prompts(tmp_path):
    for split, n in (("train", 12), ("test", 4)):
        with open(tmp_path / f"{split}.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps({"prompt": [{"role": "user", "content": f"{split} {i}"}], "answer": str(i)}) + "\n")
    files = {"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl")}
    train, evaluation = load_task_splits("json", train_size=10, eval_size=None, seed=0, data_files=files)
    assert len(train) == 10 and len(evaluation) == 4
    assert all(p[0]["content"].startswith("train") for p in train["prompt"])
    assert evaluation[0]["prompt"] == [{"role": "user", "content": "test 0"}]


def test_clear_errors(tmp_path):
    path = str(tmp_path / "ds")
    datasets.Dataset.from_dict({"question": ["a", "b", "c"], "answer": ["1", "2", "3"]}).save_to_disk(path)
    with pytest.raises(ValueError, match="prompt_column 'prompt'"):
        load_task_splits(path, eval_size=1)
    empty = datasets.Dataset.from_dict({"prompt": [], "answer": []})
    with pytest.raises(ValueError, match="empty"):
        load_task_splits(empty, eval_size=1)
    with pytest.raises(ValueError, match="eval split is empty"):
        load_task_splits(datasets.DatasetDict(train=datasets.Dataset.from_dict({"prompt": ["a"]}), test=empty))
    with pytest.raises(ValueError, match="train_split 'training'"):
        load_task_splits(datasets.DatasetDict(train=empty), train_split="training")
    with pytest.raises(ValueError, match="not a preset or reasoning-gym task"):
        load_task_splits("chain_summ")
    with pytest.raises(ValueError, match="not a preset or reasoning-gym task"):
        make_reasoning_gym_dataset("no_such_task", size=3, seed=0)
    with pytest.raises(ValueError, match="train_size"):
        load_task_splits("embedded", train_size=0)
    with pytest.raises(ValueError, match="size"):
        make_reasoning_gym_dataset("chain_sum", size=0, seed=0)
    with pytest.raises(ValueError, match="eval_size"):
        load_task_splits(path, prompt_column="question", eval_size=3)
