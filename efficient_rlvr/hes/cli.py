"""Score (prompt, response) pairs by HES and keep the top fraction (data selection for SFT / RFT).

Usage:

    python -m efficient_rlvr.hes.cli --model DIR --data FILE.jsonl --prompt_column prompt \\
        --response_column response --top_fraction 0.2 --output_dir OUT

``--data`` is a .jsonl / .json / .csv file, a directory written by ``datasets.save_to_disk``, or a dataset name for
``datasets.load_dataset`` (needs a local cache when offline). A prompt is a string (wrapped as one user message when
the tokenizer has a chat template, unless ``--chat_template no``) or a list of chat messages; a response is a string
or a list of messages (their contents are joined). Each pair is teacher-forced through the scoring model and scored
by `high_entropy_sum` over the response tokens.

Writes to ``--output_dir``:
- ``scores.jsonl`` (or ``scores.csv``): ``index, hes, length, n_high`` per row (length = response tokens scored,
  n_high = tokens in the sum); HES grows with length, so both are reported;
- ``top.jsonl``: the ``max(1, round(top_fraction * N))`` rows with the highest HES (ties: lower index first), original
  fields plus ``hes``, ``length`` and ``index``, highest first;
- ``summary.json``: counts, means, the HES threshold of the top set, the HES-length Pearson correlation, time.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from .score import high_entropy_mask, pearson, token_entropies


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m efficient_rlvr.hes.cli", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="directory of the scoring model (and its tokenizer)")
    p.add_argument("--data", required=True, help=".jsonl/.json/.csv file, save_to_disk directory, or dataset name")
    p.add_argument("--prompt_column", default="prompt")
    p.add_argument("--response_column", default="response")
    p.add_argument("--top_fraction", type=float, default=0.2, help="share of rows kept in top.jsonl, in (0, 1]")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--split", default="train", help="split, for dataset directories and names")
    p.add_argument("--quantile", type=float, default=0.995, help="entropy quantile; tokens at or above it count")
    p.add_argument("--scope", choices=["sequence", "batch"], default="sequence", help="where the quantile is taken")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_prompt_length", type=int, default=None, help="keep the last N prompt tokens")
    p.add_argument("--max_response_length", type=int, default=None, help="keep the first N response tokens")
    p.add_argument("--chat_template", choices=["auto", "yes", "no"], default="auto")
    p.add_argument("--append_eos", action="store_true", help="score an EOS token after each response")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', ...")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--format", choices=["jsonl", "csv"], default="jsonl", help="format of the scores file")
    p.add_argument("--limit", type=int, default=None, help="score only the first N rows")
    p.add_argument("--num_threads", type=int, default=None, help="torch CPU threads")
    return p


def load_rows(data: str, split: str) -> list[dict[str, Any]]:
    """Read the data as a list of dicts (see the module docstring for the accepted sources)."""
    if os.path.isfile(data):
        if data.endswith(".csv"):
            with open(data, newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f))
        with open(data, encoding="utf-8") as f:
            text = f.read()
        if data.endswith(".json") and text.lstrip().startswith("["):
            return list(json.loads(text))
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    import datasets

    if os.path.isdir(data):
        ds = datasets.load_from_disk(data)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"split {split!r} not in {data} (has {sorted(ds)}).")
            ds = ds[split]
    else:
        ds = datasets.load_dataset(data, split=split)
    return [dict(r) for r in ds]


def _message_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value):
        return "".join(str(m["content"]) for m in value)
    raise ValueError(f"a response must be a string or a list of messages, got {type(value).__name__}.")


def encode_pair(tokenizer: Any, prompt: Any, response: Any, args: argparse.Namespace) -> tuple[list[int], list[int]]:
    """Token ids of one (prompt, response) pair, truncated as configured."""
    has_template = getattr(tokenizer, "chat_template", None) is not None
    use_template = args.chat_template == "yes" or (args.chat_template == "auto" and has_template)
    if isinstance(prompt, list) or use_template:
        if not has_template:
            raise ValueError("a chat-format prompt (or --chat_template yes) needs a tokenizer with a chat template.")
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        prompt_ids = tokenizer(str(prompt), add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(_message_text(response), add_special_tokens=False)["input_ids"]
    if args.append_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError("--append_eos needs a tokenizer with an EOS token.")
        response_ids = response_ids + [tokenizer.eos_token_id]
    if args.max_prompt_length is not None:
        prompt_ids = prompt_ids[-args.max_prompt_length :]
    if args.max_response_length is not None:
        response_ids = response_ids[: args.max_response_length]
    if not prompt_ids:
        raise ValueError("a prompt encodes to no tokens; HES needs at least one prompt token as context.")
    return list(prompt_ids), list(response_ids)


def score_pairs(
    model: torch.nn.Module,
    pairs: Sequence[tuple[list[int], list[int]]],
    pad_id: int,
    batch_size: int,
    quantile: float,
    scope: str,
    temperature: float = 1.0,
) -> tuple[list[float], list[int], list[int]]:
    """HES, length and kept-token count per pair; batches rows of similar length (order of the output = input).

    With ``scope="batch"`` the quantile is taken over each scoring batch.
    """
    device = next(model.parameters()).device
    order = sorted(range(len(pairs)), key=lambda i: (len(pairs[i][0]) + len(pairs[i][1]), i))
    hes, n_high = [0.0] * len(pairs), [0] * len(pairs)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        P = max(len(pairs[i][0]) for i in idx)
        T = max(max(len(pairs[i][1]) for i in idx), 1)
        prompt_ids = torch.full((len(idx), P), pad_id, dtype=torch.long)  # [b, P], left-padded
        prompt_mask = torch.zeros(len(idx), P, dtype=torch.long)
        completion_ids = torch.full((len(idx), T), pad_id, dtype=torch.long)  # [b, T], right-padded
        completion_mask = torch.zeros(len(idx), T, dtype=torch.long)
        for row, i in enumerate(idx):
            p, c = pairs[i]
            prompt_ids[row, P - len(p) :] = torch.tensor(p)
            prompt_mask[row, P - len(p) :] = 1
            if c:
                completion_ids[row, : len(c)] = torch.tensor(c)
                completion_mask[row, : len(c)] = 1
        ent = token_entropies(
            model,
            prompt_ids.to(device),
            prompt_mask.to(device),
            completion_ids.to(device),
            completion_mask.to(device),
            temperature=temperature,
        )  # [b, T]
        keep = high_entropy_mask(ent, completion_mask.to(ent.device), quantile, scope)  # [b, T]
        sums = (ent * keep).sum(dim=1).tolist()
        counts = keep.sum(dim=1).tolist()
        for row, i in enumerate(idx):
            hes[i], n_high[i] = float(sums[row]), int(counts[row])
    lengths = [len(c) for _, c in pairs]
    return hes, lengths, n_high


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0.0 < args.top_fraction <= 1.0:
        parser.error(f"--top_fraction must be in (0, 1], got {args.top_fraction}.")
    if not 0.0 <= args.quantile <= 1.0:
        parser.error(f"--quantile must be in [0, 1], got {args.quantile}.")
    if args.batch_size < 1:
        parser.error(f"--batch_size must be >= 1, got {args.batch_size}.")
    if not args.temperature > 0:
        parser.error(f"--temperature must be > 0, got {args.temperature}.")
    for name in ("max_prompt_length", "max_response_length", "limit", "num_threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if not os.path.isdir(args.model):
        parser.error(f"--model {args.model!r} is not a directory.")
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)

    try:
        rows = load_rows(args.data, args.split)
    except Exception as e:  # any loader failure (missing file, bad JSON, no cached dataset) is a usage error here
        parser.error(f"cannot read --data {args.data!r}: {type(e).__name__}: {e}")
    if args.limit is not None:
        rows = rows[: args.limit]
    if not rows:
        parser.error(f"--data {args.data!r} has no rows.")
    for column, flag in ((args.prompt_column, "--prompt_column"), (args.response_column, "--response_column")):
        missing = [i for i, r in enumerate(rows) if column not in r]
        if missing:
            available = sorted(rows[missing[0]].keys())
            parser.error(
                f"{flag} {column!r} is missing in {len(missing)} of {len(rows)} rows (first: row {missing[0]}); "
                f"available columns: {', '.join(available)}."
            )

    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).to(device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    try:
        pairs = [encode_pair(tokenizer, r[args.prompt_column], r[args.response_column], args) for r in rows]
    except ValueError as e:
        parser.error(str(e))
    hes, lengths, n_high = score_pairs(
        model, pairs, pad_id, args.batch_size, args.quantile, args.scope, args.temperature
    )
    elapsed = time.perf_counter() - start

    os.makedirs(args.output_dir, exist_ok=True)
    scores = [
        {"index": i, "hes": h, "length": n, "n_high": k}
        for i, (h, n, k) in enumerate(zip(hes, lengths, n_high, strict=True))
    ]
    scores_path = os.path.join(args.output_dir, f"scores.{args.format}")
    with open(scores_path, "w", encoding="utf-8", newline="") as f:
        if args.format == "csv":
            writer = csv.DictWriter(f, fieldnames=["index", "hes", "length", "n_high"])
            writer.writeheader()
            writer.writerows(scores)
        else:
            f.writelines(json.dumps(s) + "\n" for s in scores)
    n_top = max(1, round(args.top_fraction * len(rows)))
    top = sorted(range(len(rows)), key=lambda i: (-hes[i], i))[:n_top]
    top_path = os.path.join(args.output_dir, "top.jsonl")
    with open(top_path, "w", encoding="utf-8") as f:
        for i in top:
            record = dict(rows[i])
            record.update({"hes": hes[i], "length": lengths[i], "index": i})
            f.write(json.dumps(record, default=str) + "\n")
    hes_t, len_t = torch.tensor(hes), torch.tensor(lengths, dtype=torch.float32)
    summary = {
        "model": args.model,
        "data": args.data,
        "rows": len(rows),
        "top_rows": n_top,
        "top_fraction": args.top_fraction,
        "top_min_hes": hes[top[-1]],
        "quantile": args.quantile,
        "scope": args.scope,
        "hes_mean": float(hes_t.mean()),
        "hes_mean_top": float(hes_t[top].mean()),
        "length_mean": float(len_t.mean()),
        "length_mean_top": float(len_t[top].mean()),
        "hes_length_pearson": pearson(hes_t, len_t),
        "seconds": elapsed,
    }
    with open(os.path.join(args.output_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(
            {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in summary.items()}, f, indent=2
        )
    print(
        f"scored {len(rows)} rows in {elapsed:.1f}s: mean HES {summary['hes_mean']:.4f} (top {n_top}: "
        f"{summary['hes_mean_top']:.4f}), mean length {summary['length_mean']:.1f} (top: "
        f"{summary['length_mean_top']:.1f}), HES-length r = {summary['hes_length_pearson']:.3f}; "
        f"wrote {scores_path} and {top_path}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
