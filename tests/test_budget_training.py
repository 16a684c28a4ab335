"""V0.5 inside EfficientGRPOTrainer on the embedded task: fused-baseline advantages, rollout-more rounds, resume.

One V0.5 run (k_init 4, k_max 8, 4 prompts per step, gradient_accumulation_steps=2, transformers generation) is shared
by the module. Every check recomputes what the stage should have done independently: the rewards from the decoded
completions with the task's verifier, the history prior by hand, the decisions of every round by replaying the
one-at-a-time rule's plan, the fused baseline and the advantages from the formulas of SPEC section 4.
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from grpo_args import cpu_grpo_kwargs, launch_two_cpu_processes, verifier_trainer

from efficient_rlvr.batch import ROLLOUT_GROUPS, ROLLOUT_REWARDS
from efficient_rlvr.budget import fused_advantages
from efficient_rlvr.budget.stage import BudgetStage
from efficient_rlvr.rewards import verifier_reward

G, K_MAX, COST, PROMPTS = 4, 8, 0.0039, 4
EMA, SHRINK = 0.1, 2.0  # the stage's history prior (HISTORY_EMA, HISTORY_SHRINKAGE)


def _kwargs(output_dir, **overrides):
    kw = cpu_grpo_kwargs(
        output_dir,
        lr_scheduler_type="constant",
        logging_steps=1,
        per_device_train_batch_size=G * PROMPTS // 2,
        gradient_accumulation_steps=2,  # generation batch = 4 prompts x 4; merged batches split into 2 chunks
        num_generations=G,
        max_completion_length=40,
        max_steps=3,
        learning_rate=2e-4,
        budget_baseline=True,
        budget_adaptive=True,
        budget_k_init=G,
        budget_k_max=K_MAX,
        budget_cost=COST,
        save_strategy="steps",
        save_steps=1,
    )
    kw.update(overrides)
    return kw


def _record(trainer):
    """Record every call of the budget stage: its rows, input and output batches, and what it decided."""
    stage = trainer.components["BudgetStage"]
    calls = []
    process = stage.process

    def recording(tr, rows, batch, rewards):
        prior_state = copy.deepcopy(stage.prior.state_dict())
        out = process(tr, rows, batch, rewards)
        calls.append(
            {
                "rows": rows,
                "out": {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in out.items()},
                "first_rewards": rewards.clone(),
                "last_step": copy.deepcopy(stage.last_step),
                "prior_state": prior_state,
            }
        )
        return out

    stage.process = recording
    return calls


@pytest.fixture(scope="module")
def v05_run(base_model_dir, chain_sum_splits, tmp_path_factory):
    train_ds, _ = chain_sum_splits
    kwargs = _kwargs(str(tmp_path_factory.mktemp("v05") / "out"))
    trainer = verifier_trainer(base_model_dir, train_ds, kwargs)
    calls = _record(trainer)
    trainer.train()
    return {"trainer": trainer, "calls": calls, "kwargs": kwargs, "train_ds": train_ds, "model_dir": base_model_dir}


# ---------------------------------------------------------------------------------------------------------------------
# Independent recomputation
def _decoded_rewards(trainer, call):
    """Reward of every output row from its decoded completion and its prompt's columns (the task's verifier)."""
    out, rows = call["out"], call["rows"]
    texts = trainer.processing_class.batch_decode(out["completion_ids"], skip_special_tokens=True)
    groups = out[ROLLOUT_GROUPS].tolist()
    src = [rows[g * G] for g in groups]
    return torch.tensor(
        verifier_reward(
            [[{"role": "assistant", "content": t}] for t in texts],
            answer=[r["answer"] for r in src],
            task=[r["task"] for r in src],
            metadata=[r["metadata"] for r in src],
            question=[r["question"] for r in src],
        )
    )


def _expected_priors(calls):
    """The history prior by hand: EMA (0.1) of each prompt's group means and of the batch mean, 2 pseudo-visits."""
    table, g, out = {}, None, []
    for call in calls:
        keys, rewards = call["last_step"]["keys"], call["last_step"]["rewards"]
        gm = 0.5 if g is None else g
        prior = []
        for key in keys:
            if key in table:
                value, visits = table[key]
                n = min(visits, (2 - EMA) / EMA)
                prior.append((n * value + SHRINK * gm) / (n + SHRINK))
            else:
                prior.append(gm)
        out.append(torch.tensor(prior))
        means = [float(r.mean()) for r in rewards]
        for key, m in zip(keys, means, strict=True):
            table[key] = [m, 1] if key not in table else [(1 - EMA) * table[key][0] + EMA * m, table[key][1] + 1]
        g = sum(means) / len(means) if g is None else (1 - EMA) * g + EMA * sum(means) / len(means)
    return out


def _gain(d2, k):
    return d2 * d2 / ((1 + k * d2) * (1 + (k + 1) * d2))


def _d2(rewards, v):
    m = sum(2 * r - 1 for r in rewards) / len(rewards)
    return max(0.0, (m - (2 * v - 1)) ** 2 - 1 / len(rewards))


def _replay_counts(sequence, v, max_rounds=3):
    """Rollouts the rule gives a prompt whose rewards come in this order (first round = G), round by round."""
    k, counts = G, [G]
    for rounds_left in range(max_rounds - 1, 0, -1):
        d2 = _d2(sequence[:k], v)
        plan = sum(1 for j in range(k, K_MAX) if _gain(d2, j) > COST)
        n = min(plan, max(1, math.ceil(plan / rounds_left)))
        if n == 0:
            break
        k += n
        counts.append(n)
    return counts


def _expected_advantages(group_rewards, priors):
    """A = (r - b) / s by the formulas of SPEC section 4, s = group std (batch std for zero-std groups) + 1e-4."""
    flat = torch.cat(group_rewards)
    batch_std = float(flat.std()) if float(flat.std()) > 0 else 1.0
    out = []
    for r, v in zip(group_rewards, priors.tolist(), strict=True):
        k = r.numel()
        m = float((2 * r - 1).mean())
        d2 = max(0.0, (m - (2 * v - 1)) ** 2 - 1 / k)
        w = d2 / (d2 + 1 / k)
        b = (w * m + (1 - w) * (2 * v - 1) + 1) / 2
        s = float(r.std()) if k >= 2 and float(r.std()) > 0 else batch_std
        out.append((r - b) / (s + 1e-4))
    return out


# ---------------------------------------------------------------------------------------------------------------------
def test_rewards_prior_decisions_and_advantages_follow_the_formulas(v05_run):
    trainer, calls = v05_run["trainer"], v05_run["calls"]
    assert len(calls) == 3
    priors = _expected_priors(calls)
    extra_seen = False
    for step, (call, prior) in enumerate(zip(calls, priors, strict=True)):
        out, last = call["out"], call["last_step"]
        rewards = _decoded_rewards(trainer, call)
        torch.testing.assert_close(out[ROLLOUT_REWARDS].cpu(), rewards)  # the stage's rewards are the verifier's
        torch.testing.assert_close(rewards[: G * PROMPTS], call["first_rewards"].cpu())  # first round: TRL's rows
        torch.testing.assert_close(last["prior"], prior, atol=1e-6, rtol=0)
        groups = out[ROLLOUT_GROUPS].cpu()
        group_rewards = [rewards[groups == i] for i in range(PROMPTS)]  # in generation order
        for i, seq in enumerate(group_rewards):
            counts = _replay_counts(seq.tolist(), float(prior[i]))
            assert sum(counts) == seq.numel(), f"step {step} prompt {i}: rewards {seq.tolist()}, rule {counts}"
        replayed = [_replay_counts(s.tolist(), float(v)) for s, v in zip(group_rewards, prior, strict=True)]
        assert last["rounds"] == max(len(c) for c in replayed)
        extra_seen |= any(s.numel() > G for s in group_rewards)
        expected = _expected_advantages(group_rewards, prior)
        adv = out["advantages"].cpu()
        for i in range(PROMPTS):
            torch.testing.assert_close(adv[groups == i], expected[i], atol=1e-4, rtol=1e-5)
        assert int(out["num_items_in_batch"]) == int(out["completion_mask"].sum())
    assert extra_seen, "no prompt was rolled out more: the test would not exercise variable group sizes"
    assert any((torch.stack([r.float().mean() for r in c["last_step"]["rewards"]]) > 0).any() for c in calls), (
        "nothing solved: the advantages are trivial"
    )


def test_variable_groups_train_with_gradient_accumulation(v05_run):
    trainer, calls = v05_run["trainer"], v05_run["calls"]
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert trainer.state.global_step == 3 and len(logs) == 3
    assert all(math.isfinite(h["loss"]) and math.isfinite(h["grad_norm"]) for h in logs)
    sizes = [c["out"]["completion_ids"].shape[0] for c in calls]
    assert max(sizes) > G * PROMPTS  # variable group sizes reached the loss
    for call, log in zip(calls, logs, strict=True):
        # The logged TRL reward is the first round's (k_init rollouts of every prompt), not the extra rounds'.
        assert log["reward"] == pytest.approx(float(call["first_rewards"].mean()), abs=1e-6)
        ks = call["last_step"]["counts"].float()
        assert log["budget/k_mean"] == pytest.approx(float(ks.mean()))
        assert log["budget/rollouts"] == float(ks.sum()) == call["out"]["completion_ids"].shape[0]
        assert log["budget/stopped_at_k_init"] == pytest.approx(float((ks == G).float().mean()))
        w = call["last_step"]["weight"]
        assert log["budget/prior_weight"] == pytest.approx(float((1 - w).mean()), abs=1e-6)
    assert logs[-1]["budget/total_rollouts"] == sum(sizes)
    assert logs[-1]["budget/total_rollouts_fixed"] == 3 * PROMPTS * K_MAX


def test_resume_restores_prior_and_repeats_decisions(v05_run, tmp_path):
    """Resume from checkpoint-2: the restored prior equals the live one after step 2, and step 3 repeats exactly."""
    run = v05_run
    checkpoint = os.path.join(run["kwargs"]["output_dir"], "checkpoint-2")
    assert os.path.exists(os.path.join(checkpoint, "efficient_rlvr_state.pt"))
    kwargs = dict(run["kwargs"], output_dir=str(tmp_path / "resumed"))
    trainer = verifier_trainer(run["model_dir"], run["train_ds"], kwargs)
    calls = _record(trainer)
    trainer.train(resume_from_checkpoint=checkpoint)
    assert len(calls) == 1 and trainer.state.global_step == 3
    original = run["calls"][2]
    assert calls[0]["prior_state"] == original["prior_state"]  # history prior restored as it was before step 3
    assert calls[0]["last_step"]["keys"] == original["last_step"]["keys"]
    torch.testing.assert_close(calls[0]["last_step"]["prior"], original["last_step"]["prior"], rtol=0, atol=0)
    for a, b in zip(calls[0]["last_step"]["rewards"], original["last_step"]["rewards"], strict=True):
        assert a.tolist() == b.tolist()  # same generations, same decisions
    torch.testing.assert_close(calls[0]["out"]["advantages"], original["out"]["advantages"], rtol=0, atol=0)
    stage = trainer.components["BudgetStage"]
    live = run["trainer"].components["BudgetStage"]
    untimed = lambda m: {k: v for k, v in m.items() if "seconds" not in k}  # noqa: E731
    assert untimed(stage.metrics()) == pytest.approx(untimed(live.metrics()), nan_ok=True)


def test_restored_stage_makes_the_same_next_plan(v05_run):
    """Component level: a stage restored from a state_dict plans the same next round for the same rewards."""
    live = v05_run["trainer"].components["BudgetStage"]
    state = copy.deepcopy(live.state_dict())
    restored = BudgetStage(v05_run["trainer"], v05_run["trainer"].args)
    restored.load_state_dict(state)
    last = v05_run["calls"][-1]["last_step"]
    keys = last["keys"] + ["never-seen"]
    torch.testing.assert_close(restored.prior.prior(keys), live.prior.prior(keys), rtol=0, atol=0)
    rewards = [torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.tensor([0.0, 1.0, 0.0, 1.0]), torch.zeros(4)]
    prior = live.prior.prior(keys[:3])
    assert (
        restored.budget.next_round(rewards, prior, rounds_left=2).tolist()
        == live.budget.next_round(rewards, prior, rounds_left=2).tolist()
    )


def test_all_equal_batch_does_not_blow_up_the_advantages():
    # Nothing solved anywhere: the batch std is 0, yet the fused baseline (prior 0.5) leaves r - b = -b != 0.
    rewards = [torch.zeros(4), torch.zeros(8)]
    baseline = torch.tensor([0.0625, 0.03125])
    for scale in ("group", "batch"):
        adv = fused_advantages(rewards, baseline, scale=scale)
        torch.testing.assert_close(adv[0], torch.full((4,), -0.0625 / (1 + 1e-4)))
        torch.testing.assert_close(adv[1], torch.full((8,), -0.03125 / (1 + 1e-4)))


def test_stage_validates_its_configuration(base_model_dir, chain_sum_splits, tmp_path):
    train_ds, _ = chain_sum_splits
    kwargs = _kwargs(str(tmp_path / "out"), num_generations=8, per_device_train_batch_size=16)
    with pytest.raises(ValueError, match="budget_k_init"):
        verifier_trainer(base_model_dir, train_ds, kwargs)
    with pytest.raises(ValueError, match="value_prior"):
        BudgetStage.__new__(BudgetStage)._as_prior(42)


# ---------------------------------------------------------------------------------------------------------------------
# Two processes (gloo): every rank makes the same decisions, the slices add up, shapes stay equal across ranks.
TWO_PROCESS_SCRIPT = r"""
import json, math, os, sys
import torch
torch.set_num_threads(1)
from transformers import AutoModelForCausalLM
from efficient_rlvr import EfficientGRPOConfig, EfficientGRPOTrainer
from efficient_rlvr.embedded import load_tokenizer
from efficient_rlvr.rewards import verifier_reward
from efficient_rlvr.tasks import load_task_splits

out_dir, model_dir = sys.argv[1], sys.argv[2]
train_ds, _ = load_task_splits("embedded", train_size=256, eval_size=8, seed=0)
args = EfficientGRPOConfig(
    output_dir=os.path.join(out_dir, "run"), use_cpu=True, bf16=False, report_to="none", seed=0,
    per_device_train_batch_size=8, gradient_accumulation_steps=2, num_generations=4, max_completion_length=40,
    max_steps=3, learning_rate=2e-4, lr_scheduler_type="constant", logging_steps=1, save_strategy="no", top_k=0,
    beta=0.0, loss_type="dapo", disable_tqdm=True, budget_baseline=True, budget_adaptive=True, budget_k_init=4,
    budget_k_max=8, hes_selection=True,
)
tokenizer = load_tokenizer(model_dir)
tokenizer.padding_side = "left"
trainer = EfficientGRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), reward_funcs=[verifier_reward],
                               args=args, train_dataset=train_ds, processing_class=tokenizer)
budget, hes = trainer.components["BudgetStage"], trainer.components["HESSelectionStage"]
record, b_process, h_process = [], budget.process, hes.process

def nan_to_none(xs):
    return [None if math.isnan(x) else x for x in xs]

def budget_recording(tr, rows, batch, rewards):
    out = b_process(tr, rows, batch, rewards)
    record.append({"counts": budget.last_step["counts"].tolist(), "keys": budget.last_step["keys"],
                   "rows": int(out["completion_ids"].shape[0]), "groups": out["rollout_groups"].tolist(),
                   "rewards": nan_to_none(out["rollout_rewards"].tolist()), "adv": out["advantages"].tolist(),
                   "num_items": int(out["num_items_in_batch"]), "tokens": int(out["completion_mask"].sum())})
    return out

def hes_recording(tr, rows, batch, rewards):
    out = h_process(tr, rows, batch, rewards)
    record[-1].update({"keep": hes.last_selection["keep"].tolist(), "hes_rows": int(out["completion_ids"].shape[0]),
                       "hes_num_items": int(out["num_items_in_batch"]),
                       "hes_tokens": int(out["completion_mask"].sum())})
    return out

budget.process, hes.process = budget_recording, hes_recording
trainer.train()
rank = trainer.accelerator.process_index
losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
    json.dump({"world": trainer.accelerator.num_processes, "steps": record, "losses": losses}, f)
"""


def test_two_processes_agree_and_keep_equal_shapes(base_model_dir, tmp_path):
    import json

    script = tmp_path / "two_process.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    result = launch_two_cpu_processes(script, tmp_path, base_model_dir, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert len(ranks[0]["losses"]) == 3 and all(math.isfinite(x) for x in ranks[0]["losses"])
    for s0, s1 in zip(ranks[0]["steps"], ranks[1]["steps"], strict=True):
        assert s0["keys"] == s1["keys"] and s0["counts"] == s1["counts"] and len(s0["keys"]) == 2 * PROMPTS
        assert s0["keep"] == s1["keep"]  # the same HES decision on the gathered batch
        assert s0["rows"] == s1["rows"] and s0["hes_rows"] == s1["hes_rows"]  # equal shapes on both ranks
        # Real rollouts of each prompt over both ranks = its k; the rest are inert padding (no reward, no tokens).
        groups = [
            g for g, r in zip(s0["groups"] + s1["groups"], s0["rewards"] + s1["rewards"], strict=True) if r is not None
        ]
        assert [groups.count(i) for i in range(len(s0["counts"]))] == s0["counts"]
        assert s0["num_items"] == s1["num_items"] == s0["tokens"] + s1["tokens"]
        assert s0["hes_num_items"] == s1["hes_num_items"] == s0["hes_tokens"] + s1["hes_tokens"]
        assert 2 * s0["hes_rows"] >= sum(s0["keep"])
    assert any(max(s["counts"]) > G for s in ranks[0]["steps"]), "no extra rollouts: the test lacks teeth"
