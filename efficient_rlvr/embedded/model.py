"""The embedded default model: a tiny untied Qwen2 causal LM that trains on CPU.

Default size: hidden 128, 4 layers, 4 query heads / 2 key-value heads (head dim 32), MLP 384, vocab ~320:
about 0.87M parameters. Embeddings are untied (``tie_word_embeddings=False``) because vLLM-CPU's weight reload
keeps a stale ``lm_head`` when embeddings are tied (see the shared CPU-stack notes).

Initialisation is deterministic given ``seed``: the weights are drawn under a forked torch RNG so building a model
does not disturb the caller's global RNG state.
"""

from __future__ import annotations

import os
import pathlib

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM

BASE_DIR = pathlib.Path(__file__).resolve().parent / "base"


def build_config(
    tokenizer: PreTrainedTokenizerBase,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 384,
    max_position_embeddings: int = 512,
) -> Qwen2Config:
    """Qwen2 config sized for ``tokenizer`` (vocab, eos/pad ids) with untied embeddings."""
    for arg, value in (
        ("hidden_size", hidden_size),
        ("num_layers", num_layers),
        ("num_heads", num_heads),
        ("num_kv_heads", num_kv_heads),
        ("intermediate_size", intermediate_size),
        ("max_position_embeddings", max_position_embeddings),
    ):
        if value <= 0:
            raise ValueError(f"{arg} must be > 0, got {value}")
    if hidden_size % num_heads != 0:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads})")
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        use_sliding_window=False,
        rope_theta=10000.0,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )


def generation_config_for(tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
    """Sampling defaults of the embedded model: stop at ``<|im_end|>``, pad with ``<|endoftext|>``, T=1, no top-k."""
    return GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
    )


def build_model(
    tokenizer: PreTrainedTokenizerBase,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 384,
    max_position_embeddings: int = 512,
    seed: int = 0,
) -> Qwen2ForCausalLM:
    """A randomly initialised untied Qwen2ForCausalLM (float32), deterministic given ``seed``."""
    config = build_config(
        tokenizer,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config = generation_config_for(tokenizer)
    return model.float()


def save_random_model(output_dir: str | os.PathLike, seed: int = 0, vocab_size: int | None = None, **sizes) -> str:
    """Build the default tokenizer and a random model (``seed``), save both with ``save_pretrained``.

    The folder loads with ``AutoTokenizer`` / ``AutoModelForCausalLM`` and with ``vllm.LLM``.
    ``sizes`` are :func:`build_model` size arguments (``hidden_size``, ``num_layers``, ...).

    Returns:
        ``output_dir`` as a string.
    """
    from efficient_rlvr.embedded.tokenizer import DEFAULT_VOCAB_SIZE, build_tokenizer

    tokenizer = build_tokenizer(vocab_size=vocab_size or DEFAULT_VOCAB_SIZE, seed=0)
    model = build_model(tokenizer, seed=seed, **sizes)
    save_model_and_tokenizer(model, tokenizer, output_dir)
    return str(output_dir)


def save_model_and_tokenizer(model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerBase, output_dir) -> None:
    """``save_pretrained`` both (safetensors, float32) into ``output_dir``."""
    os.makedirs(output_dir, exist_ok=True)
    model.config.use_cache = True  # trainers switch it off; generation wants the KV cache
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(str(output_dir))
    model.save_pretrained(str(output_dir), safe_serialization=True)


def base_model_path() -> str:
    """Folder of the committed SFT base model (the embedded default policy)."""
    if not (BASE_DIR / "model.safetensors").exists():
        raise FileNotFoundError(
            f"the embedded base model is missing at {BASE_DIR}; rebuild it with "
            "`python -m efficient_rlvr.embedded.sft --output_dir <dir>`"
        )
    return str(BASE_DIR)
