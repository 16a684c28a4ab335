"""LoRA (`peft_config`) with EfficientGRPOTrainer on the real CPU stack (vLLM colocate, TRL, PEFT).

1. Weight sync: after each optimizer step vLLM must generate from the merged weights W + BA (and a
   `modules_to_save` copy under its original name); the PEFT model itself must stay unmerged.
2. Every method at once (HIVE selection, ARRoL pruning, Cost-Aware sampling, the V0.5 baseline, HES selection) trains
   only the adapter, and the policy forwards of the stages (prompt entropy, HES token entropies) see the adapter.
"""

import pytest
import torch
from grpo_args import VLLM_COLOCATE, cpu_grpo_kwargs
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM
from vllm import SamplingParams

from efficient_rlvr import EfficientGRPOConfig, EfficientGRPOTrainer
from efficient_rlvr.generation import peft_name_to_vllm
from efficient_rlvr.rewards import verifier_reward
from efficient_rlvr.run import load_tokenizer_for


def _odd_length(completions, **kwargs):
    """A reward with variance inside groups (so a random model's weights move): 1 for an odd-length answer."""
    return [float(len(c[-1]["content"]) % 2) for c in completions]


def _token_logprobs(model, prompt_ids, completion_ids):
    """Log-prob of each completion token under `model` (float32, one unpadded sequence at a time)."""
    out = []
    for prompt, completion in zip(prompt_ids, completion_ids, strict=True):
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
        out.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None])[:, 0])
    return torch.cat(out)


def _token_entropies(model, prompt, completion):
    """Entropy of the next-token distribution at each completion position (float32, unpadded)."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float(), -1)
    return -(logp.exp() * logp).sum(-1)


def _prompt_ids(tokenizer, rows):
    texts = [tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) for r in rows]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_peft_name_to_vllm():
    assert (
        peft_name_to_vllm("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight")
        == "model.layers.0.self_attn.q_proj.weight"
    )
    assert peft_name_to_vllm("base_model.model.lm_head.modules_to_save.default.weight") == "lm_head.weight"
    assert peft_name_to_vllm("base_model.model.lm_head.modules_to_save.other.weight") == "lm_head.weight"
    assert peft_name_to_vllm("base_model.model.model.norm.weight") == "model.norm.weight"


# ---------------------------------------------------------------------------------------------------------------------
# 1. vLLM generates from the merged adapter after every optimizer step.
@pytest.fixture(scope="module")
def lora_colocate(tiny_model_dir, chain_sum_splits, tmp_path_factory):
    train_ds, eval_ds = chain_sum_splits
    args = EfficientGRPOConfig(
        **cpu_grpo_kwargs(
            str(tmp_path_factory.mktemp("peft_sync")),
            per_device_train_batch_size=16,
            num_generations=4,
            max_completion_length=12,
            max_steps=2,
            learning_rate=5e-2,  # high on purpose: the merged weights must differ visibly from the base
            lr_scheduler_type="constant",
            logging_steps=1,
            save_strategy="no",
            **VLLM_COLOCATE,
        )
    )
    peft_config = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], modules_to_save=["lm_head"]
    )
    tokenizer = load_tokenizer_for(tiny_model_dir)
    trainer = EfficientGRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
        reward_funcs=[_odd_length],
        args=args,
        train_dataset=train_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.train()
    return trainer, _prompt_ids(tokenizer, list(eval_ds)[:8])


def test_lora_trains_only_the_adapter(lora_colocate, tiny_model_dir):
    trainer, _ = lora_colocate
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert isinstance(model, PeftModel)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable), trainable
    assert any(float(p.detach().abs().max()) > 0 for n, p in model.named_parameters() if "lora_B" in n)  # B starts 0
    # The sync merged and unmerged: the base weights are the checkpoint's, no layer is left merged.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    for name, param in model.named_parameters():
        if "lora_" in name or "modules_to_save" in name:
            continue
        key = peft_name_to_vllm(name).replace("original_module.", "")
        torch.testing.assert_close(param.detach(), base[key], rtol=0, atol=1e-6)
    assert not any(getattr(m, "merged", False) for m in model.modules())


def test_trl_importance_sampling_metric_shows_merged_weights(lora_colocate):
    """TRL logs |logp_vllm - logp_trainer| of the sampled tokens; the second step samples after one LoRA update."""
    trainer, _ = lora_colocate
    diffs = [h["sampling/sampling_logp_difference/max"] for h in trainer.state.log_history if "reward" in h]
    assert len(diffs) == 2
    assert max(diffs) < 1e-4, diffs


def test_vllm_samples_from_the_merged_lora_weights(lora_colocate):
    trainer, prompts = lora_colocate
    trainer.vllm_generation.sync_weights()  # what TRL calls before the next generation (our reload path)
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
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    assert (vllm_logps - _token_logprobs(model, prompts, completions)).abs().max() < 1e-4
    # Stale engine weights (the base model, adapter and modules_to_save off) would fail by far.
    with model.disable_adapter():
        stale = _token_logprobs(model, prompts, completions)
    assert (vllm_logps - stale).abs().max() > 1e-2
    # The PEFT model is back to unmerged after the sync (its output is still W x + B A x, not W x + 2 B A x).
    assert not any(getattr(m, "merged", False) for m in model.modules())


# ---------------------------------------------------------------------------------------------------------------------
# 2. Every method at once on a LoRA policy.
ALL_METHODS = dict(
    selection_history=True,
    selection_entropy=True,
    pruning=True,
    pruning_l_detect=8,
    pruning_cold_start_steps=1,
    pruning_gate_min_auc=0.0,
    cost_aware_sampling=True,
    budget_baseline=True,
    hes_selection=True,
)


@pytest.fixture(scope="module")
def lora_all_methods(base_model_dir, chain_sum_splits, tmp_path_factory):
    import efficient_rlvr.hes.stage as hes_stage

    train_ds, _ = chain_sum_splits
    args = EfficientGRPOConfig(
        **cpu_grpo_kwargs(
            str(tmp_path_factory.mktemp("peft_methods")),
            per_device_train_batch_size=32,  # 8 prompts x 4 generations
            num_generations=4,
            max_completion_length=40,
            max_steps=3,
            learning_rate=1e-2,
            lr_scheduler_type="constant",
            logging_steps=1,
            save_strategy="no",
            **VLLM_COLOCATE,
            **ALL_METHODS,
        )
    )
    trainer = EfficientGRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32),
        reward_funcs=[verifier_reward],
        args=args,
        train_dataset=train_ds,
        processing_class=load_tokenizer_for(base_model_dir),
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    )
    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    initial = {n: p.detach().clone() for n, p in peft_model.named_parameters()}

    # Spy on the HES stage's entropy pass (the real function runs): next to its result, the same rows through the
    # PEFT model directly, with the adapter on and off, one unpadded sequence at a time.
    hes_calls = []
    real_token_entropies = hes_stage.token_entropies

    def recording_token_entropies(model, prompt_ids, prompt_mask, completion_ids, completion_mask, **kwargs):
        result = real_token_entropies(model, prompt_ids, prompt_mask, completion_ids, completion_mask, **kwargs)
        rows = []
        for i in range(min(4, prompt_ids.shape[0])):
            prompt = prompt_ids[i][prompt_mask[i].bool()].tolist()
            completion = completion_ids[i][completion_mask[i].bool()].tolist()
            was_training = peft_model.training
            peft_model.eval()
            on = _token_entropies(peft_model, prompt, completion)
            with peft_model.disable_adapter():
                off = _token_entropies(peft_model, prompt, completion)
            peft_model.train(was_training)
            rows.append((result[i, : len(completion)].clone(), on, off))
        hes_calls.append({"model": model, "rows": rows})
        return result

    hes_stage.token_entropies = recording_token_entropies
    try:
        trainer.train()
    finally:
        hes_stage.token_entropies = real_token_entropies
    return trainer, initial, hes_calls


def test_all_methods_train_only_the_adapter(lora_all_methods):
    trainer, initial, _ = lora_all_methods
    assert trainer.state.global_step == 3
    assert set(trainer.components) == {"PromptSelectionStage", "PruningStage", "BudgetStage", "HESSelectionStage"} | {
        "CostAwareStage"
    }
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert isinstance(model, PeftModel)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable), sorted(trainable)
    # Frozen weights move only by the float rounding of each sync's merge + unmerge round trip (as in TRL).
    changed = {n for n, p in model.named_parameters() if (p.detach() - initial[n]).abs().max() > 1e-6}
    assert changed and changed <= trainable, sorted(changed - trainable)
    assert any("lora_B" in n for n in changed) and any("lora_A" in n for n in changed)
    # Only the trainer's optimizer holds adapter parameters; the pruning head has its own, separate one.
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for n, p in model.named_parameters() if n in trainable}
    logged = [h for h in trainer.state.log_history if "reward" in h]
    assert len(logged) == 3
    for key in ("selection/candidates", "pruning/keep_rate", "cost/draws", "hes/scored_rollouts"):
        assert key in logged[-1], key


def test_hes_entropies_come_from_the_adapted_policy(lora_all_methods):
    trainer, _, hes_calls = lora_all_methods
    assert len(hes_calls) == 3
    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    for call in hes_calls:
        assert call["model"] is peft_model
    for stage_values, on, _ in hes_calls[-1]["rows"]:  # the last call comes after two LoRA updates
        torch.testing.assert_close(stage_values, on, rtol=0, atol=1e-4)
    assert max(float((on - off).abs().max()) for _, on, off in hes_calls[-1]["rows"]) > 1e-3


def test_prompt_entropies_come_from_the_adapted_policy(lora_all_methods, chain_sum_splits):
    trainer, _, _ = lora_all_methods
    stage = trainer.prompt_selection
    dataset = trainer.train_dataset
    candidates = [stage._candidate(dataset, i) for i in range(6)]
    from_stage = stage.candidate_entropies(trainer, candidates)  # [6]
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    prompts = _prompt_ids(trainer.processing_class, [dataset[i] for i in range(6)])

    def mean_prompt_entropy(prompt):  # every prompt position's next-token entropy, averaged
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([prompt])).logits[0].float(), -1)
        return float(-(logp.exp() * logp).sum(-1).mean())

    direct = torch.tensor([mean_prompt_entropy(p) for p in prompts])
    torch.testing.assert_close(from_stage, direct, rtol=0, atol=1e-4)
    with model.disable_adapter():
        without_adapter = torch.tensor([mean_prompt_entropy(p) for p in prompts])
    assert (from_stage - without_adapter).abs().max() > 1e-3
