"""The embedded default: a tiny model, its tokenizer and data that learn with RLVR on a CPU.

- :func:`build_tokenizer`: byte-level BPE (digit per token, vocab ~320, ChatML template, left padding).
- :func:`build_model`: untied Qwen2 (hidden 128, 4 layers, 4/2 heads, ~0.87M parameters), random init by seed.
- :func:`save_random_model`: tokenizer + random model in a folder that Auto classes and vLLM load.
- :func:`base_model_path`: the committed SFT base (chain_sum, 1-digit, 2-5 terms; see ``base/README.md``).
"""

from efficient_rlvr.embedded.model import (
    base_model_path,
    build_config,
    build_model,
    generation_config_for,
    save_model_and_tokenizer,
    save_random_model,
)
from efficient_rlvr.embedded.tokenizer import CHAT_TEMPLATE, build_tokenizer, default_texts, load_tokenizer

__all__ = [
    "CHAT_TEMPLATE",
    "base_model_path",
    "build_config",
    "build_model",
    "build_tokenizer",
    "default_texts",
    "generation_config_for",
    "load_tokenizer",
    "save_model_and_tokenizer",
    "save_random_model",
]
