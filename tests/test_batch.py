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
