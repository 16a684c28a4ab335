"""A tiny byte-level BPE tokenizer for the embedded default model.

The tokenizer is trained on the task's own text (by default chain_sum prompts and running-sum solutions rendered
with the chat template) with ``vocab_size`` ~320: the 256 byte symbols, 3 special tokens and about 60 merges.

Its pipeline is exactly the one ``transformers.Qwen2Tokenizer`` rebuilds when a Qwen2 folder is loaded with
``AutoTokenizer`` (NFC normaliser, Qwen2's split regex, ``ByteLevel(use_regex=False)``, ``ByteLevel`` decoder).
Transformers 5 ignores the saved tokenizer class for ``model_type == "qwen2"`` and rebuilds that pipeline from the
vocabulary and merges, so a tokenizer trained with any other pre-tokenizer would tokenize differently after a
reload. Qwen2's regex isolates every digit (``\\p{N}``), so numbers are tokenized digit by digit and no merge can
contain a digit.

Special tokens: ``<|endoftext|>`` (id 0, padding), ``<|im_start|>`` (1), ``<|im_end|>`` (2, end of turn and EOS).
Padding is on the left (decoder-only batched generation); :func:`load_tokenizer` re-applies it because
``AutoTokenizer`` may return ``padding_side="right"``.
"""

from __future__ import annotations

import os

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END]

# Qwen2's pre-tokenizer split pattern (same string as transformers' Qwen2Tokenizer): one token per digit.
QWEN2_SPLIT_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# ChatML without a default system message.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)

DEFAULT_VOCAB_SIZE = 320
DEFAULT_NUM_TEXTS = 4000


def default_texts(num_texts: int = DEFAULT_NUM_TEXTS, seed: int = 0) -> list[str]:
    """Chat-formatted chain_sum conversations (prompt + running-sum solution) to train the BPE merges on."""
    from efficient_rlvr.tasks import EMBEDDED_TASK_KWARGS, chain_sum_solution, make_reasoning_gym_dataset

    rows = make_reasoning_gym_dataset("chain_sum", size=num_texts, seed=seed, **EMBEDDED_TASK_KWARGS)
    texts = []
    for row in rows:
        expression = row["metadata"]["expression"] if isinstance(row["metadata"], dict) else None
        if expression is None:
            import json

            expression = json.loads(row["metadata"])["expression"]
        texts.append(
            f"{IM_START}user\n{row['question']}{IM_END}\n{IM_START}assistant\n{chain_sum_solution(expression)}{IM_END}\n"
        )
    return texts


def _backend_pipeline(model: models.Model) -> Tokenizer:
    tok = Tokenizer(model)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def build_tokenizer(
    texts: list[str] | None = None, vocab_size: int = DEFAULT_VOCAB_SIZE, seed: int = 0
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with a ChatML template.

    Args:
        texts: training texts; ``None`` uses :func:`default_texts` (chain_sum conversations generated with ``seed``).
        vocab_size: target vocabulary size, at least 259 (256 bytes + 3 special tokens).
        seed: seed of the default texts (BPE training itself is deterministic).

    Returns:
        A ``PreTrainedTokenizerFast`` with eos ``<|im_end|>``, pad ``<|endoftext|>``, left padding and a chat template.
    """
    min_size = 256 + len(SPECIAL_TOKENS)
    if vocab_size < min_size:
        raise ValueError(f"vocab_size must be >= {min_size} (256 bytes + special tokens), got {vocab_size}")
    if texts is None:
        texts = default_texts(seed=seed)
    if len(texts) == 0:
        raise ValueError("texts must be a non-empty list of strings (or None for the default chain_sum texts)")

    backend = _backend_pipeline(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Special tokens in the texts must not be merged into ordinary tokens: strip them before training.
    cleaned = []
    for text in texts:
        for special in SPECIAL_TOKENS:
            text = text.replace(special, "\n")
        cleaned.append(text)
    backend.train_from_iterator(cleaned, trainer=trainer)
    return _wrap(backend)


def _wrap(backend: Tokenizer) -> PreTrainedTokenizerFast:
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=None,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        unk_token=None,
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
    )
    tokenizer.padding_side = "left"
    return tokenizer


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Load a saved tokenizer with ``AutoTokenizer`` and force left padding (batched generation needs it)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.padding_side = "left"
    return tokenizer
