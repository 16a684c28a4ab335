"""ARRoL pruning inside EfficientGRPOTrainer (efficient_rlvr.pruning.stage) on the real stack.

One vLLM-colocate trainer for the module: the embedded SFT base model on the embedded task (chain_sum, completions
~10-40 tokens), L_detect = 12, 32 prompts x G = 4 per step, 3 cold-start steps, 8 steps. A recorder captures what
every step's `process` saw and returned; the tests read those records.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys

import pytest
import torch
from grpo_args import VLLM_COLOCATE, cpu_grpo_kwargs
from transformers import AutoModelForCausalLM, TrainerCallback

from efficient_rlvr import EfficientGRPOConfig, EfficientGRPOTrainer
from efficient_rlvr.pruning import OnlinePruningCallback, roc_auc, sampling_params_from_trl
from efficient_rlvr.pruning.calibration import BinnedCalibrator
from efficient_rlvr.pruning.stage import PruningStage, quality_head_from_state, survivor_advantages
from efficient_rlvr.rewards import verifier_reward
from efficient_rlvr.run import load_tokenizer_for

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
L_DETECT = 12
G = 4
COLD_START = 3
STEPS = 8
MIN_SURVIVORS = 2


def _kwargs(output_dir: str, **overrides) -> dict:
    kwargs = cpu_grpo_kwargs(
        output_dir,
        per_device_train_batch_size=128,  # 32 prompts x 4 generations
        num_generations=G,
        max_completion_length=40,
        max_steps=STEPS,
        learning_rate=2e-4,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        pruning=True,
        pruning_l_detect=L_DETECT,
        pruning_cold_start_steps=COLD_START,
        pruning_min_survivors=MIN_SURVIVORS,
        pruning_gate_min_auc=0.0,  # these tests need pruning after the cold start (the gate: test_pruning_gate.py)
        **VLLM_COLOCATE,
    )
    kwargs.update(overrides)
    return kwargs


class _EngineIdle(TrainerCallback):
    def __init__(self, trainer):
        self.trainer = trainer
        self.idle: list[bool] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.idle.append(not self.trainer.vllm_generation.llm.llm_engine.has_unfinished_requests())


@pytest.fixture(scope="module")
def run(base_model_dir, chain_sum_splits, tmp_path_factory):
    train_ds, eval_ds = chain_sum_splits
    out = str(tmp_path_factory.mktemp("pruning"))
    tokenizer = load_tokenizer_for(base_model_dir)
    trainer = EfficientGRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32),
        reward_funcs=[verifier_reward],
        args=EfficientGRPOConfig(**_kwargs(out)),
        train_dataset=train_ds,
        processing_class=tokenizer,
    )
    stage = trainer.rollout_generation
    records = []
    original = stage.process

    def recording_process(trainer_, rows, batch, rewards):
        before = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        rewards_before = rewards.clone()
        result = stage.last_result
        output = original(trainer_, rows, batch, rewards)
        records.append(
            {
                "step": int(trainer_.state.global_step) + 1,  # the step this generation trains (its log's "step")
                "cold_start": not stage.calibrator.ready,
                "result": result,
                "batch": before,
                "rewards_before": rewards_before,
                "rewards_after": rewards.clone(),
                "out": output,
                "decisions": list(stage.callback.decisions),
            }
        )
        return output

    stage.process = recording_process
    idle = _EngineIdle(trainer)
    trainer.add_callback(idle)
    trainer.train()
    stage.process = original
    trainer._save_checkpoint(trainer.model, None)  # efficient_rlvr_state.pt of the final state
    checkpoint = os.path.join(out, f"checkpoint-{trainer.state.global_step}")
    return {"trainer": trainer, "stage": stage, "records": records, "idle": idle.idle, "checkpoint": checkpoint}


# ------------------------------------------------------------------------------------------------------------------
# Construction
def test_config_refuses_pruning_without_vllm_colocate(tmp_path):
    base = _kwargs(str(tmp_path))
    with pytest.raises(ValueError, match="colocate"):
        EfficientGRPOConfig(**{**base, "use_vllm": False})
    with pytest.raises(ValueError, match="colocate"):
        EfficientGRPOConfig(**{**base, "vllm_mode": "server"})


def test_stage_refuses_a_keep_rate_outside_the_clip_range(run):
    trainer = run["trainer"]

    def args_with(**changes):
        args = copy.copy(trainer.args)  # no re-validation: the config accepts any keep rate in (0, 1]
        for name, value in changes.items():
            setattr(args, name, value)
        return args

    for kappa in (0.2, 0.8):  # default clip range [0.25, 0.75]
        with pytest.raises(ValueError, match="pruning_keep_rate"):
            PruningStage(trainer, args_with(pruning_keep_rate=kappa))
    with pytest.raises(ValueError, match="sleep_mode"):
        PruningStage(trainer, args_with(vllm_enable_sleep_mode=True))


def test_survivor_advantages_by_hand():
    # two groups of 4; group 0: rewards 1, 0, 1, 1 with the third pruned; group 1: 0, 1, x, x (x pruned) -> 2 known
    per_func = torch.tensor([[1.0], [0.0], [1.0], [1.0], [0.0], [1.0], [1.0], [0.0]])
    keep = torch.tensor([True, True, False, True, True, True, False, False])
    rewards, adv = survivor_advantages(per_func, torch.ones(1), keep, 4, "group")
    assert torch.isnan(rewards[[2, 6, 7]]).all()
    std0 = math.sqrt(((1 - 2 / 3) ** 2 * 2 + (2 / 3) ** 2) / 2)  # unbiased std of (1, 0, 1)
    std1 = math.sqrt(0.5)  # unbiased std of (0, 1)
    expected = [1 / 3 / (std0 + 1e-4), -2 / 3 / (std0 + 1e-4), 0, 1 / 3 / (std0 + 1e-4)]
    expected += [-0.5 / (std1 + 1e-4), 0.5 / (std1 + 1e-4), 0, 0]
    assert adv.tolist() == pytest.approx(expected, abs=1e-5)
    # a lone survivor gets 0 under every scaling
    keep_one = torch.tensor([True, False, False, False, True, True, True, True])
    for scale in ("group", "batch", "none"):
        _, adv = survivor_advantages(per_func, torch.ones(1), keep_one, 4, scale)
        assert adv[0] == 0 and adv[1:4].eq(0).all()
    _, adv = survivor_advantages(per_func, torch.ones(1), keep, 4, "none")
    assert adv.tolist() == pytest.approx([1 / 3, -2 / 3, 0, 1 / 3, -0.5, 0.5, 0, 0], abs=1e-6)
    _, adv = survivor_advantages(per_func, torch.ones(1), keep, 4, "batch")
    known = torch.tensor([1.0, 0, 1, 0, 1])
    batch_std = known.std().item()
    assert adv[0].item() == pytest.approx(1 / 3 / (batch_std + 1e-4), abs=1e-5)
    with pytest.raises(ValueError, match="multiple"):
        survivor_advantages(per_func[:7], torch.ones(1), keep[:7], 4)


def test_roc_auc_by_hand():
    # positives 0.9, 0.4; negatives 0.1, 0.4, 0.8 -> pairs won: 0.9 beats 3; 0.4 beats 0.1, ties 0.4 -> 4.5 / 6
    assert roc_auc(torch.tensor([0.9, 0.1, 0.4, 0.4, 0.8]), torch.tensor([1, 0, 1, 0, 0])) == pytest.approx(4.5 / 6)
    assert math.isnan(roc_auc(torch.tensor([0.3, 0.2]), torch.tensor([1, 1])))


# ------------------------------------------------------------------------------------------------------------------
# Generation
def test_pruned_rollouts_stop_at_l_detect_and_survivors_finish(run):
    records = run["records"]
    assert len(records) == STEPS and all(run["idle"])
    assert not run["trainer"].vllm_generation.llm.llm_engine.has_unfinished_requests()
    for step, rec in enumerate(records):
        result = rec["result"]
        assert rec["cold_start"] == (step < COLD_START)
        decided = {d.request_id for d in rec["decisions"]}
        for i, rid in enumerate(result.request_ids):
            length = len(result.completion_ids[i])
            if result.aborted[i]:
                assert length == L_DETECT and result.aborted_at[i] == L_DETECT
                assert result.finish_reasons[i] == "abort" and len(result.logprobs[i]) == L_DETECT
            else:
                assert result.finish_reasons[i] in ("stop", "length")
            if length <= L_DETECT and not result.aborted[i]:
                assert rid not in decided  # ended at or before L_detect: never decided, never pruned
        for g in range(len(result.request_ids) // G):
            assert sum(not a for a in result.aborted[g * G : (g + 1) * G]) >= MIN_SURVIVORS
        assert result.group_ids == [i // G for i in range(len(result.request_ids))]
        if step < COLD_START:
            assert not any(result.aborted)
    pruned = sum(sum(r["result"].aborted) for r in records[COLD_START:])
    total = sum(len(r["result"].aborted) for r in records[COLD_START:])
    assert 0.1 < pruned / total < 0.5, pruned / total  # kappa 0.5 of the ~70-90% that reach L_detect, floors
    metrics = run["stage"].metrics()
    assert metrics["pruning/rollouts_pruned_total"] == pruned
    assert metrics["pruning/tokens_not_generated_total"] > 0
    assert metrics["pruning/logprob_rows_skipped_total"] == pruned


def test_process_invalidates_pruned_rollouts_recomputes_advantages_and_drops_rows(run):
    for step, rec in enumerate(run["records"]):
        aborted = torch.tensor(rec["result"].aborted)
        before, after = rec["rewards_before"], rec["rewards_after"]
        assert torch.isnan(after[aborted]).all() and torch.equal(after[~aborted], before[~aborted])
        out = rec["out"]
        kept = torch.nonzero(~aborted).flatten()
        assert out["completion_ids"].shape[0] == kept.numel()
        assert torch.equal(out["completion_ids"], rec["batch"]["completion_ids"][kept])
        assert int(out["num_items_in_batch"]) == int(out["completion_mask"].sum())
        assert torch.equal(out["rollout_rewards"], before[kept])
        # hand-computed GRPO advantages over the survivors of each group (scale_rewards="group")
        expected = torch.zeros(len(aborted))
        for g in range(len(aborted) // G):
            idx = [i for i in range(g * G, (g + 1) * G) if not aborted[i]]
            r = before[idx]
            if len(idx) > 1:
                expected[idx] = (r - r.mean()) / (r.std() + 1e-4)
        assert out["advantages"].tolist() == pytest.approx(expected[kept].tolist(), abs=1e-5)
        if step < COLD_START:  # nothing pruned: the recomputation is TRL's own
            assert torch.allclose(out["advantages"], rec["batch"]["advantages"], atol=1e-6)
    last = run["records"][-1]["rewards_after"]
    assert run["stage"].metrics()["pruning/reward_kept"] == pytest.approx(float(torch.nanmean(last)))


def test_old_logprobs_are_computed_on_survivors_only(run):
    """Pruned rows were skipped in TRL's old log-prob pass, and the kept rows got their own log-probs back."""
    stage, records = run["stage"], run["records"]
    for rec in records[COLD_START:]:
        out, batch = rec["out"], rec["batch"]
        aborted = torch.tensor(rec["result"].aborted)
        mask = out["completion_mask"].bool()
        diff = (out["old_per_token_logps"] - out["sampling_per_token_logps"]).abs()[mask]
        assert diff.max() < 1e-4  # trainer and vLLM agree on every kept token: rows were not shuffled
        # pruned rows carry their sampling log-probs (importance ratio 1) and were never run through the model
        assert torch.equal(batch["old_per_token_logps"][aborted], batch["sampling_per_token_logps"][aborted])
    assert "_get_per_token_logps_and_entropies" not in vars(run["trainer"])  # wrapper removed
    assert stage.metrics()["pruning/logprob_rows_skipped_total"] > 0


def test_trl_rollout_metrics_describe_the_scored_rollouts_only(run):
    """TRL's `reward`, `frac_reward_zero_std` and `completions/*` count the unpruned rollouts: a pruned one (cut at
    L_detect, no EOS) is neither scored 0 nor counted as clipped; `pruning/` counts it."""
    trainer = run["trainer"]
    eos = {*trainer.eos_token_ids, trainer._tokenizer.pad_token_id}
    logs = {h["step"]: h for h in trainer.state.log_history if "reward" in h}
    checked = 0
    for rec in run["records"]:
        result = rec["result"]
        if not any(result.aborted):
            continue
        kept = [c for c, aborted in zip(result.completion_ids, result.aborted, strict=True) if not aborted]
        clipped = sum(c[-1] not in eos for c in kept) / len(kept)
        log = logs[rec["step"]]
        assert log["completions/clipped_ratio"] == pytest.approx(clipped, abs=1e-6)
        assert log["completions/mean_length"] == pytest.approx(sum(map(len, kept)) / len(kept), abs=1e-4)
        assert log["reward"] == pytest.approx(float(torch.nanmean(rec["rewards_after"])), abs=1e-6)
        assert log["reward"] == pytest.approx(log["pruning/reward_kept"], abs=1e-6)
        groups = rec["rewards_after"].view(-1, G)
        known = ~torch.isnan(groups)
        flat = [int(k.sum()) < 2 or len(set(g[k].tolist())) == 1 for g, k in zip(groups, known, strict=True)]
        assert log["frac_reward_zero_std"] == pytest.approx(sum(flat) / len(flat), abs=1e-6)
        checked += 1
    assert checked >= 2


def test_partial_logprob_pass_applies_only_to_its_own_no_grad_batch(run):
    """The wrapper around TRL's `_get_per_token_logps_and_entropies`, on the trained trainer's real method."""
    from efficient_rlvr.logprobs import PartialLogprobPass

    trainer = run["trainer"]
    rec = run["records"][-1]
    batch = rec["batch"]
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)  # [N, P + C]
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    C = batch["completion_ids"].shape[1]
    completions = [list(c) for c in rec["result"].completion_ids]
    pruned = [i % 3 == 0 for i in range(len(completions))]
    fill = [[-float(i)] * len(c) for i, c in enumerate(completions)]
    with torch.no_grad():
        reference, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, C, batch_size=64)
    wrapper = PartialLogprobPass(trainer, completions, fill, pruned)
    try:
        with torch.no_grad():
            got, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, C, batch_size=64)
            other, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids[1:], mask[1:], C)
        with_grad, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, C, batch_size=64)
    finally:
        wrapper.remove()
    keep = torch.tensor([not p for p in pruned])
    real = batch["completion_mask"].bool()  # [N, C]: the kept rows run packed by length, 0 past their own tokens
    assert torch.allclose(got[keep][real[keep]], reference[keep][real[keep]], atol=1e-5)
    for i in torch.nonzero(~keep).flatten().tolist():
        n = len(completions[i])
        assert got[i, :n].eq(-float(i)).all() and got[i, n:].eq(0).all()
    assert wrapper.calls == 1 and wrapper.rows_skipped == sum(pruned)  # the other two calls went to TRL's method
    assert torch.allclose(other, reference[1:], atol=1e-5)
    assert with_grad.requires_grad and torch.allclose(with_grad.detach(), reference, atol=1e-5)
    assert "_get_per_token_logps_and_entropies" not in vars(trainer)


# ------------------------------------------------------------------------------------------------------------------
# Quality head and balance
def test_head_beats_chance_after_warm_up(run):
    """Out-of-sample AUC (scores before each update) pooled over the steps whose head had >= 2 updates.

    Under the null (no signal) the AUC of n+ positives vs n- negatives has standard error
    sqrt((n+ + n- + 1) / (12 n+ n-)) (Hanley-McNeil at AUC 0.5); require 3 standard errors above 0.5.
    """
    history = [h for h in run["stage"].head_history if h["global_step"] >= 3]
    scores = torch.cat([h["scores"] for h in history])
    labels = torch.cat([h["labels"] for h in history]).bool()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    se = math.sqrt((n_pos + n_neg + 1) / (12 * n_pos * n_neg))
    auc = roc_auc(scores, labels)
    print(f"head AUC {auc:.3f} on {n_pos} + {n_neg} finished rollouts (null SE {se:.3f})")
    assert auc > 0.5 + 3 * se
    m = run["stage"].metrics()
    for key in (
        "pruning/head_auc",
        "pruning/head_accuracy",
        "pruning/delta",
        "pruning/keep_rate",
        "pruning/rho_hat",
        "pruning/realised_keep_rate",
    ):
        assert key in m and math.isfinite(m[key]), key
    # survivors over the decided rollouts after the cold start, global and cumulative
    decided = [d for r in run["records"] for d in r["decisions"] if not d.cold_start]
    assert m["pruning/realised_keep_rate"] == pytest.approx(sum(not d.pruned for d in decided) / len(decided))


def _prompt_ids(tokenizer, prompt) -> list[int]:
    ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(ids["input_ids"])


def _simulate(groups, survival, min_survivors, draws, gen):
    """Monte Carlo of the pruning rule on fully observed groups: (E[rho_hat], E[rho_hat (1 - rho_hat)]).

    groups: list of (labels [G] bool, decided [G] bool, index); survival [N] per rollout (NaN = undecided).
    """
    rho_sum = var_sum = 0.0
    count = 0
    for _ in range(draws):
        for labels, decided, index in groups:
            alive = len(labels)
            keep = torch.ones(len(labels), dtype=torch.bool)
            order = torch.randperm(len(labels), generator=gen)
            u = torch.rand(len(labels), generator=gen)
            for j in order.tolist():
                if decided[j] and u[j] >= survival[index[j]] and alive - 1 >= min_survivors:
                    keep[j] = False
                    alive -= 1
            rho = labels[keep].float().mean().item()
            rho_sum += rho
            var_sum += rho * (1 - rho)
            count += 1
    return rho_sum / count, var_sum / count


def test_balance_of_kept_groups_vs_random_pruning(run, chain_sum_splits):
    """Paired comparison on one fresh, unpruned batch scored by the trained head, against random pruning.

    512 rollouts (128 training prompts x 4) are generated without pruning while the trained head scores each one at
    L_detect, so every rollout's label is known. The survival rule (calibrated on the trained stage's buffer) and
    random pruning at the same keep rate kappa are applied to the same groups 200 times each, with the same
    min-survivor floor, and E[rho_hat (1 - rho_hat)] over groups is compared. The scorer carries the stage's
    calibration table (never ready, so it prunes nothing), so each decision records its group's q_bar as the stage
    computes it (finished rollouts scored at their last token). Both rules are printed, at the default lambda 0.5 /
    clip [0.25, 0.75] and at lambda 4 without clipping. The group-relative rule acts through the head's ranking
    within a group, which on this task is weak (within-group AUC about 0.55 over some 45 mixed groups of 4): its
    effect here is within Monte Carlo noise, so only the head's signal is asserted. SPEC's properties of the rule
    (E[rho_hat] toward rho, E[rho_hat (1 - rho_hat)] up, fewer flattened mixed groups versus random pruning) are
    tested with heads of known within-group AUC in tests/test_pruning_fidelity.py. (The literal rule moves pruning
    between groups, toward those with high q; with G = 4 that can raise E[rho_hat (1 - rho_hat)] too.)
    """
    trainer, stage = run["trainer"], run["stage"]
    train_ds, _ = chain_sum_splits
    tokenizer = trainer.processing_class
    rows = [train_ds[i] for i in range(64, 192)]
    prompt_ids = [_prompt_ids(tokenizer, r["prompt"]) for r in rows for _ in range(G)]
    buffer = stage.calibrator.state_dict()
    fitted = BinnedCalibrator(buffer_size=10**6, cold_start_steps=10**6)  # the stage's table, never ready: no pruning
    fitted.observe(torch.tensor(buffer["scores"]), torch.tensor(buffer["labels"]))
    fitted.refit()
    scorer = OnlinePruningCallback(stage.head, fitted, l_detect=L_DETECT, min_survivors_per_group=G)
    torch.manual_seed(123)
    result = stage.engine.generate(prompt_ids, sampling_params_from_trl(trainer.vllm_generation), callbacks=[scorer])
    assert not any(result.aborted)
    texts = tokenizer.batch_decode(result.completion_ids, skip_special_tokens=True)
    columns = {c: [r[c] for r in rows for _ in range(G)] for c in ("answer", "task", "metadata", "question")}
    labels = torch.tensor(verifier_reward(texts, **columns)) > 0.5  # [N]
    scores = torch.full((len(texts),), math.nan)
    group_means = torch.full((len(texts),), math.nan)  # q_bar, the finished rollouts scored at their last token
    for d in scorer.decisions:
        scores[d.index] = d.score
        group_means[d.index] = d.group_mean
    decided = ~torch.isnan(scores)
    groups = [
        (labels[g * G : (g + 1) * G], decided[g * G : (g + 1) * G], list(range(g * G, (g + 1) * G)))
        for g in range(len(rows))
    ]
    auc = roc_auc(scores[decided], labels[decided])
    within = []
    for lab, dec, idx in groups:
        if int(dec.sum()) >= 2 and 0 < int(lab[dec].sum()) < int(dec.sum()):
            within.append(roc_auc(scores[idx][dec], lab[dec]))
    print(
        f"\n{len(groups)} groups, positive rate {labels.float().mean():.3f}, head AUC at L_detect {auc:.3f} "
        f"(within mixed groups {sum(within) / max(len(within), 1):.3f} over {len(within)})"
    )
    found = {}
    for rule in ("group_relative", "literal"):
        for lam, p_min, p_max in ((0.5, 0.25, 0.75), (4.0, 0.0, 1.0)):
            cal = BinnedCalibrator(
                buffer_size=10**6, lam=lam, p_min=p_min, p_max=p_max, cold_start_steps=0, survival_rule=rule
            )
            cal.observe(torch.tensor(buffer["scores"]), torch.tensor(buffer["labels"]))
            cal.refit()
            arrol = torch.full_like(scores, math.nan)
            arrol[decided] = cal.survival_probabilities(scores[decided], group_means[decided])
            random = torch.where(decided, torch.full_like(scores, cal.kappa), arrol)
            rho_a, var_a = _simulate(groups, arrol, MIN_SURVIVORS, 200, torch.Generator().manual_seed(0))
            rho_r, var_r = _simulate(groups, random, MIN_SURVIVORS, 200, torch.Generator().manual_seed(0))
            found[rule, lam] = (var_a, var_r)
            print(
                f"{rule}, lambda {lam}, clip [{p_min}, {p_max}]: p in [{arrol[decided].min():.2f}, "
                f"{arrol[decided].max():.2f}]; random E[rho]={rho_r:.3f} E[rho(1-rho)]={var_r:.4f}; "
                f"rule E[rho]={rho_a:.3f} E[rho(1-rho)]={var_a:.4f}"
            )
    n_pos, n_neg = int(labels[decided].sum()), int((~labels[decided]).sum())
    # Hanley-McNeil null SE; 2.5 SE: this batch's AUC was 0.68 under the literal rule's training run, 0.60 under the
    # group-relative one (survivors, the head's only labelled data, differ between the rules)
    assert auc > 0.5 + 2.5 * math.sqrt((n_pos + n_neg + 1) / (12 * n_pos * n_neg))
    assert all(math.isfinite(v) for pair in found.values() for v in pair)


# ------------------------------------------------------------------------------------------------------------------
# Checkpoint / resume
def test_checkpoint_resume_repeats_the_next_pruning_decisions(run, chain_sum_splits):
    trainer, live = run["trainer"], run["stage"]
    state = torch.load(os.path.join(run["checkpoint"], "efficient_rlvr_state.pt"), weights_only=False)
    restored = PruningStage(trainer, trainer.args)
    restored.load_state_dict(state["PruningStage"])
    fresh = PruningStage(trainer, trainer.args)  # cold start: must prune nothing
    train_ds, _ = chain_sum_splits
    tokenizer = trainer.processing_class
    prompt_ids = [_prompt_ids(tokenizer, train_ds[i]["prompt"]) for i in range(128, 160) for _ in range(G)]
    outcomes = []
    for stage in (live, restored, fresh):
        torch.manual_seed(7)  # vLLM samples from the global torch RNG (in-process engine)
        stage.rollout(trainer, prompt_ids, G)
        outcomes.append([(d.request_id.split("-")[-1], d.pruned, d.draw, d.score) for d in stage.callback.decisions])
    a, b, c = outcomes
    assert [x[:3] for x in a] == [x[:3] for x in b]
    assert [x[3] for x in a] == pytest.approx([x[3] for x in b], abs=1e-6)
    assert any(x[1] for x in a) and not any(x[1] for x in c)
    assert torch.equal(restored.calibrator.posterior_table, live.calibrator.posterior_table)
    assert restored.generation_calls == live.generation_calls
    for p, q in zip(restored.head.parameters(), live.head.parameters(), strict=True):
        assert torch.equal(p, q)


# ------------------------------------------------------------------------------------------------------------------
# Test-time vote
def test_eval_vote_compares_majority_and_head_weighted_vote(run, chain_sum_splits):
    sys.path.insert(0, os.path.join(REPO, "examples"))
    try:
        import eval_vote
    finally:
        sys.path.pop(0)
    from efficient_rlvr.pruning import majority_vote, weighted_vote

    _, eval_ds = chain_sum_splits
    head = quality_head_from_state(run["checkpoint"])
    assert torch.equal(head.net[0].weight, run["stage"].head.net[0].weight.cpu())
    result = eval_vote.vote_accuracy(
        run["trainer"].accelerator.unwrap_model(run["trainer"].model),
        run["trainer"].processing_class,
        head,
        eval_ds.select(range(12)),
        num_samples=4,
        max_new_tokens=40,
        return_details=True,
    )
    details = result["details"]
    assert len(details) == 12 and all(len(d["scores"]) == 4 for d in details)
    for d in details:
        assert d["majority"] == majority_vote(d["answers"])
        assert d["weighted"] == weighted_vote(d["answers"], d["scores"])
    assert result["majority_accuracy"] == pytest.approx(sum(d["majority_correct"] for d in details) / 12)
    assert result["weighted_accuracy"] == pytest.approx(sum(d["weighted_correct"] for d in details) / 12)
    assert 0 <= result["sample_accuracy"] <= result["oracle_accuracy"] <= 1
    # the CLI on the checkpoint folder (model, tokenizer and head state all live there)
    out = os.path.join(run["checkpoint"], "vote.json")
    cli = eval_vote.main(
        [
            "--model",
            run["checkpoint"],
            "--eval_size",
            "8",
            "--num_samples",
            "2",
            "--max_new_tokens",
            "40",
            "--calibration_prompts",
            "4",
            "--output",
            out,
        ]
    )
    with open(out) as f:
        assert json.load(f)["weighted_accuracy"] == cli["weighted_accuracy"]
    assert cli["vote_used"] in ("majority", "weighted") and cli["calibration_prompts"] == 4
    # DeepConf weights: the lowest 4-token-window mean of each candidate's sampled-token log-probs, no head needed.
    from efficient_rlvr.pruning.diagnose import deepconf

    model = run["trainer"].accelerator.unwrap_model(run["trainer"].model)
    tokenizer = run["trainer"].processing_class

    def deepconf_vote(**keep: float) -> dict:
        return eval_vote.vote_accuracy(
            model,
            tokenizer,
            None,
            eval_ds.select(range(6)),
            num_samples=4,
            max_new_tokens=40,
            return_details=True,
            scorer="deepconf",
            **keep,
        )

    conf = deepconf_vote()  # keep's default
    for d in conf["details"]:
        ids = d["prompt_ids"]
        for score, comp in zip(d["scores"], d["completion_ids"], strict=True):  # one forward per candidate, unpadded
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids + comp], device=model.device)).logits[0].float()
            lp = torch.log_softmax(logits[len(ids) - 1 : -1], dim=-1).gather(
                1, torch.tensor(comp, device=logits.device)[:, None]
            )
            assert score == pytest.approx(deepconf(lp.flatten().cpu(), len(comp))[1], abs=1e-4)
        assert d["weighted"] == weighted_vote(d["answers"], d["scores"])
    # DeepConf's filter: only the most confident half of each prompt's candidates vote; same candidates and scores
    filtered = deepconf_vote(keep=0.5)
    assert filtered["keep"] == 0.5 and conf["keep"] == 1.0
    for d, full in zip(filtered["details"], conf["details"], strict=True):
        assert d["scores"] == full["scores"]
        assert d["weighted"] == weighted_vote(d["answers"], d["scores"], keep=0.5)
    with pytest.raises(ValueError, match="scorer"):
        eval_vote.vote_accuracy(model, tokenizer, None, eval_ds.select(range(2)), scorer="head")
    with pytest.raises(ValueError, match="keep"):
        eval_vote.vote_accuracy(model, tokenizer, None, eval_ds.select(range(2)), scorer="deepconf", keep=0.0)


def test_vote_falls_back_to_majority_with_an_uninformative_head(run, chain_sum_splits):
    """A head forced uninformative (every score equal) cannot beat the majority vote on the calibration prompts,
    so the vote used is the majority vote and its accuracy on the other prompts is the majority vote's."""
    sys.path.insert(0, os.path.join(REPO, "examples"))
    try:
        import eval_vote
    finally:
        sys.path.pop(0)
    from efficient_rlvr.pruning import choose_vote

    head = quality_head_from_state(run["checkpoint"])
    with torch.no_grad():
        for param in head.parameters():
            param.zero_()
    _, eval_ds = chain_sum_splits
    model = run["trainer"].accelerator.unwrap_model(run["trainer"].model)
    tokenizer = run["trainer"].processing_class
    result = eval_vote.vote_accuracy(
        model, tokenizer, head, eval_ds.select(range(12)), num_samples=4, max_new_tokens=40, calibration_prompts=6
    )
    assert result["vote_used"] == "majority"
    assert result["chosen_accuracy"] == result["majority_accuracy_rest"]
    with pytest.raises(ValueError, match="calibration_prompts"):
        eval_vote.vote_accuracy(model, tokenizer, head, eval_ds.select(range(4)), calibration_prompts=4)
    # the rule itself: strictly more right answers on the same prompts, else majority
    assert choose_vote([1, 0, 1], [1, 1, 1]) == "weighted"
    assert choose_vote([1, 0, 1], [1, 1, 0]) == "majority"
    assert choose_vote([], []) == "majority"


def test_confidence_scorer_prunes_on_vllms_logprobs_in_training(base_model_dir, chain_sum_splits, tmp_path):
    """`pruning_scorer="confidence"` in a real run: pruned at L_detect on DeepConf's lowest-window confidence of the
    sampled tokens vLLM returned, no hidden-state hook, the head untouched; the gate watches the confidence."""
    from efficient_rlvr.pruning.confidence import deepconf

    train_ds, _ = chain_sum_splits
    trainer = EfficientGRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32),
        reward_funcs=[verifier_reward],
        args=EfficientGRPOConfig(
            **_kwargs(str(tmp_path), max_steps=3, pruning_cold_start_steps=1, pruning_scorer="confidence")
        ),
        train_dataset=train_ds,
        processing_class=load_tokenizer_for(base_model_dir),
    )
    stage = trainer.rollout_generation
    head_before = copy.deepcopy(stage.head.state_dict())
    seen = []
    original = stage.process

    def recording_process(trainer_, rows, batch, rewards):
        seen.append((stage.last_result, list(stage.callback.decisions)))
        return original(trainer_, rows, batch, rewards)

    stage.process = recording_process
    trainer.train()
    assert all(torch.equal(v, stage.head.state_dict()[k]) for k, v in head_before.items())  # nothing trained
    assert all(result.hook_seconds == 0.0 for result, _ in seen)
    pruned = 0
    for result, decisions in seen:
        for d in decisions:
            sampled = torch.tensor([pos[0] for pos in result.logprobs[d.index][:L_DETECT]])
            assert d.score == pytest.approx(math.exp(deepconf(sampled, L_DETECT)[1]), rel=1e-5)
            pruned += d.pruned
    assert pruned > 0
    # the online within-group AUC the gate reads is the confidence's own
    assert any("pruning/head_within_group_auc" in h for h in trainer.state.log_history)
