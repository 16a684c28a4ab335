"""Rewards on hand-written completions: strict reasoning-gym verifier and math-verify."""

import json

import pytest
import reasoning_gym

from efficient_rlvr.rewards import completion_text, extract_answer, math_verify_reward, verifier_reward
from efficient_rlvr.tasks import make_reasoning_gym_dataset


@pytest.fixture(scope="module")
def rows():
    ds = make_reasoning_gym_dataset("chain_sum", size=200, seed=0)
    # Pick a row with a positive answer >= 2, so "-<answer>" is a partial-credit case for reasoning-gym's scorer.
    return [r for r in ds if int(r["answer"]) >= 2][:1][0]


def call(fn, completions, row):
    n = len(completions)
    return fn(completions, **{k: [row[k]] * n for k in ("answer", "task", "metadata", "question")})


def test_extract_answer():
    assert extract_answer("3+4=7\nAnswer: 7") == "7"
    assert extract_answer("Answer: 1\n1+1=2\nAnswer:  -2  \n") == "-2"  # the last one wins
    assert extract_answer("7") is None
    assert extract_answer("Answer:") == ""


def test_verifier_reward_hand_written(rows):
    a = rows["answer"]
    expression = json.loads(rows["metadata"])["expression"]
    completions = [
        f"{expression.replace(' ', '')}={a}\nAnswer: {a}",  # right
        f"Answer: {int(a) + 1}",  # wrong
        f"{a}",  # right number but no Answer: line
        f"Answer: -{a}",  # partial credit in reasoning-gym
        f"Answer: {int(a) + 3}\nAnswer: {a}",  # last Answer: line counts
        f"Answer: {a}\nAnswer: {int(a) + 3}",
        f"Answer: {a}.0",  # the scorer accepts trailing decimals
        "",
    ]
    assert call(verifier_reward, completions, rows) == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    # The partial-credit case really is one for the task's own scorer (that is what strictness removes).
    entry = {"question": rows["question"], "answer": a, "metadata": json.loads(rows["metadata"])}
    assert 0.0 < reasoning_gym.get_score_answer_fn("chain_sum")(f"-{a}", entry) < 1.0


def test_verifier_reward_conversational_and_broadcast(rows):
    a = rows["answer"]
    completions = [[{"role": "assistant", "content": f"Answer: {a}"}], [{"role": "assistant", "content": "x"}]]
    # TRL passes columns as lists; a single task string is broadcast.
    assert verifier_reward(completions, answer=[a, a], task="chain_sum", metadata=[rows["metadata"]] * 2) == [1.0, 0.0]
    assert verifier_reward.__name__ == "verifier_reward" and math_verify_reward.__name__ == "math_verify_reward"


def test_verifier_reward_other_task():
    row = make_reasoning_gym_dataset("leg_counting", size=1, seed=0)[0]
    a = row["answer"]
    assert call(verifier_reward, [f"Answer: {a}", f"Answer: {int(a) + 1}"], row) == [1.0, 0.0]


def test_verifier_reward_errors(rows):
    with pytest.raises(ValueError, match="'answer'"):
        verifier_reward(["Answer: 1"], task=["chain_sum"])
    with pytest.raises(ValueError, match="'task'"):
        verifier_reward(["Answer: 1"], answer=["1"])
    with pytest.raises(ValueError, match="'answer' has 2 items"):
        verifier_reward(["Answer: 1"], answer=["1", "2"], task="chain_sum")
    with pytest.raises(ValueError, match="completions"):
        completion_text(3)


def test_math_verify_reward():
    completions = [
        "so the result is $\\boxed{\\frac{1}{2}}$",  # equal to 0.5
        "The answer is $0.5$",
        "The answer is $\\boxed{3}$",  # wrong
        "I don't know",  # nothing to parse
        [{"role": "assistant", "content": "$x = 2\\sqrt{2}$"}],
    ]
    answers = ["0.5", "\\frac{1}{2}", "4", "4", "\\sqrt{8}"]
    assert math_verify_reward(completions, answer=answers) == [1.0, 1.0, 0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="'answer'"):
        math_verify_reward(["1"])
