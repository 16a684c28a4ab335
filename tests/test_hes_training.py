"""HES Pos-High / Neg-Rand inside EfficientGRPOTrainer on the embedded task (transformers generation, real stack).

The stage's decision is replayed independently: HES from one unpadded teacher-forced forward per rollout (computed
before the stage runs, on the same weights), the selector rebuilt from the RNG state the stage had, and the rows of
the output batch compared with the rows that replay keeps.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from grpo_args import cpu_grpo_kwargs, verifier_trainer

from efficient_rlvr.batch import ROLLOUT_GROUPS, ROLLOUT_REWARDS
from efficient_rlvr.hes import PosHighNegRand
from efficient_rlvr.hes.stage import HESSelectionStage

G = 4


def _kwargs(output_dir, **overrides):
    kw = cpu_grpo_kwargs(
        output_dir,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        per_device_train_batch_size=32,  # 8 prompts x 4 per step
        num_generations=G,
        max_completion_length=40,
        max_steps=2,
        learning_rate=2e-4,
        hes_selection=True,
        hes_keep_fraction=0.5,
    )
    kw.update(overrides)
    return kw


@torch.no_grad()
def _direct_hes(model, batch, quantile=0.995):
    """HES of every row: one forward of the unpadded prompt + completion, float64 entropies, linear quantile."""
    was = model.training
    model.eval()
    out = []
    for i in range(batch["completion_ids"].shape[0]):
        p = batch["prompt_ids"][i][batch["prompt_mask"][i].bool()]
        c = batch["completion_ids"][i][batch["completion_mask"][i].bool()]
        if c.numel() == 0:
            out.append(0.0)
            continue
        logits = model(input_ids=torch.cat([p, c])[None]).logits[0].double()
        logp = torch.log_softmax(logits[p.numel() - 1 : p.numel() - 1 + c.numel()], dim=-1)
        ent = -(logp.exp() * logp).sum(-1)
        out.append(float(ent[ent >= torch.quantile(ent, quantile)].sum()))
    model.train(was)
    return torch.tensor(out)


def _record(trainer):
    stage = trainer.components["HESSelectionStage"]
    calls = []
    process = stage.process

    def recording(tr, rows, batch, rewards):
        snapshot = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        state = copy.deepcopy(stage.selector.state_dict())
        hes = _direct_hes(tr.accelerator.unwrap_model(tr.model), snapshot)
        out = process(tr, rows, batch, rewards)
        calls.append(
            {
                "in": snapshot,
                "out": out,
                "rewards": None if rewards is None else rewards.clone(),
                "state": state,
                "hes": hes,
                "selection": copy.deepcopy(stage.last_selection),
                "metrics": stage.metrics(),
            }
        )
        return out

    stage.process = recording
    return calls


@pytest.fixture(scope="module")
def hes_run(base_model_dir, chain_sum_splits, tmp_path_factory):
    train_ds, _ = chain_sum_splits
    trainer = verifier_trainer(base_model_dir, train_ds, _kwargs(str(tmp_path_factory.mktemp("hes") / "out")))
    calls = _record(trainer)
    trainer.train()
    return trainer, calls


def test_hes_selection_drops_exactly_the_rows_the_selector_chose(hes_run):
    trainer, calls = hes_run
    assert len(calls) == 2
    ranked_groups = 0
    for call in calls:
        rin, out, rewards = call["in"], call["out"], call["rewards"].cpu()
        correct = rewards > 0.5
        # The stage's HES (correct rollouts only are scored) equals the direct computation.
        stage_hes = call["selection"]["hes"]
        assert torch.isnan(stage_hes[~correct]).all()
        torch.testing.assert_close(stage_hes[correct].double(), call["hes"][correct].double(), atol=1e-4, rtol=1e-4)
        # Replay the selector from the RNG state the stage had (on the stage's HES, just checked: exact duplicates
        # of a completion would make the tie order of the independent values arbitrary).
        selector = PosHighNegRand(keep_fraction=0.5, seed=123)
        selector.load_state_dict(call["state"])
        hes = stage_hes
        keep = selector.select(rewards, hes, groups=G)
        assert torch.equal(call["selection"]["keep"], keep)
        idx = torch.nonzero(keep).flatten()
        assert torch.equal(out["completion_ids"], rin["completion_ids"][idx])
        assert torch.equal(out["advantages"], rin["advantages"][idx])  # advantages keep the whole group's baseline
        assert int(out["num_items_in_batch"]) == int(out["completion_mask"].sum())
        for g in range(rewards.numel() // G):
            pos = correct[g * G : (g + 1) * G]
            kept = keep[g * G : (g + 1) * G]
            assert int((kept & pos).sum()) == math.ceil(0.5 * int(pos.sum()))
            assert int((kept & ~pos).sum()) == math.ceil(0.5 * int((~pos).sum()))
            if int(pos.sum()) >= 2:  # ranking mattered: every kept correct rollout beats every dropped one
                ranked_groups += 1
                h = hes[g * G : (g + 1) * G]
                assert float(h[kept & pos].min()) >= float(h[~kept & pos].max())
        m = call["metrics"]
        assert m["hes/dropped_rollouts"] == float((~keep).sum()) > 0
        assert m["hes/kept_correct_hes_mean"] == pytest.approx(float(hes[keep & correct].mean()), rel=1e-5)
        assert m["hes/seconds"] > 0
    assert ranked_groups > 0, "no group had two correct rollouts: the HES ranking was not exercised"
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) and math.isfinite(h["grad_norm"]) for h in logs)
    assert logs[-1]["hes/total_rollouts_dropped"] == sum(float((~c["selection"]["keep"]).sum()) for c in calls)


def test_restored_stage_repeats_the_next_picks(hes_run):
    trainer, calls = hes_run
    live = trainer.components["HESSelectionStage"]
    restored = HESSelectionStage(trainer, trainer.args)
    restored.load_state_dict(copy.deepcopy(live.state_dict()))
    call = calls[-1]
    rows = [{} for _ in range(call["in"]["completion_ids"].shape[0])]
    picks = []
    for stage in (live, restored):
        batch = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in call["in"].items()}
        HESSelectionStage.process(stage, trainer, rows, batch, call["rewards"])  # the class's, not the recorder
        HESSelectionStage.process(stage, trainer, rows, batch, call["rewards"])  # the RNG advanced the same way too
        picks.append(stage.last_selection["keep"])
    assert torch.equal(picks[0], picks[1])


def test_hes_after_the_budget_stage_uses_variable_groups(base_model_dir, chain_sum_splits, tmp_path):
    """With V0.5 first, HES reads the per-row rewards/groups the budget attached and selects within each group."""
    train_ds, _ = chain_sum_splits
    kwargs = _kwargs(
        str(tmp_path / "out"),
        per_device_train_batch_size=16,
        max_steps=1,
        budget_baseline=True,
        budget_adaptive=True,
        budget_k_init=G,
        budget_k_max=8,
    )
    trainer = verifier_trainer(base_model_dir, train_ds, kwargs)
    calls = _record(trainer)
    trainer.train()
    (call,) = calls
    rewards, groups = call["in"][ROLLOUT_REWARDS].cpu(), call["in"][ROLLOUT_GROUPS].cpu()
    keep = call["selection"]["keep"]
    sizes = torch.bincount(groups)
    assert int(sizes.max()) > G  # the budget rolled some prompt out more
    for g in range(sizes.numel()):
        in_g = groups == g
        pos, neg = in_g & (rewards > 0.5), in_g & (rewards <= 0.5)
        assert int((keep & pos).sum()) == math.ceil(0.5 * int(pos.sum()))
        assert int((keep & neg).sum()) == math.ceil(0.5 * int(neg.sum()))
    assert call["out"]["completion_ids"].shape[0] == int(keep.sum())
    assert torch.equal(call["out"][ROLLOUT_GROUPS].cpu(), groups[keep])
    assert math.isfinite(trainer.state.log_history[0]["loss"])


def test_hes_needs_generation_order_or_row_annotations(hes_run):
    trainer, calls = hes_run
    stage = HESSelectionStage(trainer, trainer.args)
    unannotated = {k: v for k, v in calls[0]["in"].items() if k not in (ROLLOUT_REWARDS, ROLLOUT_GROUPS)}
    batch = {k: (v[:-1] if isinstance(v, torch.Tensor) and v.dim() else v) for k, v in unannotated.items()}
    with pytest.raises(ValueError, match="generation order"):
        stage.process(trainer, [{}] * calls[0]["in"]["completion_ids"].shape[0], batch, calls[0]["rewards"])


def test_keeping_everything_trains_exactly_like_vanilla(base_model_dir, chain_sum_splits, tmp_path):
    """hes_keep_fraction=1 keeps every rollout: the scoring pass must leave training bit-identical (no side effects)."""
    train_ds, _ = chain_sum_splits
    runs = []
    for name, extra in (("off", {"hes_selection": False}), ("all", {"hes_keep_fraction": 1.0})):
        trainer = verifier_trainer(base_model_dir, train_ds, _kwargs(str(tmp_path / name), **extra))
        trainer.train()
        runs.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
        params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        runs[-1].append(params)
    assert runs[0][:-1] == runs[1][:-1] and len(runs[0]) == 3
    for n, p in runs[0][-1].items():
        torch.testing.assert_close(runs[1][-1][n], p, rtol=0, atol=0, msg=n)
