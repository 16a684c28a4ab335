"""Verifiable rewards in TRL's reward-function signature ``f(completions, **kwargs) -> list[float]``.

TRL calls a reward function with ``prompts``, ``completions``, ``completion_ids`` and every other dataset column as
keyword lists (one item per completion). Completions are plain strings, or for conversational datasets lists of
messages whose last message holds the generated text; both are accepted.

- :func:`verifier_reward`: the reasoning-gym task's own ``score_answer`` on the text after the last ``Answer:``,
  made strict: 1.0 only when the scorer returns exactly 1.0, else 0.0. Reasoning-gym scorers give partial credit
  (e.g. chain_sum's ``"-2"`` for oracle ``"2"`` scores 0.5), which GRPO on a tiny model learns to game.
- :func:`math_verify_reward`: math-verify ``parse`` + ``verify`` of the whole completion against the ``answer``
  column (gold answers without ``$``/``\\boxed`` are parsed as plain expressions); 1.0 or 0.0.

Both return ``None`` for nothing: a completion that cannot be scored gets 0.0.
"""

from __future__ import annotations

import functools
import json
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any

ANSWER_MARKER = "Answer:"
_ANSWER_RE = re.compile(r"Answer:[ \t]*([^\n]*)")


def completion_text(completion: Any) -> str:
    """The generated text of one completion: a string, or the content of the last message of a message list."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict) and "content" in completion:
        return str(completion["content"])
    if isinstance(completion, Sequence) and len(completion) > 0 and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    if isinstance(completion, Sequence) and len(completion) == 0:
        return ""
    raise ValueError(f"completions must be strings or lists of messages, got {type(completion).__name__}")


def extract_answer(text: str) -> str | None:
    """The text after the last ``Answer:`` up to the end of its line (stripped); ``None`` if there is none."""
    matches = _ANSWER_RE.findall(text)
    if not matches:
        return None
    return matches[-1].strip()


@functools.cache
def _score_fn(task: str) -> Callable[[str | None, dict[str, Any]], float]:
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(task)


def _column(kwargs: dict[str, Any], name: str, n: int, default: Any = None) -> list[Any]:
    value = kwargs.get(name, default)
    if value is None or isinstance(value, str | dict):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"column {name!r} has {len(value)} items for {n} completions")
    return value


def verifier_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    """Strict 0/1 reward from the reasoning-gym task's own scorer.

    Reads the columns ``answer`` (required), ``task`` (required: the reasoning-gym task name; a single string is
    broadcast), ``metadata`` (JSON string or dict) and ``question`` (optional). The answer is the text after the
    last ``Answer:``; no ``Answer:`` gives 0.0.
    """
    n = len(completions)
    answers = _column(kwargs, "answer", n)
    tasks = _column(kwargs, "task", n)
    metadata = _column(kwargs, "metadata", n, default="{}")
    questions = _column(kwargs, "question", n, default="")
    if any(a is None for a in answers):
        raise ValueError("verifier_reward needs an 'answer' column")
    if any(t is None for t in tasks):
        raise ValueError("verifier_reward needs a 'task' column naming the reasoning-gym task")
    rewards = []
    for completion, answer, task, meta, question in zip(completions, answers, tasks, metadata, questions, strict=True):
        predicted = extract_answer(completion_text(completion))
        if predicted is None or predicted == "":
            rewards.append(0.0)
            continue
        entry = {
            "question": question,
            "answer": str(answer),
            "metadata": json.loads(meta) if isinstance(meta, str) else dict(meta or {}),
        }
        try:
            score = float(_score_fn(task)(predicted, entry))
        except Exception:  # a scorer crashing on malformed model output is a wrong answer
            score = 0.0
        rewards.append(1.0 if score == 1.0 else 0.0)
    return rewards


def _timeout() -> int | None:
    # math-verify's timeouts use SIGALRM, which only works in the main thread.
    return 5 if threading.current_thread() is threading.main_thread() else None


def math_verify_reward(completions: list[Any], answer: list[Any] | None = None, **kwargs: Any) -> list[float]:
    """1.0 when math-verify finds the completion's final answer equal to the ``answer`` column, else 0.0."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    if answer is None:
        raise ValueError("math_verify_reward needs an 'answer' column")
    answers = _column({"answer": answer}, "answer", len(completions))
    rewards = []
    for completion, gold_text in zip(completions, answers, strict=True):
        gold_text = str(gold_text)
        if "$" not in gold_text and "\\boxed" not in gold_text:
            gold_text = f"${gold_text}$"
        gold = parse(
            gold_text,
            extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
            parsing_timeout=_timeout(),
        )
        if len(gold) == 0:
            rewards.append(0.0)
            continue
        predicted = parse(completion_text(completion), parsing_timeout=_timeout())
        ok = bool(predicted) and verify(gold, predicted, timeout_seconds=_timeout())
        rewards.append(1.0 if ok else 0.0)
    return rewards


verifier_reward.__name__ = "verifier_reward"
math_verify_reward.__name__ = "math_verify_reward"
