"""The embedded default: tokenizer, random model, save/load, evaluation and the committed SFT base model."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from efficient_rlvr.embedded import (
    CHAT_TEMPLATE,
    base_model_path,
    build_model,
    build_tokenizer,
    load_tokenizer,
    save_random_model,
)
from efficient_rlvr.evaluation import evaluate_accuracy, generate_completions
from efficient_rlvr.tasks import chain_sum_solution, load_task_splits

torch.set_num_threads(1)

PROMPT = "State the final answer to the following arithmetic problem: 3 + 4 - 9 ="


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    return save_random_model(tmp_path_factory.mktemp("random_model"), seed=3)


@pytest.fixture(scope="module")
def eval_split():
    return load_task_splits("embedded", train_size=16, eval_size=400, seed=0)[1]


def test_tokenizer_vocab_and_special_tokens(tokenizer):
    assert len(tokenizer) == 320
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.padding_side == "left"
    assert tokenizer.chat_template == CHAT_TEMPLATE


def test_tokenizer_splits_every_digit(tokenizer):
    # No learned token may hold a digit next to anything else: numbers are read digit by digit.
    for token in tokenizer.get_vocab():
        if any(ch.isdigit() for ch in token):
            assert len(token) == 1, token
    ids = tokenizer("1234 + 56=-78", add_special_tokens=False)["input_ids"]
    pieces = [tokenizer.decode([i]) for i in ids]
    digits = [p for p in pieces if any(ch.isdigit() for ch in p)]
    assert digits == list("12345678")


@pytest.mark.parametrize(
    "text",
    [PROMPT, chain_sum_solution("3 + 4 - 9"), "Ünïcode ﬁ text\n\n  with  spaces\t", "-0042.50, 1e9 {x}"],
)
def test_tokenizer_round_trip(tokenizer, text):
    import unicodedata

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == unicodedata.normalize("NFC", text)


def test_chat_template_is_chatml(tokenizer):
    messages = [{"role": "user", "content": PROMPT}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert ids[0] == 1 and ids.count(2) == 1 and 25 <= len(ids) <= 40


def test_tokenizer_deterministic():
    texts = [f"{a} + {b} = {a + b}\nAnswer: {a + b}" for a in range(10) for b in range(10)]
    a, b = build_tokenizer(texts, vocab_size=280), build_tokenizer(texts, vocab_size=280)
    assert a.get_vocab() == b.get_vocab()
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()


def test_bad_sizes_raise(tokenizer):
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer(["abc"], vocab_size=100)
    with pytest.raises(ValueError, match="num_kv_heads"):
        build_model(tokenizer, num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="hidden_size"):
        build_model(tokenizer, hidden_size=130)


def test_model_size_and_determinism(tokenizer):
    state = torch.random.get_rng_state()
    a, b, c = build_model(tokenizer, seed=0), build_model(tokenizer, seed=0), build_model(tokenizer, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    # Hand count: embeddings 2*320*128; per layer q 128*128+128, k,v 128*64+64, o 128*128, MLP 3*128*384, 2 norms.
    per_layer = (128 * 128 + 128) + 2 * (128 * 64 + 64) + 128 * 128 + 3 * 128 * 384 + 2 * 128
    assert sum(p.numel() for p in a.parameters()) == 2 * 320 * 128 + 4 * per_layer + 128 == 870528
    assert not a.config.tie_word_embeddings
    assert a.lm_head.weight.data_ptr() != a.model.embed_tokens.weight.data_ptr()
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.self_attn.q_proj.weight"], sc["model.layers.0.self_attn.q_proj.weight"])


def test_saved_folder_loads_with_auto_classes(saved_dir, tokenizer):
    auto_tok = AutoTokenizer.from_pretrained(saved_dir)
    texts = [PROMPT, chain_sum_solution("9 - 8 + 7 - 6 + 5"), "Ünïcode ﬁ\n\n x"]
    for text in texts:
        assert auto_tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert auto_tok.eos_token_id == 2 and auto_tok.pad_token_id == 0
    batch = load_tokenizer(saved_dir)(["1", "1 + 2 + 3"], padding=True)["input_ids"]
    assert batch[0][0] == 0 and batch[0][-1] != 0  # pads on the left
    model = AutoModelForCausalLM.from_pretrained(saved_dir)
    ref = build_model(tokenizer, seed=3)
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    gen = json.load(open(f"{saved_dir}/generation_config.json"))
    assert gen["eos_token_id"] == 2 and gen["pad_token_id"] == 0


def test_generation_with_left_padding_matches_unbatched(eval_split):
    # With the trained base, a right-padded batch would change the continuations of the shorter prompts.
    path = base_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "right"  # the trap: generation must force left padding itself
    model = AutoModelForCausalLM.from_pretrained(path)
    prompts = eval_split.select(range(8))["prompt"]
    assert (
        len({len(tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)) for p in prompts}) > 1
    )
    batched, _, _ = generate_completions(model, tokenizer, prompts, max_new_tokens=40, temperature=None, batch_size=8)
    single = [generate_completions(model, tokenizer, [p], 40, None, 1)[0][0] for p in prompts]
    assert batched == single
    assert all("Answer:" in text for text in single)
    assert tokenizer.padding_side == "right"  # restored


def test_base_model_answers_held_out_prompts(eval_split):
    """The committed base is the SFT policy at ~37% T=1 held-out accuracy (see base/README.md).

    On 32 prompts x 2 samples it must get >= 8/64 right (12.5%). A random model gets 0; if the true rate were
    as low as 30%, P(X < 8 | Binomial(64, 0.3)) ~ 1e-4. It must also stay well below the fully trained regime
    (<= 48/64 = 75%), which would mean a wrong checkpoint was committed (GRPO would have no headroom).
    """
    path = base_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "right"  # evaluate_accuracy must force left padding and restore this
    model = AutoModelForCausalLM.from_pretrained(path)
    subset = eval_split.select(range(32))
    metrics = evaluate_accuracy(model, tokenizer, subset, num_samples=2, max_new_tokens=48, batch_size=64, seed=0)
    assert tokenizer.padding_side == "right"
    correct = round(metrics["accuracy"] * 64)
    assert 8 <= correct <= 48, metrics
    assert metrics["frac_all_wrong"] + metrics["frac_all_correct"] + metrics["frac_mixed"] == pytest.approx(1.0)
    assert metrics["frac_truncated"] < 0.25
    again = evaluate_accuracy(model, tokenizer, subset, num_samples=2, batch_size=64, seed=0, greedy=False)
    assert again["accuracy"] == metrics["accuracy"]  # seeded sampling repeats


def test_evaluate_accuracy_validates_arguments(saved_dir, eval_split):
    tokenizer = load_tokenizer(saved_dir)
    model = AutoModelForCausalLM.from_pretrained(saved_dir)
    with pytest.raises(ValueError, match="num_samples"):
        evaluate_accuracy(model, tokenizer, eval_split, num_samples=0)
    with pytest.raises(ValueError, match="temperature"):
        evaluate_accuracy(model, tokenizer, eval_split, temperature=0.0)
    with pytest.raises(ValueError, match="prompt"):
        evaluate_accuracy(model, tokenizer, eval_split.remove_columns("prompt"))
