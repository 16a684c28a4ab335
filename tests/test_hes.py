"""HES: quantile rule on hand-made entropies, teacher-forced entropies on a tiny Qwen2, Pos-High/Neg-Rand, the CLI."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from efficient_rlvr.hes import PosHighNegRand, high_entropy_mask, high_entropy_sum, pearson, token_entropies
from efficient_rlvr.hes.cli import main as hes_main


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _hes(rows, mask=None, **kw):
    ent = torch.tensor(rows, dtype=torch.float32)
    if mask is None:
        mask = torch.ones_like(ent, dtype=torch.bool)
    return high_entropy_sum(ent, torch.as_tensor(mask, dtype=torch.bool), **kw).tolist()


# ----------------------------------------------------------------------------------------------------------------------
# The quantile rule
def test_short_sequence_keeps_only_its_maximum():
    # n = 10 <= 200: the 0.995 quantile sits between the two largest values, so only the maximum counts.
    assert _hes([[0.1 * i for i in range(1, 11)]]) == pytest.approx([1.0])


def test_linear_interpolated_quantile():
    # q = 0.8, n = 10: position 7.2 -> threshold 0.8 + 0.2 * (0.9 - 0.8) = 0.82 -> keeps 0.9 and 1.0.
    assert _hes([[0.1 * i for i in range(1, 11)]], quantile=0.8) == pytest.approx([1.9])
    # 400 tokens 0..399: position 0.995 * 399 = 397.005 -> keeps 398 and 399 (the top 0.5% = 2 tokens).
    assert _hes([list(range(400))]) == pytest.approx([797.0])
    # 201 tokens 0..200: position exactly 199 (not 198.999...): the token at the threshold is kept too.
    assert _hes([list(range(201))]) == pytest.approx([399.0])


def test_ties_at_the_threshold_are_all_kept():
    assert _hes([[1.0, 3.0, 3.0, 2.0]]) == pytest.approx([6.0])


def test_masked_tokens_are_ignored_and_at_least_one_token_is_kept():
    # Row 0: the masked 9.0 (padding / prompt) must not count. Row 1: a single token. Row 2: no completion tokens.
    rows = [[5.0, 1.0, 2.0, 9.0], [0.7, 8.0, 8.0, 8.0], [4.0, 4.0, 4.0, 4.0]]
    mask = [[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    assert _hes(rows, mask) == pytest.approx([5.0, 0.7, 0.0])
    keep = high_entropy_mask(torch.tensor(rows), torch.tensor(mask, dtype=torch.bool))
    assert keep.tolist() == [[True, False, False, False], [True, False, False, False], [False] * 4]


def test_batch_scope_uses_one_threshold():
    rows = [[1.0, 2.0, 3.0], [10.0, 20.0, 30.0]]
    # Per sequence, q = 0.5: thresholds 2 and 20.
    assert _hes(rows, quantile=0.5) == pytest.approx([5.0, 50.0])
    # Over the batch: sorted 1 2 3 10 20 30, position 2.5 -> 6.5; row 0 has none above, keeps its maximum.
    assert _hes(rows, quantile=0.5, scope="batch") == pytest.approx([3.0, 60.0])


def test_bad_arguments_raise():
    ent = torch.ones(1, 3)
    with pytest.raises(ValueError, match="quantile"):
        high_entropy_sum(ent, ent.bool(), quantile=1.5)
    with pytest.raises(ValueError, match="scope"):
        high_entropy_sum(ent, ent.bool(), scope="global")


def test_pearson():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert pearson(x, -x) == pytest.approx(-1.0)
    assert math.isnan(pearson(x, torch.ones(4)))


# ----------------------------------------------------------------------------------------------------------------------
# Teacher-forced entropies on a tiny Qwen2
def _tiny_model(seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        initializer_range=0.3,  # peaked, varied next-token distributions (0.02 gives ~log(64) everywhere)
    )
    return Qwen2ForCausalLM(config)


def _batch(prompts, completions, extra_left=0, extra_right=0, pad=0):
    P, T = max(map(len, prompts)) + extra_left, max(map(len, completions)) + extra_right
    B = len(prompts)
    p_ids, p_mask = torch.full((B, P), pad), torch.zeros(B, P, dtype=torch.long)
    c_ids, c_mask = torch.full((B, T), pad), torch.zeros(B, T, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        p_ids[i, P - len(p) :], p_mask[i, P - len(p) :] = torch.tensor(p), 1
        c_ids[i, : len(c)], c_mask[i, : len(c)] = torch.tensor(c), 1
    return p_ids, p_mask, c_ids, c_mask


def _direct_entropies(model, prompt, completion):
    """One unpadded sequence, full logits, entropy in float64 from the softmax definition."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0].double()
    p = torch.softmax(logits, dim=-1)
    ent = -(p * p.log()).sum(dim=-1)
    return ent[len(prompt) - 1 : len(prompt) + len(completion) - 1]


PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14, 15, 16], [17]]
COMPLETIONS = [[20, 21, 22, 23], [24], [25, 26, 27], [30, 31, 32, 33, 34, 35]]


def test_token_entropies_match_direct_computation():
    model = _tiny_model()
    model.train()
    ent = token_entropies(model, *_batch(PROMPTS, COMPLETIONS), batch_size=4)
    assert ent.shape == (4, 6) and ent.dtype == torch.float32
    assert model.training  # mode restored
    for i, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS, strict=True)):
        direct = _direct_entropies(model, p, c)
        torch.testing.assert_close(ent[i, : len(c)].double(), direct, atol=2e-5, rtol=0)
        assert (ent[i, len(c) :] == 0).all()
    assert float(ent[ent > 0].std()) > 0.2  # the model is not uniform: the comparison has teeth


def test_token_entropies_are_padding_and_chunk_invariant():
    model = _tiny_model()
    reference = token_entropies(model, *_batch(PROMPTS, COMPLETIONS), batch_size=1)
    padded = token_entropies(model, *_batch(PROMPTS, COMPLETIONS, extra_left=5, extra_right=3), batch_size=3)
    torch.testing.assert_close(padded[:, :6], reference, atol=2e-5, rtol=0)
    assert (padded[:, 6:] == 0).all()
    # Same rows in another order and chunking: row 3 (prompt of 1 token) now shares a chunk with the 7-token prompt.
    order = [3, 2, 0, 1]
    shuffled = token_entropies(
        model, *_batch([PROMPTS[i] for i in order], [COMPLETIONS[i] for i in order]), batch_size=2
    )
    torch.testing.assert_close(shuffled, reference[order], atol=2e-5, rtol=0)


def test_entropy_chunks_match_one_pass():
    from efficient_rlvr.hes.score import _entropy

    logits = 3 * torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0))
    p = torch.softmax(logits.double() / 0.7, dim=-1)
    expected = -(p * p.log()).sum(dim=-1)
    torch.testing.assert_close(_entropy(logits, 0.7, rows_per_chunk=3).double(), expected, atol=1e-5, rtol=0)


def test_token_entropies_need_a_prompt_token():
    model = _tiny_model()
    p_ids, p_mask, c_ids, c_mask = _batch([[5, 6]], [[7, 8]])
    with pytest.raises(ValueError, match="prompt token"):
        token_entropies(model, p_ids, torch.zeros_like(p_mask), c_ids, c_mask)


# ----------------------------------------------------------------------------------------------------------------------
# Pos-High / Neg-Rand
REWARDS = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0])
HES = torch.tensor([5.0, 9.0, 7.0, 1.0, 2.0, 3.0, 4.0, 6.0])


def test_pos_high_neg_rand_picks():
    sel = PosHighNegRand(keep_fraction=0.5, seed=0)
    lengths = 10 * HES + 3  # HES exactly linear in length
    keep = sel.select(REWARDS, HES, lengths=lengths, groups=4)
    # Group 0 (0-3): correct 0, 1, 2 -> ceil(1.5) = 2 highest HES = 1 (9.0), 2 (7.0); its one incorrect (3) is kept.
    # Group 1 (4-7): the only correct (7) is kept; ceil(0.5 * 3) = 2 of the incorrect 4, 5, 6.
    assert keep[:4].tolist() == [False, True, True, True]
    assert bool(keep[7]) and int(keep[4:7].sum()) == 2
    m = sel.metrics()
    assert m["hes/kept_correct"] == 3 and m["hes/kept_incorrect"] == 3
    assert m["hes/kept_fraction"] == pytest.approx(6 / 8)
    assert m["hes/kept_hes_mean"] == pytest.approx(float(HES[keep].mean()))
    assert m["hes/dropped_correct_hes_mean"] == pytest.approx(5.0)
    assert m["hes/length_corr"] == pytest.approx(1.0)
    # The incorrect ones really are random: over repeated calls every one of 4, 5, 6 is dropped at some point.
    dropped = set()
    for _ in range(30):
        keep = sel.select(REWARDS, HES, groups=4)
        dropped |= {i for i in (4, 5, 6) if not keep[i]}
    assert dropped == {4, 5, 6}


def test_pos_high_neg_rand_whole_batch_and_group_ids():
    sel = PosHighNegRand(keep_fraction=0.25, seed=1)
    keep = sel.select(REWARDS, HES)  # one group: ceil(0.25 * 4) = 1 correct (index 1), 1 incorrect
    assert keep[[0, 1, 2, 7]].tolist() == [False, True, False, False] and int(keep[[3, 4, 5, 6]].sum()) == 1
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    a = PosHighNegRand(0.5, seed=3).select(REWARDS, HES, groups=ids)
    b = PosHighNegRand(0.5, seed=3).select(REWARDS, HES, groups=4)
    assert torch.equal(a, b)


def test_pos_high_neg_rand_resume_repeats_next_picks():
    sel = PosHighNegRand(keep_fraction=0.5, seed=7)
    sel.select(REWARDS, HES, groups=4)
    buf = io.BytesIO()
    torch.save(sel.state_dict(), buf)
    expected = [sel.select(REWARDS, HES, groups=4) for _ in range(5)]
    restored = PosHighNegRand(keep_fraction=0.5, seed=123)
    buf.seek(0)
    restored.load_state_dict(torch.load(buf, weights_only=False))
    assert all(torch.equal(restored.select(REWARDS, HES, groups=4), e) for e in expected)
    assert len({tuple(e.tolist()) for e in expected}) > 1  # the picks do change from call to call


def test_pos_high_neg_rand_validates():
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="keep_fraction"):
            PosHighNegRand(keep_fraction=bad)
    with pytest.raises(ValueError, match="neg_fraction"):
        PosHighNegRand(0.5, neg_fraction=2.0)
    with pytest.raises(ValueError, match="groups"):
        PosHighNegRand(0.5).select(REWARDS, HES, groups=3)


# ----------------------------------------------------------------------------------------------------------------------
# The CLI
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789+-=?.:<>"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, "<eos>": 2}
    vocab.update({ch: i + 3 for i, ch in enumerate(CHARS)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>"
    )
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    path = tmp_path_factory.mktemp("hes_model")
    _tiny_model(seed=1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _write_rows(path, n=10):
    rows = []
    for i in range(n):
        rows.append({"id": i, "question": f"{i}+{i + 1}=?", "answer": "ab" * (i + 1) + str(2 * i + 1)})
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


def _expected_hes(model_dir, rows):
    """Independent check: one unpadded forward per row; responses are < 200 tokens, so HES = the max entropy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    out = []
    for r in rows:
        text = tok.apply_chat_template(
            [{"role": "user", "content": r["question"]}], tokenize=False, add_generation_prompt=True
        )
        p = tok(text, add_special_tokens=False)["input_ids"]
        c = tok(r["answer"], add_special_tokens=False)["input_ids"]
        assert len(c) == len(r["answer"])
        out.append((float(_direct_entropies(model, p, c).max()), len(c)))
    return out


def test_cli_end_to_end(tiny_model_dir, tmp_path):
    rows = _write_rows(tmp_path / "data.jsonl")
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "efficient_rlvr.hes.cli",
        "--model",
        tiny_model_dir,
        "--data",
        str(tmp_path / "data.jsonl"),
    ]
    cmd += ["--prompt_column", "question", "--response_column", "answer", "--top_fraction", "0.2"]
    cmd += ["--output_dir", str(out), "--batch_size", "3", "--num_threads", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    expected = _expected_hes(tiny_model_dir, rows)
    assert [s["index"] for s in scores] == list(range(10))
    for s, (hes, length) in zip(scores, expected, strict=True):
        assert s["hes"] == pytest.approx(hes, abs=1e-4)
        assert s["length"] == length and s["n_high"] >= 1
    top = [json.loads(line) for line in (out / "top.jsonl").read_text().splitlines()]
    best = sorted(range(10), key=lambda i: -expected[i][0])[:2]  # round(0.2 * 10) = 2 rows, highest HES first
    assert [t["index"] for t in top] == best
    assert all(t["question"] == rows[t["index"]]["question"] and "hes" in t and "length" in t for t in top)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"] == 10 and summary["top_rows"] == 2
    assert -1.0 <= summary["hes_length_pearson"] <= 1.0


def test_cli_csv_output_in_process(tiny_model_dir, tmp_path):
    _write_rows(tmp_path / "data.jsonl", n=4)
    out = tmp_path / "out"
    args = ["--model", tiny_model_dir, "--data", str(tmp_path / "data.jsonl"), "--prompt_column", "question"]
    args += ["--response_column", "answer", "--output_dir", str(out), "--format", "csv", "--top_fraction", "0.5"]
    assert hes_main(args) == 0
    lines = (out / "scores.csv").read_text().splitlines()
    assert lines[0] == "index,hes,length,n_high" and len(lines) == 5
    assert len((out / "top.jsonl").read_text().splitlines()) == 2


def test_cli_missing_column_is_a_clear_error(tiny_model_dir, tmp_path, capsys):
    _write_rows(tmp_path / "data.jsonl", n=3)
    args = ["--model", tiny_model_dir, "--data", str(tmp_path / "data.jsonl"), "--prompt_column", "question"]
    args += ["--response_column", "completion", "--output_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exc:
        hes_main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--response_column 'completion' is missing in 3 of 3 rows" in err
    assert "available columns: answer, id, question" in err
    assert not (tmp_path / "out").exists()
