"""Held-out accuracy of a policy with several samples per prompt (batched HF ``generate``).

``evaluate_accuracy`` samples ``num_samples`` completions per prompt at ``temperature`` (top-k off, top-p 1) and
one greedy completion, scores them with a TRL-style reward function (default: the strict reasoning-gym
:func:`efficient_rlvr.rewards.verifier_reward`) and reports:

- ``accuracy``: mean reward over all prompt x sample pairs (pass@1 estimated with k samples);
- ``greedy_accuracy``: mean reward of the greedy completions;
- ``frac_all_wrong`` / ``frac_all_correct``: share of prompts with 0/k and k/k samples right (the groups that carry
  no GRPO signal), and ``frac_mixed`` for the rest;
- ``mean_completion_tokens`` and ``frac_truncated`` (no end-of-turn within ``max_new_tokens``);
- optionally ``accuracy/<group_by>=<value>`` per value of a metadata field (e.g. ``num_terms`` for chain_sum).

Batches are left-padded (decoder-only generation needs it): the tokenizer's ``padding_side`` is forced to ``"left"``
during the call and restored afterwards (``AutoTokenizer`` can hand back a right-padding tokenizer). Sampling is
seeded under a forked torch RNG, so the caller's RNG state is untouched and results repeat for the same seed,
batch size and thread count.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from efficient_rlvr.rewards import verifier_reward


@torch.no_grad()
def generate_completions(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[Any],
    max_new_tokens: int = 48,
    temperature: float | None = 1.0,
    batch_size: int = 256,
) -> tuple[list[str], list[int], list[bool]]:
    """Generate one completion per prompt (conversational or plain string), left-padded batches.

    ``temperature=None`` (or 0) decodes greedily. Returns texts (special tokens removed), token counts (up to and
    including the end-of-turn token) and whether each completion was truncated. The tokenizer's ``padding_side`` is
    set to ``"left"`` for the call and restored afterwards.
    """
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        return _generate(model, tokenizer, prompts, max_new_tokens, temperature, batch_size)
    finally:
        tokenizer.padding_side = old_side


def _generate(model, tokenizer, prompts, max_new_tokens, temperature, batch_size):
    texts: list[str] = []
    lengths: list[int] = []
    truncated: list[bool] = []
    eos_id = tokenizer.eos_token_id
    device = next(model.parameters()).device
    greedy = temperature is None or temperature == 0
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        rendered = [
            p if isinstance(p, str) else tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
            for p in chunk
        ]
        enc = tokenizer(rendered, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        gen_kwargs: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "eos_token_id": eos_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
        if greedy:
            gen_kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
        else:
            gen_kwargs.update(do_sample=True, temperature=float(temperature), top_k=0, top_p=1.0)
        out = model.generate(**enc, **gen_kwargs)  # [b, P + T]
        new = out[:, enc["input_ids"].shape[1] :]  # [b, T]
        for row in new.tolist():
            if eos_id in row:
                n = row.index(eos_id) + 1
                lengths.append(n)
                truncated.append(False)
            else:
                n = len(row)
                while n > 0 and row[n - 1] == tokenizer.pad_token_id:
                    n -= 1
                lengths.append(n)
                truncated.append(True)
            texts.append(tokenizer.decode(row[:n], skip_special_tokens=True))
    return texts, lengths, truncated


def evaluate_accuracy(
    model: torch.nn.Module,
    tokenizer: Any,
    dataset: Any,
    num_samples: int = 4,
    temperature: float = 1.0,
    max_new_tokens: int = 48,
    batch_size: int = 256,
    seed: int = 0,
    reward_fn: Callable[..., list[float]] = verifier_reward,
    greedy: bool = True,
    group_by: str | None = "num_terms",
) -> dict[str, float]:
    """Held-out accuracy with ``num_samples`` samples per prompt plus greedy accuracy.

    Args:
        model: a causal LM with ``generate`` (evaluated in eval mode; its training mode is restored).
        tokenizer: its tokenizer (chat template; padding is forced to the left for the call).
        dataset: rows with a ``prompt`` column (conversational or string) and the reward's columns.
        num_samples: samples per prompt (k >= 1).
        temperature: sampling temperature (> 0); top-k is off and top-p is 1.
        max_new_tokens: completion budget; completions without an end-of-turn are scored as generated.
        batch_size: sequences per ``generate`` call.
        seed: torch seed for sampling (forked RNG: the global state is not changed).
        reward_fn: TRL-style reward ``f(completions, **columns) -> list[float]``; reward >= 1 counts as correct
            for the 0/k and k/k fractions.
        greedy: also decode greedily.
        group_by: metadata field to break the sampled accuracy down by (skipped when absent).

    Returns:
        dict of floats, see the module docstring.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (greedy is reported separately), got {temperature}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(dataset) == 0:
        raise ValueError("dataset is empty")
    if "prompt" not in dataset.column_names:
        raise ValueError(f"dataset needs a 'prompt' column; columns: {dataset.column_names}")

    t0 = time.perf_counter()
    rows = [dataset[i] for i in range(len(dataset))]
    columns = [c for c in dataset.column_names if c != "prompt"]
    prompts = [row["prompt"] for row in rows]
    was_training = model.training
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            repeated = [p for p in prompts for _ in range(num_samples)]
            texts, lengths, truncated = generate_completions(
                model, tokenizer, repeated, max_new_tokens, temperature, batch_size
            )
            greedy_texts = None
            if greedy:
                greedy_texts, _, _ = generate_completions(model, tokenizer, prompts, max_new_tokens, None, batch_size)
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)

    def score(completions: list[str], repeat: int) -> list[float]:
        kwargs = {c: [row[c] for row in rows for _ in range(repeat)] for c in columns}
        kwargs["prompts"] = [p for p in prompts for _ in range(repeat)]
        return [float(r) if r is not None else 0.0 for r in reward_fn(completions=completions, **kwargs)]

    rewards = torch.tensor(score(texts, num_samples), dtype=torch.float32).view(len(rows), num_samples)  # [N, k]
    correct = rewards >= 1.0  # [N, k]
    n_right = correct.sum(dim=1)  # [N]
    metrics: dict[str, float] = {
        "accuracy": rewards.mean().item(),
        "frac_all_wrong": (n_right == 0).float().mean().item(),
        "frac_all_correct": (n_right == num_samples).float().mean().item(),
        "frac_mixed": ((n_right > 0) & (n_right < num_samples)).float().mean().item(),
        "mean_completion_tokens": float(sum(lengths) / len(lengths)),
        "frac_truncated": float(sum(truncated) / len(truncated)),
        "num_prompts": float(len(rows)),
        "num_samples": float(num_samples),
    }
    if greedy_texts is not None:
        metrics["greedy_accuracy"] = float(sum(score(greedy_texts, 1)) / len(rows))
    if group_by is not None and "metadata" in columns:
        groups: dict[Any, list[float]] = defaultdict(list)
        for i, row in enumerate(rows):
            meta = row["metadata"]
            meta = json.loads(meta) if isinstance(meta, str) else meta
            if isinstance(meta, dict) and group_by in meta:
                groups[meta[group_by]].extend(rewards[i].tolist())
        for key in sorted(groups, key=str):
            metrics[f"accuracy/{group_by}={key}"] = float(sum(groups[key]) / len(groups[key]))
    metrics["seconds"] = time.perf_counter() - t0
    return metrics
