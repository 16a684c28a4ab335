"""Test-time voting with the ARRoL quality head: majority vote vs head-weighted vote on a held-out split.

ARRoL (arXiv 2603.24840, section 4.4) reuses the quality head trained during RL at test time: for each held-out
prompt, k completions are sampled from the trained policy; the head scores every finished candidate (the final-norm
hidden state from which its last token was sampled, the position it was trained on); candidates vote for their
answer (``efficient_rlvr.rewards.extract_answer``) with weights from their score ranks rescaled to [0, 1]
(`efficient_rlvr.pruning.weighted_vote`), against a plain majority vote (`majority_vote`). A voted answer is right
when the task's verifier scores ``"Answer: <answer>"`` 1.0. The vote a user should take (``vote_used``) is the
weighted one only where it beat the majority vote on the first ``--calibration_prompts`` prompts
(`efficient_rlvr.pruning.choose_vote`); ``chosen_accuracy`` is that vote's accuracy on the other prompts, next to
both votes' accuracy on the same prompts. ``--scorer deepconf`` weights the vote by DeepConf's trace confidence
instead (arXiv 2508.15260: the lowest 4-token-window mean of the sampled tokens' log-probs under the policy, which
ranks the candidates of one prompt better than the head on the embedded task; no head needed). ``--keep f`` lets
only the best-scored fraction ``f`` of each prompt's candidates vote (DeepConf's confidence filter;
`weighted_vote`'s ``keep``).

    python examples/eval_vote.py --model outputs/arrol/checkpoint-40 --state outputs/arrol/checkpoint-40 \
        [--num_samples 8 --eval_size 400 --calibration_prompts 100 --scorer head|deepconf --keep 1.0 --output vote.json]

``--model``: a trained policy folder (a checkpoint folder holds model and tokenizer); ``--state``: the checkpoint
folder or its ``efficient_rlvr_state.pt`` written by `EfficientGRPOTrainer` with ``pruning=True`` (default: the
model folder). Candidates are sampled with HF ``generate`` (temperature 1, top-k off) under a forked, seeded RNG;
hidden states and sampled-token log-probs come from one teacher-forced forward of prompt + completion
(`efficient_rlvr.pruning.diagnose.rollout_features`; the states equal the vLLM states the head was trained on, to
float precision).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from typing import Any

import torch

from efficient_rlvr.pruning import QualityHead, choose_vote, majority_vote, weighted_vote
from efficient_rlvr.pruning.confidence import deepconf
from efficient_rlvr.pruning.diagnose import rollout_features, sample_candidates
from efficient_rlvr.rewards import extract_answer, verifier_reward

SCORERS = ("head", "deepconf")


def vote_accuracy(
    model: torch.nn.Module,
    tokenizer: Any,
    head: QualityHead | None,
    dataset: Any,
    num_samples: int = 8,
    max_new_tokens: int = 48,
    seed: int = 0,
    batch_size: int = 256,
    reward_fn: Callable[..., list[float]] = verifier_reward,
    return_details: bool = False,
    calibration_prompts: int = 0,
    scorer: str = "head",
    keep: float = 1.0,
) -> dict[str, Any]:
    """Majority vs score-weighted vote accuracy over ``dataset`` (rows with ``prompt`` and the reward's columns).

    ``scorer``: ``"head"`` (the quality head on the last-token state) or ``"deepconf"`` (DeepConf's trace
    confidence, the lowest sliding-window mean of the sampled tokens' log-probs under the policy,
    `efficient_rlvr.pruning.diagnose.deepconf`; ``head`` may then be None). ``head_auc`` is the scorer's AUC.
    ``keep``: the fraction of each prompt's candidates that vote in the weighted vote, best-scored first
    (`weighted_vote`).

    Returns ``majority_accuracy``, ``weighted_accuracy``, ``sample_accuracy`` (mean reward of single samples),
    ``oracle_accuracy`` (some sample right), ``head_auc`` (scores vs sample correctness), counts and seconds; with
    ``return_details`` also ``details``: per prompt the token ids, answers, scores and sample rewards. With
    ``calibration_prompts`` > 0 the first that many prompts choose the vote (``vote_used``, `choose_vote`) and the
    other prompts report ``chosen_accuracy`` with ``majority_accuracy_rest`` / ``weighted_accuracy_rest``.
    """
    if not 0 <= calibration_prompts < len(dataset):
        raise ValueError(
            f"calibration_prompts must be in [0, {len(dataset)}) (prompts left to report on), got {calibration_prompts}"
        )
    from efficient_rlvr.pruning import roc_auc

    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if scorer not in SCORERS or (scorer == "head" and head is None):
        raise ValueError(f"vote_accuracy: scorer must be one of {SCORERS} (with a head for 'head'), got {scorer!r}")
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"vote_accuracy: keep must be in (0, 1], got {keep}")
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    if head is not None:
        head.eval()
    rows = [dataset[i] for i in range(len(dataset))]
    columns = [c for c in dataset.column_names if c != "prompt"]
    try:
        prompt_ids, candidates = sample_candidates(
            model, tokenizer, [r["prompt"] for r in rows], num_samples, max_new_tokens, seed, batch_size
        )
        scores = []
        for ids, comps in zip(prompt_ids, candidates, strict=True):
            with torch.no_grad():
                features = rollout_features(model, ids, comps, l_detect=1)  # teacher-forced, one forward
            if scorer == "deepconf":
                scores.append([deepconf(lp, lp.numel())[1] for lp in features["logprobs"]])  # k x [L_j]
            else:
                scores.append(head.score(features["final_last_token"]).cpu().tolist())  # [k]
    finally:
        model.train(was_training)

    def correct(texts: list[str], row_index: list[int]) -> list[float]:
        kwargs = {c: [rows[i][c] for i in row_index] for c in columns}
        return [float(r or 0.0) for r in reward_fn(completions=texts, **kwargs)]

    texts = [[tokenizer.decode(c, skip_special_tokens=True) for c in comps] for comps in candidates]
    answers = [[extract_answer(t) or None for t in ts] for ts in texts]
    sample_rewards = correct(
        [t for ts in texts for t in ts], [i for i in range(len(rows)) for _ in range(num_samples)]
    )
    majority = [majority_vote(a) for a in answers]
    weighted = [weighted_vote(a, s, keep) for a, s in zip(answers, scores, strict=True)]

    def voted(choices: list[Any]) -> list[float]:
        index = [i for i, a in enumerate(choices) if a is not None]
        values = correct([f"Answer: {choices[i]}" for i in index], index)
        out = [0.0] * len(choices)
        for i, v in zip(index, values, strict=True):
            out[i] = v
        return out

    maj, wei = voted(majority), voted(weighted)
    k = num_samples
    per_prompt = [sample_rewards[i * k : (i + 1) * k] for i in range(len(rows))]
    flat_scores = torch.tensor([s for ss in scores for s in ss])
    result: dict[str, Any] = {
        "num_prompts": len(rows),
        "num_samples": k,
        "majority_accuracy": sum(maj) / len(rows),
        "weighted_accuracy": sum(wei) / len(rows),
        "sample_accuracy": sum(sample_rewards) / len(sample_rewards),
        "oracle_accuracy": sum(max(r) >= 1.0 for r in per_prompt) / len(rows),
        "head_auc": roc_auc(flat_scores, torch.tensor(sample_rewards) >= 1.0),
        "votes_changed": sum(m != w for m, w in zip(majority, weighted, strict=True)),
        "keep": keep,
        "seconds": time.perf_counter() - start,
    }
    if calibration_prompts:
        c = calibration_prompts
        used = choose_vote(maj[:c], wei[:c])
        rest = len(rows) - c
        result.update(
            calibration_prompts=c,
            vote_used=used,
            calibration_majority_accuracy=sum(maj[:c]) / c,
            calibration_weighted_accuracy=sum(wei[:c]) / c,
            majority_accuracy_rest=sum(maj[c:]) / rest,
            weighted_accuracy_rest=sum(wei[c:]) / rest,
            chosen_accuracy=sum((wei if used == "weighted" else maj)[c:]) / rest,
        )
    if return_details:
        result["details"] = [
            {
                "prompt_ids": prompt_ids[i],
                "completion_ids": candidates[i],
                "answers": answers[i],
                "scores": scores[i],
                "sample_rewards": per_prompt[i],
                "majority": majority[i],
                "weighted": weighted[i],
                "majority_correct": maj[i],
                "weighted_correct": wei[i],
            }
            for i in range(len(rows))
        ]
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from efficient_rlvr.pruning.stage import quality_head_from_state
    from efficient_rlvr.run import load_tokenizer_for, resolve_model_path
    from efficient_rlvr.tasks import load_task_splits

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="trained policy folder (or 'embedded' for the base model)")
    parser.add_argument(
        "--state", default=None, help="checkpoint folder or efficient_rlvr_state.pt (default: --model)"
    )
    parser.add_argument("--dataset_name", default="embedded")
    parser.add_argument("--eval_size", type=int, default=400)
    parser.add_argument("--data_seed", type=int, default=0, help="same as training: the held-out split")
    parser.add_argument("--num_samples", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument(
        "--calibration_prompts", type=int, default=100, help="prompts that choose the vote (0: report both only)"
    )
    parser.add_argument(
        "--scorer", default="head", choices=SCORERS, help="weights of the weighted vote: the head, or DeepConf"
    )
    parser.add_argument(
        "--keep", type=float, default=1.0, help="fraction of each prompt's candidates that vote, best-scored first"
    )
    parser.add_argument("--torch_threads", type=int, default=None)
    parser.add_argument("--output", default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)

    if not 0.0 < args.keep <= 1.0:
        raise SystemExit(f"--keep must be in (0, 1], got {args.keep}")
    model_path = resolve_model_path(args.model)
    head = quality_head_from_state(args.state or model_path) if args.scorer == "head" else None
    tokenizer = load_tokenizer_for(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    _, eval_ds = load_task_splits(args.dataset_name, train_size=1, eval_size=args.eval_size, seed=args.data_seed)
    result = vote_accuracy(
        model,
        tokenizer,
        head,
        eval_ds,
        num_samples=args.num_samples,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        batch_size=args.batch_size,
        calibration_prompts=args.calibration_prompts,
        scorer=args.scorer,
        keep=args.keep,
    )
    result.update(model=model_path, state=args.state or model_path, eval_size=args.eval_size, scorer=args.scorer)
    print(
        f"{result['num_prompts']} prompts x {result['num_samples']} samples: majority {result['majority_accuracy']:.3f}"
        f", {args.scorer}-weighted {result['weighted_accuracy']:.3f} (single sample {result['sample_accuracy']:.3f}, "
        f"oracle {result['oracle_accuracy']:.3f}, {args.scorer} AUC {result['head_auc']:.3f}, "
        f"{result['votes_changed']} votes changed)",
        flush=True,
    )
    if "vote_used" in result:
        print(
            f"vote used: {result['vote_used']} (on the first {result['calibration_prompts']} prompts: majority "
            f"{result['calibration_majority_accuracy']:.3f}, weighted {result['calibration_weighted_accuracy']:.3f}); "
            f"on the other prompts: chosen {result['chosen_accuracy']:.3f}, majority "
            f"{result['majority_accuracy_rest']:.3f}, weighted {result['weighted_accuracy_rest']:.3f}",
            flush=True,
        )
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
