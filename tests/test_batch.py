"""Row operations on TRL generation batches (efficient_rlvr.batch), with a real single-process Accelerator."""

import pytest
import torch
from accelerate import Accelerator

from efficient_rlvr.batch import index_rows, keep_rows, split_rows


def _batch(n: int = 6) -> dict:
    completion_mask = torch.tensor([[1] * (i + 1) + [0] * (n - i - 1) for i in range(n)])
    return {
        "prompt_ids": torch.arange(n)[:, None].repeat(1, 3),
        "completion_ids": torch.arange(n)[:, None].repeat(1, n),
        "completion_mask": completion_mask,
        "advantages": torch.linspace(-1, 1, n),
        "num_items_in_batch": completion_mask.sum(),
        "tags": [f"row{i}" for i in range(n)],
    }


def test_keep_rows_drops_and_recounts_tokens():
    batch = _batch()
    out = keep_rows(batch, torch.tensor([1, 0, 1, 0, 0, 1], dtype=torch.bool), Accelerator(cpu=True))
    assert out["prompt_ids"][:, 0].tolist() == [0, 2, 5]
    assert out["tags"] == ["row0", "row2", "row5"]
    assert int(out["num_items_in_batch"]) == 1 + 3 + 6
    torch.testing.assert_close(out["advantages"], batch["advantages"][[0, 2, 5]])


def test_keep_rows_pads_with_inert_rows_up_to_min_rows():
    batch = _batch()
    out = keep_rows(batch, torch.tensor([0, 1, 0, 0, 0, 0], dtype=torch.bool), Accelerator(cpu=True), min_rows=3)
    assert out["completion_ids"].shape[0] == 3
    assert out["prompt_ids"][:, 0].tolist() == [1, 0, 2]  # the kept row, then dropped rows as padding
    assert out["completion_mask"][1:].sum() == 0 and out["advantages"][1:].abs().sum() == 0
    assert int(out["num_items_in_batch"]) == 2  # padding contributes no tokens


def test_keep_rows_rejects_a_mask_of_the_wrong_length():
    with pytest.raises(ValueError, match="keep has shape"):
        keep_rows(_batch(), torch.ones(4, dtype=torch.bool), Accelerator(cpu=True))


def test_split_rows_sizes_differ_by_at_most_one_and_cover_every_row():
    chunks = split_rows(_batch(7), 3)
    assert [c["completion_ids"].shape[0] for c in chunks] == [2, 3, 2]
    assert torch.cat([c["prompt_ids"][:, 0] for c in chunks]).tolist() == list(range(7))
    assert all(int(c["num_items_in_batch"]) == int(_batch(7)["num_items_in_batch"]) for c in chunks)
    with pytest.raises(ValueError, match="cannot fill"):
        split_rows(_batch(2), 3)


def test_index_rows_allows_repeats():
    out = index_rows(_batch(), torch.tensor([4, 4, 0]))
    assert out["tags"] == ["row4", "row4", "row0"]


def test_concat_batches_pads_each_per_token_entry_with_its_neutral_value():
    """Completion-aligned entries are right-padded: masks, log-probs with 0, `tool_mask` and a per-token
    `importance_sampling_ratio` with 1 (TRL's value at padded positions; vespo sums log(ratio) over every column),
    token ids with the pad id; a sequence-level ratio `[N, 1]` is not padded."""
    from efficient_rlvr.batch import concat_batches

    def part(n: int, width: int, seed: int) -> dict:
        gen = torch.Generator().manual_seed(seed)
        return {
            "prompt_ids": torch.ones(n, 2, dtype=torch.long),
            "prompt_mask": torch.ones(n, 2, dtype=torch.long),
            "completion_ids": torch.full((n, width), 5),
            "completion_mask": torch.ones(n, width, dtype=torch.long),
            "old_per_token_logps": -torch.rand(n, width, generator=gen),
            "importance_sampling_ratio": 0.5 + torch.rand(n, width, generator=gen),
            "tool_mask": torch.ones(n, width, dtype=torch.long),
            "advantages": torch.randn(n, generator=gen),
            "num_items_in_batch": torch.tensor(n * width),
        }

    a, b = part(2, 3, 0), part(3, 5, 1)
    out = concat_batches([a, b], pad_token_id=9)
    pad = (slice(0, 2), slice(3, 5))
    assert torch.equal(out["importance_sampling_ratio"][pad], torch.ones(2, 2))
    assert torch.equal(out["tool_mask"][pad], torch.ones(2, 2, dtype=torch.long))
    assert torch.equal(out["completion_mask"][pad], torch.zeros(2, 2, dtype=torch.long))
    assert torch.equal(out["old_per_token_logps"][pad], torch.zeros(2, 2))
    assert torch.equal(out["completion_ids"][pad], torch.full((2, 2), 9))
    torch.testing.assert_close(out["importance_sampling_ratio"][:2, :3], a["importance_sampling_ratio"])
    assert int(out["num_items_in_batch"]) == 6 + 15
    seq = concat_batches(
        [{**a, "importance_sampling_ratio": torch.rand(2, 1)}, {**b, "importance_sampling_ratio": torch.rand(3, 1)}],
        pad_token_id=9,
        sequence_level_keys=("importance_sampling_ratio",),
    )
    assert seq["importance_sampling_ratio"].shape == (5, 1)


def test_pack_rows_by_length_sorts_splits_and_trims_padding_columns():
    from efficient_rlvr.batch import pack_rows_by_length

    # 4 rows, prompts left-padded to 4, completions right-padded to 6; real lengths 2+1, 4+6, 3+2, 2+5
    prompt_mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1]])
    completion_mask = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    batch = {
        "prompt_ids": torch.arange(16).view(4, 4),
        "prompt_mask": prompt_mask,
        "completion_ids": torch.arange(24).view(4, 6),
        "completion_mask": completion_mask,
        "old_per_token_logps": -torch.rand(4, 6),
        "importance_sampling_ratio": torch.ones(4, 1),  # sequence-level: kept whole
        "advantages": torch.tensor([0.5, -0.5, 1.0, -1.0]),
        "num_items_in_batch": completion_mask.sum(),
    }
    short, long = pack_rows_by_length(batch, 2)
    assert short["advantages"].tolist() == [0.5, 1.0] and long["advantages"].tolist() == [-1.0, -0.5]  # 3, 5 | 7, 10
    assert short["prompt_ids"].shape == (2, 4) and short["completion_ids"].shape == (2, 2)  # rows 0, 2
    assert long["prompt_ids"].shape == (2, 4) and long["completion_ids"].shape == (2, 6)  # rows 3, 1
    torch.testing.assert_close(short["prompt_ids"], batch["prompt_ids"][[0, 2]])  # left padding kept
    torch.testing.assert_close(short["old_per_token_logps"], batch["old_per_token_logps"][[0, 2], :2])
    assert short["importance_sampling_ratio"].shape == (2, 1)
    assert int(short["num_items_in_batch"]) == int(batch["num_items_in_batch"])  # the step's normaliser
    # every real token is still there, in its row
    assert int(short["completion_mask"].sum() + long["completion_mask"].sum()) == int(completion_mask.sum())
    # an entry it does not know how to trim: sorted and split, not trimmed
    other = pack_rows_by_length({**batch, "pixel_values": torch.zeros(4, 6)}, 2)
    assert other[0]["completion_ids"].shape == (2, 6)


def test_trimmed_micro_batch_gives_the_same_log_probs(base_model_dir):
    """Dropping trailing padding columns leaves each real token's log-prob unchanged (a causal model)."""
    from transformers import AutoModelForCausalLM

    from efficient_rlvr.batch import pack_rows_by_length

    model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    n, P, C = 6, 8, 10
    prompt_len, completion_len = torch.tensor([3, 8, 5, 4, 6, 2]), torch.tensor([2, 10, 4, 9, 3, 1])
    prompt_mask = (torch.arange(P)[None, :] >= P - prompt_len[:, None]).long()
    completion_mask = (torch.arange(C)[None, :] < completion_len[:, None]).long()
    batch = {
        "prompt_ids": torch.randint(3, 60, (n, P), generator=gen) * prompt_mask,
        "prompt_mask": prompt_mask,
        "completion_ids": torch.randint(3, 60, (n, C), generator=gen) * completion_mask,
        "completion_mask": completion_mask,
        "advantages": torch.arange(n).float(),
        "num_items_in_batch": completion_mask.sum(),
    }

    def logps(b):
        ids = torch.cat([b["prompt_ids"], b["completion_ids"]], dim=1)
        mask = torch.cat([b["prompt_mask"], b["completion_mask"]], dim=1)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, -b["completion_ids"].shape[1] - 1 : -1]
        return torch.log_softmax(logits.float(), -1).gather(2, b["completion_ids"][..., None]).squeeze(2)  # [b, C']

    full = logps(batch)
    chunks = pack_rows_by_length(batch, 2)
    assert chunks[0]["completion_ids"].shape[1] < C  # the short rows
    for chunk in chunks:
        rows = chunk["advantages"].long()
        got = logps(chunk)
        width = got.shape[1]
        real = chunk["completion_mask"].bool()
        torch.testing.assert_close(got[real], full[rows][:, :width][real], rtol=1e-4, atol=1e-5)
