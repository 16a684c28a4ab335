"""StepwiseRolloutEngine on a real in-process vLLM-CPU engine (tiny random Qwen2, float32) with ARRoL pruning."""

from __future__ import annotations

import gc
import math
import types

import pytest
import torch

from efficient_rlvr.pruning import (
    BinnedCalibrator,
    OnlinePruningCallback,
    QualityHead,
    QualityHeadTrainer,
    RolloutCallback,
    StepwiseRolloutEngine,
    colocate_sampling_params,
    hidden_state_positions,
    in_process_model_runner,
    sampling_params_from_trl,
)

MAX_TOKENS = 16
L_DETECT = 6
G = 4  # rollouts per prompt
BASE_PROMPTS = [[11, 12, 13, 14, 15], [20, 21, 22], [30, 31, 32, 33, 34, 35, 36], [40, 41]]
PROMPTS = [p for p in BASE_PROMPTS for _ in range(G)]  # TRL order: each prompt num_generations times in a row


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    from vllm import LLM

    engine = LLM(
        model=tiny_model_dir,
        dtype="float32",
        max_model_len=128,
        seed=0,
        enforce_eager=True,
        max_num_batched_tokens=4096,
        logprobs_mode="processed_logprobs",  # as TRL colocate
    )
    yield engine
    del engine
    gc.collect()


@pytest.fixture(scope="module")
def hidden_size(tiny_model_dir) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(tiny_model_dir).hidden_size


def _trl_self(llm, **overrides):
    """The attributes TRL 1.16 `VLLMGeneration.generate` reads in colocate mode (instead of building a second LLM)."""
    attrs = dict(
        mode="colocate",
        llm=llm,
        accelerator=None,
        model=torch.nn.Module(),  # only checked for PEFT
        enable_sleep_mode=False,
        tensor_parallel_size=1,
        structured_outputs_regex=None,
        generation_kwargs={},
        logprobs=0,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        min_p=0.0,
        repetition_penalty=1.0,
        max_completion_length=MAX_TOKENS,
    )
    attrs.update(overrides)
    return types.SimpleNamespace(**attrs)


def _seeded(seeds, max_tokens=None):
    """TRL's colocate SamplingParams with a per-request seed (vLLM then samples each request from its own RNG)."""
    max_tokens = max_tokens or [MAX_TOKENS] * len(seeds)
    return [
        colocate_sampling_params(max_tokens=m, generation_kwargs={"seed": s})
        for s, m in zip(seeds, max_tokens, strict=True)
    ]


def _flat(nested):
    return [x for seq in nested for pos in seq for x in pos]


def _forced_pruning(hidden_size: int, rng: int = 0) -> OnlinePruningCallback:
    # survival probability 0: every decided rollout is pruned unless the group floor (2) forbids it
    calibrator = BinnedCalibrator(kappa=0.0, p_min=0.0, p_max=0.0, cold_start_steps=0)
    head = QualityHeadTrainer(QualityHead(hidden_size, seed=0))
    return OnlinePruningCallback(head, calibrator, l_detect=L_DETECT, min_survivors_per_group=2, rng=rng)


def test_no_callback_output_equals_trl_colocate_generate(llm):
    from trl.generation.vllm_generation import VLLMGeneration

    trl_self = _trl_self(llm)
    torch.manual_seed(7)  # unseeded requests draw from the global torch RNG (the engine runs in-process)
    expected = VLLMGeneration.generate(trl_self, PROMPTS, None, num_generations=G)
    engine = StepwiseRolloutEngine(llm)
    torch.manual_seed(7)
    result = engine.generate(PROMPTS, sampling_params_from_trl(trl_self))
    got = result.as_trl_tuple()
    assert got[0] == expected[0] and got[1] == expected[1]  # prompt_ids, completion_ids token for token
    assert got[3] == expected[3]  # logprob_token_ids
    assert _flat(got[2]) == pytest.approx(_flat(expected[2]), abs=1e-6)
    assert [len(c) for c in got[2]] == [len(c) for c in got[1]] and all(len(pos) == 1 for pos in _flat([got[2]]))
    assert result.aborted == [False] * len(PROMPTS) and not llm.llm_engine.has_unfinished_requests()
    # a different RNG state gives different completions: the comparison above is not vacuous
    torch.manual_seed(8)
    assert engine.generate(PROMPTS, sampling_params_from_trl(trl_self)).completion_ids != expected[1]


def test_no_callback_equals_llm_generate_with_per_request_seeds(llm):
    seeds = list(range(100, 100 + len(PROMPTS)))
    torch.manual_seed(1)
    reference = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], _seeded(seeds), use_tqdm=False)
    torch.manual_seed(2)  # per-request generators: the global RNG state does not matter
    result = StepwiseRolloutEngine(llm).generate(PROMPTS, _seeded(seeds))
    assert result.completion_ids == [list(o.outputs[0].token_ids) for o in reference]


def test_pruned_requests_stop_exactly_at_l_detect(llm, hidden_size):
    seeds = list(range(200, 200 + len(PROMPTS)))
    max_tokens = [MAX_TOKENS] * len(PROMPTS)
    max_tokens[0] = L_DETECT - 2  # finishes before L_detect: never decided
    max_tokens[G] = L_DETECT  # finishes exactly at L_detect: never pruned
    engine = StepwiseRolloutEngine(llm)
    full = engine.generate(PROMPTS, _seeded(seeds, max_tokens))
    callback = _forced_pruning(hidden_size)
    result = engine.generate(PROMPTS, _seeded(seeds, max_tokens), callbacks=[callback])
    model = in_process_model_runner(llm).get_model()
    assert "compute_logits" not in vars(model)  # hook removed
    assert not llm.llm_engine.has_unfinished_requests()

    pruned = callback.pruned_ids
    decided = {d.request_id for d in callback.decisions}
    assert result.request_ids[0] not in decided and result.request_ids[G] not in decided
    assert len(pruned) > 0
    for i, rid in enumerate(result.request_ids):
        completion = result.completion_ids[i]
        if rid in pruned:
            assert result.aborted[i] and result.aborted_at[i] == L_DETECT and result.finish_reasons[i] == "abort"
            assert len(completion) == L_DETECT and len(result.logprobs[i]) == L_DETECT
            assert completion == full.completion_ids[i][:L_DETECT]  # per-request seeds: same prefix
        else:
            assert not result.aborted[i] and result.finish_reasons[i] in ("stop", "length")
            assert completion == full.completion_ids[i]  # survivors finish exactly as without pruning
            if result.finish_reasons[i] == "length":
                assert len(completion) == max_tokens[i]
    for g in range(len(BASE_PROMPTS)):
        members = result.request_ids[g * G : (g + 1) * G]
        assert sum(rid not in pruned for rid in members) >= 2
    metrics = callback.metrics()
    assert metrics["pruning/pruned_fraction"] == pytest.approx(len(pruned) / len(PROMPTS))
    assert metrics["pruning/tokens_generated"] == sum(len(c) for c in result.completion_ids)
    assert metrics["pruning/tokens_not_generated_estimate"] > 0 and metrics["pruning/hook_seconds"] > 0
    # the engine is reusable afterwards, by TRL's own path as well
    assert len(llm.generate([{"prompt_token_ids": PROMPTS[0]}], _seeded([1]), use_tqdm=False)) == 1


class _Recorder(RolloutCallback):
    needs_hidden_states = True

    def __init__(self):
        self.states: dict[tuple[str, int], torch.Tensor] = {}

    def on_step(self, step):
        for r in step.rollouts:
            self.states[(r.request_id, len(r.token_ids))] = r.hidden_state.clone()
        return []


def test_captured_hidden_states_match_hf_last_layer(llm, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    prompts = BASE_PROMPTS
    recorder = _Recorder()
    result = StepwiseRolloutEngine(llm).generate(prompts, _seeded([5, 6, 7, 8], [12] * 4), callbacks=[recorder])
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    worst = 0.0
    for rid, prompt, completion in zip(result.request_ids, prompts, result.completion_ids, strict=True):
        with torch.no_grad():
            out = hf(torch.tensor([prompt + completion]), output_hidden_states=True)
        last_layer = out.hidden_states[-1][0]  # [P + L, H], post final norm
        for k in range(1, len(completion) + 1):
            position = hidden_state_positions(len(prompt), k, l_detect=k)[0]
            worst = max(worst, (recorder.states[(rid, k)] - last_layer[position]).abs().max().item())
    assert len(recorder.states) == sum(len(c) for c in result.completion_ids)
    assert worst < 1e-5


def test_engine_is_clean_after_a_failing_callback(llm):
    class Boom(RolloutCallback):
        needs_hidden_states = True

        def on_step(self, step):
            if step.step == 3:
                raise KeyError("boom")
            return []

    engine = StepwiseRolloutEngine(llm)
    with pytest.raises(KeyError, match="boom"):
        engine.generate(PROMPTS, colocate_sampling_params(max_tokens=MAX_TOKENS), callbacks=[Boom()])
    assert not llm.llm_engine.has_unfinished_requests()
    assert "compute_logits" not in vars(in_process_model_runner(llm).get_model())
    assert len(engine.generate(PROMPTS[:2], colocate_sampling_params(max_tokens=4)).completion_ids) == 2


def test_engine_validation(llm):
    engine = StepwiseRolloutEngine(llm)
    with pytest.raises(ValueError, match="n must be 1"):
        engine.generate(PROMPTS[:1], colocate_sampling_params(max_tokens=4, generation_kwargs={"n": 2}))
    with pytest.raises(ValueError, match="one per prompt"):
        engine.generate(PROMPTS[:2], _seeded([1, 2, 3], [4, 4, 4]))
    llm.llm_engine.add_request("foreign", {"prompt_token_ids": [5, 6]}, colocate_sampling_params(max_tokens=2))
    with pytest.raises(RuntimeError, match="idle"):
        engine.generate(PROMPTS[:1], colocate_sampling_params(max_tokens=4))
    llm.llm_engine.abort_request(["foreign"])
    assert not llm.llm_engine.has_unfinished_requests()


def test_pruning_resume_through_the_engine_repeats_decisions(llm, hidden_size):
    def make(rng):
        calibrator = BinnedCalibrator(cold_start_steps=1)
        head = QualityHeadTrainer(QualityHead(hidden_size, seed=1))
        return OnlinePruningCallback(head, calibrator, l_detect=L_DETECT, rng=rng)

    engine = StepwiseRolloutEngine(llm)
    seeds = list(range(300, 300 + len(PROMPTS)))
    a = make(rng=3)
    for round_ in range(2):  # cold start, then a ready calibrator
        res = engine.generate(PROMPTS, _seeded([s + round_ for s in seeds]), callbacks=[a])
        a.observe([float(c[-1] % 2) for c in res.completion_ids], res.request_ids)  # any 0/1 reward works here
    state = a.state_dict()
    b = make(rng=4)
    b.load_state_dict(state)
    ra = engine.generate(PROMPTS, _seeded([s + 7 for s in seeds]), callbacks=[a])
    rb = engine.generate(PROMPTS, _seeded([s + 7 for s in seeds]), callbacks=[b])
    assert [d.pruned for d in a.decisions] == [d.pruned for d in b.decisions]
    assert [d.draw for d in a.decisions] == [d.draw for d in b.decisions]
    assert [d.score for d in a.decisions] == pytest.approx([d.score for d in b.decisions], abs=0)
    assert ra.completion_ids == rb.completion_ids and any(ra.aborted)


def test_confidence_scorer_reads_vllms_sampled_logprobs_without_hidden_states(llm, hidden_size):
    from efficient_rlvr.pruning.confidence import deepconf

    seeds = list(range(300, 300 + len(PROMPTS)))
    calibrator = BinnedCalibrator(kappa=0.0, p_min=0.0, p_max=0.0, cold_start_steps=0)
    callback = OnlinePruningCallback(
        QualityHeadTrainer(QualityHead(hidden_size, seed=0)),
        calibrator,
        l_detect=L_DETECT,
        min_survivors_per_group=2,
        scorer="confidence",
    )
    engine = StepwiseRolloutEngine(llm)
    full = engine.generate(PROMPTS, _seeded(seeds))
    result = engine.generate(PROMPTS, _seeded(seeds), callbacks=[callback])
    assert result.hook_seconds == 0.0  # no hidden-state hook was installed
    assert callback.pruned_ids and all(result.aborted_at[d.index] == L_DETECT for d in callback.decisions if d.pruned)
    for d in callback.decisions:
        sampled = torch.tensor([pos[0] for pos in full.logprobs[d.index][:L_DETECT]])  # the same tokens, unpruned
        assert d.score == pytest.approx(math.exp(deepconf(sampled, L_DETECT)[1]), rel=1e-5)
