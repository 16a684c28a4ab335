"""Does the quality head rank the rollouts of one prompt? `python -m efficient_rlvr.pruning.diagnose`.

ARRoL's pruning and its weighted vote need the head to tell, among the rollouts of the same prompt, which will be
right. Overall AUC cannot show it: a head that only learnt which prompts are easy scores well overall and ~0.5 within
groups. This diagnostic samples ``--num_samples`` rollouts per prompt from a policy (HF ``generate``, T=1, seeded),
teacher-forces them once to read, per rollout, the final-norm and penultimate-layer hidden states and the sampled
tokens' log-probs, and scores every rollout at ``L_detect`` (the state from which its ``L_detect``-th token was
sampled, or its last token if shorter) and at its last token with:

- head variants trained here on the rollouts of the first half of the prompts and measured on the other half (held
  out in prompts; the policy is the same): ``bce_final`` (today's head: BCE on the final-norm state), ``rank_final``
  (pairwise logistic ranking loss between the correct and incorrect rollouts of each training prompt),
  ``bce_rich`` / ``rank_rich`` (inputs: the final-norm state, the final and penultimate layers mean-pooled over the
  decoded span, and the DeepConf statistics below; standardised). Each trains on the detect and last positions
  together, as the online head does;
- ``saved_head``: the head of an ``EfficientGRPOTrainer`` checkpoint (``--state``), trained online on earlier
  rollouts (held out in time), as it is;
- ``deepconf_mean`` / ``deepconf_lowest``: trace confidence as DeepConf (arXiv 2508.15260) defines it, the mean
  log-prob of the sampled tokens and the lowest mean over a sliding window (``confidence.WINDOW`` tokens; the paper's windows
  are thousands of tokens, these completions are tens), over the span up to the position;
- ``random``: uniform scores (seeded);
- ``slip_oracle``: a perfect detector of the first arithmetic slip in the text decoded so far (chain_sum traces are
  running sums, ``3+4=7\n7-9=-2\nAnswer: -2``): score 0 once a complete line's arithmetic is wrong or does not
  continue the previous line's result, else 1. Its within-group AUC at ``L_detect`` bounds what any detector of the
  errors visible by then can reach; a slip made after ``L_detect`` cannot be seen there.

Why trace confidence stops short of the slip oracle: for the wrong rollouts of the measured half's mixed prompts, the
first line whose arithmetic is wrong is located in the tokens (`first_slip_line`) and the least likely sampled token
on it read. A slip the policy sampled with every token at p >= ``SLIP_CONFIDENT`` is a confident slip: confidence
cannot tell such a rollout from a correct one. ``slips`` reports their share and the chosen confidence's
within-group AUC against the confident and against the other slips separately.

Reported per scorer and position on the measured half: overall AUC and within-group AUC (mean over prompts whose
rollouts are mixed, with its standard error and the number of such prompts), and the within-group AUC per number of
terms of the chain_sum prompt (so that difficulty cannot pass for correctness). Then the vote over the measured
prompts: majority vs weighted by the best head variant's last-token scores (`efficient_rlvr.pruning.weighted_vote`),
by the best DeepConf statistic's, and by that statistic with DeepConf's filter (only the most confident ``--vote_keep``
fraction of a prompt's candidates vote).

The JSON (``--output``) holds ``{"within_group_auc": {"head": {"l_detect": x, "last_token": y}, "deepconf": {...},
"random": {...}}, "vote": {"majority": m, "weighted": w}, "table": [...], ...}``; "head" is the best head variant by
within-group AUC at the last token.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import time
from typing import Any

import torch
import torch.nn.functional as F

from .confidence import deepconf
from .head import QualityHead, roc_auc, within_group_auc
from .vote import majority_vote, weighted_vote

_STEP = re.compile(r"^\s*(-?\d+)\s*([+-])\s*(\d+)\s*=\s*(-?\d+)\s*$")
HEAD_STEPS = 300  # full-batch Adam steps of each offline head variant
HEAD_LR = 3e-3
SLIP_CONFIDENT = 0.5  # a slip whose every token was sampled with at least this probability is a confident one
VOTE_KEEP = 0.5  # DeepConf-filtered vote: the most confident half of a prompt's candidates vote
POSITIONS = ("l_detect", "last_token")


# ----------------------------------------------------------------------------------------------------------------
# Rollouts
@torch.no_grad()
def sample_candidates(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[Any],
    num_samples: int,
    max_new_tokens: int = 48,
    seed: int = 0,
    batch_size: int = 256,
) -> tuple[list[list[int]], list[list[list[int]]]]:
    """``num_samples`` sampled completions per prompt: ``(prompt_ids [N][P], completions [N][k][L])``.

    Completions end at (and include) the end-of-turn token, or at ``max_new_tokens``. Left-padded batches; sampling
    (T=1, top-k off) under a forked RNG seeded with ``seed`` (the caller's RNG state is untouched).
    """
    device = next(model.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompt_ids = [
        list(
            tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        )
        if not isinstance(p, str)
        else tokenizer(p, add_special_tokens=False)["input_ids"]
        for p in prompts
    ]
    flat = [ids for ids in prompt_ids for _ in range(num_samples)]
    completions: list[list[int]] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(flat), batch_size):
            chunk = flat[start : start + batch_size]
            width = max(len(ids) for ids in chunk)
            input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in chunk], device=device)  # [b, P]
            mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in chunk], device=device)
            out = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                eos_token_id=eos,
                pad_token_id=pad,
            )  # [b, P + T]
            for row in out[:, width:].tolist():
                n = row.index(eos) + 1 if eos in row else len(row)
                while eos not in row[:n] and n > 0 and row[n - 1] == pad:
                    n -= 1
                completions.append(row[:n])
    grouped = [completions[i * num_samples : (i + 1) * num_samples] for i in range(len(prompt_ids))]
    return prompt_ids, grouped


@torch.no_grad()
def rollout_features(
    model: torch.nn.Module, prompt_ids: list[int], completions: list[list[int]], l_detect: int
) -> dict[str, torch.Tensor]:
    """Teacher-forced features of one prompt's k completions, at ``L_detect`` and at the last token.

    Returns ``final_<pos>`` ``[k, H]`` (final-norm state from which the position's token was sampled), ``pooled_<pos>``
    ``[k, 2H]`` (final and penultimate layers mean-pooled over the decoded span up to the position) and
    ``logprobs`` (a list of ``[L_j]`` sampled-token log-probs). Empty completions get zeros.
    """
    device = next(model.parameters()).device
    P = len(prompt_ids)
    width = P + max(1, max(len(c) for c in completions))
    rows = [prompt_ids + c + [0] * (width - P - len(c)) for c in completions]
    mask = [[1] * (P + len(c)) + [0] * (width - P - len(c)) for c in completions]
    out = model(
        input_ids=torch.tensor(rows, device=device),
        attention_mask=torch.tensor(mask, device=device),
        output_hidden_states=True,
    )
    final, penultimate = out.hidden_states[-1].float(), out.hidden_states[-2].float()  # [k, T, H]
    logits = out.logits.float()  # [k, T, V]
    k, H = len(completions), final.shape[-1]
    features = {
        f"{kind}_{pos}": torch.zeros(k, H * (2 if kind == "pooled" else 1))
        for kind in ("final", "pooled")
        for pos in POSITIONS
    }
    logprobs = []
    for j, c in enumerate(completions):
        if not c:
            logprobs.append(torch.zeros(0))
            continue
        span = torch.arange(P - 1, P + len(c) - 1, device=device)  # states that sampled tokens 1..L
        token_logps = F.log_softmax(logits[j, span], dim=-1).gather(1, torch.tensor(c, device=device)[:, None])
        logprobs.append(token_logps.squeeze(1).cpu())
        for pos, n in (("l_detect", min(l_detect, len(c))), ("last_token", len(c))):
            features[f"final_{pos}"][j] = final[j, P + n - 2].cpu()
            states = torch.cat([final[j, P - 1 : P + n - 1], penultimate[j, P - 1 : P + n - 1]], dim=-1)  # [n, 2H]
            features[f"pooled_{pos}"][j] = states.mean(dim=0).cpu()
    features["logprobs"] = logprobs
    return features


def first_slip_free(text: str) -> bool:
    """False once a complete line ``a op b = c`` of a running-sum trace is wrong or does not start from the previous
    line's result; the last line counts only if a newline ends it (it may still be being written)."""
    lines = text.split("\n")
    previous = None
    for line in lines[:-1]:
        match = _STEP.match(line)
        if match is None:
            continue
        a, op, b, c = int(match.group(1)), match.group(2), int(match.group(3)), int(match.group(4))
        if (a + b if op == "+" else a - b) != c or (previous is not None and a != previous):
            return False
        previous = c
    return True


def first_slip_line(tokenizer: Any, completion: list[int]) -> tuple[int, int] | None:
    """Token span ``[start, end)`` of the first line of a running-sum trace that `first_slip_free` rejects: from the
    token after the previous line's end to the token that completes the wrong line (or the last token). None when the
    trace has no visible slip."""
    start = 0
    for end in range(1, len(completion) + 1):
        text = tokenizer.decode(completion[:end], skip_special_tokens=True)
        if text.endswith("\n") or end == len(completion):
            if not first_slip_free(text if text.endswith("\n") else text + "\n"):
                return start, end
            start = end
    return None


def collect(
    model: torch.nn.Module,
    tokenizer: Any,
    dataset: Any,
    num_samples: int,
    l_detect: int,
    max_new_tokens: int = 48,
    seed: int = 0,
) -> dict[str, Any]:
    """Rollouts of every prompt of ``dataset`` with their features, rewards (the task's verifier), groups, terms."""
    from efficient_rlvr.rewards import verifier_reward

    rows = [dataset[i] for i in range(len(dataset))]
    model.eval()
    prompt_ids, candidates = sample_candidates(
        model, tokenizer, [r["prompt"] for r in rows], num_samples, max_new_tokens, seed
    )
    parts: dict[str, list] = {}
    for ids, comps in zip(prompt_ids, candidates, strict=True):
        for key, value in rollout_features(model, ids, comps, l_detect).items():
            parts.setdefault(key, []).append(value)
    data: dict[str, Any] = {k: torch.cat(v) for k, v in parts.items() if k != "logprobs"}
    logprobs = [lp for group in parts["logprobs"] for lp in group]
    lengths = [len(c) for comps in candidates for c in comps]
    for pos in POSITIONS:
        stats = [
            deepconf(lp, min(l_detect, n) if pos == "l_detect" else n) for lp, n in zip(logprobs, lengths, strict=True)
        ]
        data[f"deepconf_{pos}"] = torch.tensor(stats)  # [N, 2]
    texts = [tokenizer.decode(c, skip_special_tokens=True) for comps in candidates for c in comps]
    prefixes = [tokenizer.decode(c[:l_detect], skip_special_tokens=True) for comps in candidates for c in comps]
    data["slip_l_detect"] = torch.tensor([float(first_slip_free(t)) for t in prefixes])
    spans = [first_slip_line(tokenizer, c) for comps in candidates for c in comps]  # None: no visible slip
    data["slip_last_token"] = torch.tensor([float(span is None) for span in spans])
    slip_line = [
        float(lp[span[0] : span[1]].min()) if span and span[1] > span[0] else math.nan
        for lp, span in zip(logprobs, spans, strict=True)
    ]
    data["slip_line_logprob"] = torch.tensor(slip_line)  # [N] least likely token of the first wrong line; NaN: none
    columns = [c for c in dataset.column_names if c != "prompt"]
    index = [i for i in range(len(rows)) for _ in range(num_samples)]
    rewards = verifier_reward(completions=texts, **{c: [rows[i][c] for i in index] for c in columns})
    data["labels"] = torch.tensor([float(r or 0.0) >= 1.0 for r in rewards])
    data["groups"] = torch.tensor(index)
    data["lengths"] = torch.tensor(lengths)
    data["terms"] = torch.tensor([_num_terms(rows[i]) for i in index])
    data["texts"] = texts
    data["l_detect"] = l_detect
    return data


def _num_terms(row: dict[str, Any]) -> int:
    try:
        return int(json.loads(row.get("metadata") or "{}").get("num_terms", -1))
    except (TypeError, ValueError):
        return -1


# ----------------------------------------------------------------------------------------------------------------
# Head variants
def _inputs(data: dict[str, Any], pos: str, rich: bool) -> torch.Tensor:
    if not rich:
        return data[f"final_{pos}"]
    return torch.cat([data[f"final_{pos}"], data[f"pooled_{pos}"], data[f"deepconf_{pos}"]], dim=1)


def _pairwise_loss(logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    same = groups[:, None] == groups[None, :]  # [N, N]
    pairs = same & labels[:, None] & ~labels[None, :]  # i correct, j incorrect, same prompt
    if not bool(pairs.any()):
        return logits.sum() * 0.0
    margins = logits[:, None] - logits[None, :]  # [N, N]
    return F.softplus(-margins[pairs]).mean()


def train_variant(data: dict[str, Any], train: torch.Tensor, rich: bool, objective: str, seed: int = 0):
    """Fit one head variant on the ``train`` rows (both positions); returns ``score(data, pos) -> [N]``."""
    x = torch.cat([_inputs(data, pos, rich)[train] for pos in POSITIONS])  # [2n, D]
    y = torch.cat([data["labels"][train]] * 2)
    g = torch.cat([data["groups"][train], data["groups"][train] + 10**9])  # positions never pair across
    mean, std = x.mean(dim=0), x.std(dim=0).clamp(min=1e-6)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        head = QualityHead(x.shape[1])
    optimizer = torch.optim.Adam(head.parameters(), lr=HEAD_LR, weight_decay=1e-4)
    z = (x - mean) / std
    for _ in range(HEAD_STEPS):
        logits = head(z).reshape(-1)
        if objective == "bce":
            loss = F.binary_cross_entropy_with_logits(logits, y.float())
        else:
            loss = _pairwise_loss(logits, y, g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    head.eval()

    def score(pos: str) -> torch.Tensor:
        with torch.no_grad():
            return head((_inputs(data, pos, rich) - mean) / std).reshape(-1)

    return score


# ----------------------------------------------------------------------------------------------------------------
# Report
def measure(scores: torch.Tensor, data: dict[str, Any], rows: torch.Tensor) -> dict[str, Any]:
    """Overall AUC, within-group AUC (mean, SE, prompts) and within-group AUC per number of terms, on ``rows``."""
    s, y, g, terms = scores[rows], data["labels"][rows], data["groups"][rows], data["terms"][rows]
    mean, se, n, _ = within_group_auc(s, y, g)
    per_terms = {}
    for t in sorted(set(terms.tolist())):
        m = terms == t
        per_terms[str(t)] = within_group_auc(s[m], y[m], g[m])[0]
    return {
        "auc": roc_auc(s, y),
        "within_group_auc": mean,
        "within_group_se": se,
        "mixed_prompts": n,
        "within_group_auc_by_terms": per_terms,
    }


def slip_breakdown(data: dict[str, Any], scores: torch.Tensor, rows: torch.Tensor) -> dict[str, Any]:
    """Wrong rollouts of ``rows``' mixed prompts by their first slip (see the module docstring), and the within-group
    AUC of ``scores`` against the confident slips and against the other visible slips."""
    y, g, line = data["labels"], data["groups"], data["slip_line_logprob"]
    mixed = torch.zeros_like(rows)
    for group in g[rows].unique():
        members = rows & (g == group)
        if 0 < int(y[members].sum()) < int(members.sum()):
            mixed |= members
    wrong = mixed & ~y
    visible = wrong & ~line.isnan()
    confident = visible & (line >= math.log(SLIP_CONFIDENT))
    n = max(int(wrong.sum()), 1)

    def against(kind: torch.Tensor) -> float:
        keep = mixed & (y | kind)
        return within_group_auc(scores[keep], y[keep], g[keep])[0]

    return {
        "wrong_rollouts": int(wrong.sum()),
        "visible_slip": int(visible.sum()) / n,
        "confident_slip": int(confident.sum()) / n,
        "confident_threshold": SLIP_CONFIDENT,
        "within_group_auc_vs_confident_slips": against(confident),
        "within_group_auc_vs_other_slips": against(visible & ~confident),
    }


def vote_accuracy(
    data: dict[str, Any], scores: torch.Tensor, rows: torch.Tensor, num_samples: int, keep: float = 1.0
) -> dict[str, float]:
    """Majority and score-weighted vote accuracy over the prompts of ``rows`` (answers from the rollout texts);
    ``keep``: the fraction of a prompt's candidates that vote in the weighted vote (`weighted_vote`).

    Also the headroom: ``headroom_prompts``, where the majority answer is wrong while some candidate is right (the
    only prompts where any weighting can gain), and ``right_above_majority``, the share of them where a right
    candidate scores above every candidate of the majority answer."""
    from efficient_rlvr.rewards import extract_answer

    index = rows.nonzero().flatten().tolist()
    majority = weighted = 0
    prompts = headroom = right_above = 0
    for start in range(0, len(index), num_samples):
        group = index[start : start + num_samples]
        answers = [extract_answer(data["texts"][i]) or None for i in group]
        right = {a for a, i in zip(answers, group, strict=True) if a is not None and bool(data["labels"][i])}
        voted = majority_vote(answers)
        majority += voted in right
        weighted += weighted_vote(answers, scores[group], keep) in right
        prompts += 1
        if right and voted not in right:  # only here can a weighted vote gain on the majority vote
            headroom += 1
            best = {a: max(float(scores[i]) for i, b in zip(group, answers, strict=True) if b == a) for a in right}
            voted_best = max(float(scores[i]) for i, b in zip(group, answers, strict=True) if b == voted)
            right_above += max(best.values()) > voted_best
    return {
        "majority": majority / prompts,
        "weighted": weighted / prompts,
        "prompts": prompts,
        "headroom_prompts": headroom,
        "right_above_majority": right_above / headroom if headroom else math.nan,
    }


def diagnose(
    data: dict[str, Any],
    num_samples: int,
    saved_head: QualityHead | None = None,
    seed: int = 0,
    vote_keep: float = VOTE_KEEP,
) -> dict:
    """Every scorer at both positions on the second half of the prompts; heads trained on the first half."""
    groups = data["groups"]
    half = int(groups.max()) // 2 + 1
    train, test = groups < half, groups >= half
    scorers: dict[str, Any] = {}
    timings = {}
    for rich in (False, True):
        for objective in ("bce", "rank"):
            name = f"{objective}_{'rich' if rich else 'final'}"
            start = time.perf_counter()
            scorers[name] = train_variant(data, train, rich, objective, seed)
            timings[name] = time.perf_counter() - start
    if saved_head is not None:
        saved_head = saved_head.eval()
        scorers["saved_head"] = lambda pos: saved_head.score(data[f"final_{pos}"]).cpu()
    scorers["deepconf_mean"] = lambda pos: data[f"deepconf_{pos}"][:, 0]
    scorers["deepconf_lowest"] = lambda pos: data[f"deepconf_{pos}"][:, 1]
    noise = torch.rand(len(groups), generator=torch.Generator().manual_seed(seed))
    scorers["random"] = lambda pos: noise
    scorers["slip_oracle"] = lambda pos: data[f"slip_{pos}"]
    table = []
    scores = {}
    for name, score in scorers.items():
        for pos in POSITIONS:
            scores[(name, pos)] = score(pos)
            table.append({"scorer": name, "position": pos, **measure(scores[(name, pos)], data, test)})
    heads = [n for n in scorers if n.startswith(("bce_", "rank_"))]
    best = max(heads, key=lambda n: _within(table, n, "last_token"))
    best_conf = max(("deepconf_mean", "deepconf_lowest"), key=lambda n: _within(table, n, "last_token"))
    vote = vote_accuracy(data, scores[(best, "last_token")], test, num_samples)
    confidence = scores[(best_conf, "last_token")]
    by_confidence = vote_accuracy(data, confidence, test, num_samples)
    vote["deepconf_weighted"] = by_confidence["weighted"]
    vote["deepconf_right_above_majority"] = by_confidence["right_above_majority"]
    vote["deepconf_filtered"] = vote_accuracy(data, confidence, test, num_samples, vote_keep)["weighted"]
    vote["keep"] = vote_keep
    return {
        "within_group_auc": {
            "head": {pos: _within(table, best, pos) for pos in POSITIONS},
            "deepconf": {pos: _within(table, best_conf, pos) for pos in POSITIONS},
            "random": {pos: _within(table, "random", pos) for pos in POSITIONS},
        },
        "chosen_head": best,
        "chosen_deepconf": best_conf,
        "vote": vote,
        "slips": slip_breakdown(data, confidence, test),
        "table": table,
        "head_training_seconds": timings,
        "measured_rollouts": int(test.sum()),
        "pass_rate": float(data["labels"][test].float().mean()),
        "reached_l_detect": float((data["lengths"][test] >= data["l_detect"]).float().mean()),
    }


def _within(table: list[dict], scorer: str, pos: str) -> float:
    value = next(r["within_group_auc"] for r in table if r["scorer"] == scorer and r["position"] == pos)
    return -math.inf if value != value else value


def format_table(result: dict[str, Any]) -> str:
    """The markdown table: scorer x position, overall and within-group AUC."""
    lines = ["| scorer | position | AUC | within-group AUC (SE, prompts) |", "|---|---|---|---|"]
    for row in result["table"]:
        lines.append(
            f"| {row['scorer']} | {row['position']} | {row['auc']:.3f} | {row['within_group_auc']:.3f} "
            f"({row['within_group_se']:.3f}, {row['mixed_prompts']}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from efficient_rlvr.run import load_tokenizer_for, resolve_model_path
    from efficient_rlvr.tasks import load_task_splits

    from .stage import quality_head_from_state

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", required=True, help="policy folder (a run's output_dir or checkpoint) or 'embedded'"
    )
    parser.add_argument(
        "--state", default=None, help="checkpoint folder / efficient_rlvr_state.pt with a pruning head"
    )
    parser.add_argument("--dataset_name", default="embedded")
    parser.add_argument("--eval_size", type=int, default=400, help="held-out prompts (half train the variants)")
    parser.add_argument("--data_seed", type=int, default=0)
    parser.add_argument("--num_samples", type=int, default=8)
    parser.add_argument("--l_detect", type=int, default=12)
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--vote_keep", type=float, default=VOTE_KEEP, help="fraction of candidates in the DeepConf-filtered vote"
    )
    parser.add_argument("--torch_threads", type=int, default=None)
    parser.add_argument("--output", default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    for name in ("eval_size", "num_samples", "l_detect", "max_new_tokens"):
        if getattr(args, name) < (4 if name == "eval_size" else 1):
            raise SystemExit(f"--{name} must be >= {4 if name == 'eval_size' else 1}, got {getattr(args, name)}")
    if not 0.0 < args.vote_keep <= 1.0:
        raise SystemExit(f"--vote_keep must be in (0, 1], got {args.vote_keep}")
    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    model_path = resolve_model_path(args.model)
    saved = quality_head_from_state(args.state) if args.state else None
    tokenizer = load_tokenizer_for(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    _, eval_ds = load_task_splits(args.dataset_name, train_size=1, eval_size=args.eval_size, seed=args.data_seed)
    start = time.perf_counter()
    data = collect(model, tokenizer, eval_ds, args.num_samples, args.l_detect, args.max_new_tokens, args.seed)
    result = diagnose(data, args.num_samples, saved, args.seed, args.vote_keep)
    result.update(
        model=model_path,
        state=args.state,
        eval_size=args.eval_size,
        num_samples=args.num_samples,
        l_detect=args.l_detect,
        seconds=time.perf_counter() - start,
    )
    print(format_table(result))
    w, v = result["within_group_auc"], result["vote"]
    print(
        f"chosen head {result['chosen_head']}: within-group AUC {w['head']['l_detect']:.3f} at L_detect, "
        f"{w['head']['last_token']:.3f} at the last token (DeepConf {w['deepconf']['last_token']:.3f}, random "
        f"{w['random']['last_token']:.3f}); vote on {v['prompts']} prompts: majority {v['majority']:.3f}, "
        f"head-weighted {v['weighted']:.3f}, DeepConf-weighted {v['deepconf_weighted']:.3f}, DeepConf-filtered "
        f"(keep {v['keep']:g}) {v['deepconf_filtered']:.3f}; on the {v['headroom_prompts']} prompts whose majority "
        f"answer is wrong while a candidate is right, a right candidate is the most confident in "
        f"{v['deepconf_right_above_majority']:.0%}",
        flush=True,
    )
    slips = result["slips"]
    print(
        f"{slips['wrong_rollouts']} wrong rollouts in mixed prompts: {slips['visible_slip']:.0%} with a visible slip, "
        f"{slips['confident_slip']:.0%} confident slips (every token p >= {SLIP_CONFIDENT}); DeepConf within-group "
        f"AUC {slips['within_group_auc_vs_confident_slips']:.3f} against those, "
        f"{slips['within_group_auc_vs_other_slips']:.3f} against the other slips",
        flush=True,
    )
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
