"""Cost-Aware GRPO through the real trainer: `efficient_rlvr.cost.stage.CostAwareStage` in `EfficientGRPOTrainer`.

- the loss path: with the identity draw and unit weights the micro-batch losses give TRL's gradient; with a real draw
  (repeats, inert rows, unequal micro-batches) they give the gradient of TRL's full-batch loss whose advantages are
  multiplied by each row's summed loss multipliers, for a token-sum (dapo), a row-mean (grpo) and bnpo;
- refused configurations name the field;
- training on the embedded task (base model, transformers generation) with gradient accumulation 2 and
  num_iterations 2: the cost/ metrics equal the tokens of the drawn rows, and a resumed run repeats the next draws;
- two processes (gloo): identical draws, equal shares, moved rows arrive intact, identical parameters. This file is
  also the two-process worker (`python -m accelerate.commands.launch ... tests/test_cost_training.py OUT MODEL`).

"The sampler reaches the vanilla reward with fewer policy tokens" is not a test: per-step rewards of a few CPU steps
are too noisy to decide it (see the `cost_aware` bench variant instead).
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

torch.set_num_threads(1)

from grpo_args import cpu_grpo_kwargs, launch_two_cpu_processes  # noqa: E402

from efficient_rlvr import EfficientGRPOConfig, EfficientGRPOTrainer  # noqa: E402
from efficient_rlvr.batch import split_rows  # noqa: E402
from efficient_rlvr.cost import CostAwareSampler, rollout_costs  # noqa: E402
from efficient_rlvr.cost.stage import CostAwareStage, check_cost_aware_config  # noqa: E402
from efficient_rlvr.embedded import load_tokenizer  # noqa: E402
from efficient_rlvr.rewards import verifier_reward  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _trainer(model_dir: str, train_ds, kwargs: dict) -> EfficientGRPOTrainer:
    return EfficientGRPOTrainer(
        model=model_dir,
        reward_funcs=[verifier_reward],
        args=EfficientGRPOConfig(**kwargs),
        train_dataset=train_ds,
        processing_class=load_tokenizer(model_dir),
    )


def _generation_batch(trainer: EfficientGRPOTrainer, num_prompts: int) -> dict:
    """One real generation batch (TRL generation + scoring) of `num_prompts` prompts x G on this process."""
    rows = [trainer.train_dataset[i] for i in range(num_prompts) for _ in range(trainer.num_generations)]
    trainer.model.train()
    return trainer._generate_and_score_completions(rows)


def _flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]).double()


def _grad_of_chunks(trainer, chunks, loss_fn) -> torch.Tensor:
    """Gradient accumulated over the micro-batches (what one optimizer step sees)."""
    trainer.model.zero_grad(set_to_none=True)
    for chunk in chunks:
        loss_fn(trainer.model, chunk).backward()
    grad = _flat_grad(trainer.model)
    trainer.model.zero_grad(set_to_none=True)
    return grad


@pytest.fixture(scope="module")
def loss_setup(tmp_path_factory, chain_sum_splits):
    """A trainer with cost-aware sampling (tiny random model; the loss path does not need a trained one) and one
    generation batch of 8 prompts x 4 whose advantages are replaced by seeded values (a random model solves
    nothing, so TRL's advantages would all be 0)."""
    from efficient_rlvr.embedded import save_random_model

    model_dir = save_random_model(str(tmp_path_factory.mktemp("cost_tiny")), seed=0)
    train_ds, _ = chain_sum_splits
    out = str(tmp_path_factory.mktemp("cost_loss"))
    kwargs = cpu_grpo_kwargs(
        out,
        per_device_train_batch_size=16,
        gradient_accumulation_steps=2,
        num_generations=4,
        max_completion_length=12,
        max_steps=1,
        learning_rate=1e-3,
        save_strategy="no",
        cost_aware_sampling=True,
    )
    trainer = _trainer(model_dir, train_ds, kwargs)
    batch = _generation_batch(trainer, 8)  # 32 rows
    gen = torch.Generator().manual_seed(0)
    batch["advantages"] = torch.randn(32, generator=gen)
    trainer.current_gradient_accumulation_steps = 2  # set by Trainer.train in a real run
    return trainer, batch


class _IdentitySampler(CostAwareSampler):
    """Draws every pooled row once, in order, with unit weights (constructs the 'vanilla' case)."""

    def draw(self, advantages, costs, num_draws=None):
        n = advantages.numel()
        assert num_draws == n
        return torch.arange(n), torch.ones(n)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_identity_draw_gives_trls_gradient(loss_setup, loss_type):
    """All weights 1 and the identity draw: the weighted path's gradient over the micro-batches is TRL's."""
    from trl import GRPOTrainer

    trainer, batch = loss_setup
    stage = CostAwareStage(trainer, trainer.args)
    stage.sampler = _IdentitySampler()
    trainer.loss_type, stage.loss_type = loss_type, loss_type
    try:
        chunks = stage.split(trainer, dict(batch), 2)
        assert [c["completion_ids"].shape[0] for c in chunks] == [16, 16]
        for chunk in chunks:
            assert torch.equal(chunk["sample_weights"], torch.ones(16))
            assert chunk["num_items_in_batch"] is batch["num_items_in_batch"]  # TRL's full-batch count, kept
        assert sorted(stage.last_draw["local_rows"].tolist()) == list(range(32))
        trainer.minibatch_sampler = stage
        ours = _grad_of_chunks(trainer, chunks, trainer._compute_loss)
        theirs = _grad_of_chunks(
            trainer, split_rows(batch, 2), lambda model, inputs: GRPOTrainer._compute_loss(trainer, model, inputs)
        )
    finally:
        trainer.loss_type = "dapo"
    assert theirs.abs().max() > 1e-4
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo"])
def test_sampled_micro_batches_weight_each_rollout(loss_setup, loss_type):
    """A real draw (M = 13 of 32 rows: repeats, micro-batches of 6 and 7 rows, 4 inert rows) gives exactly the gradient
    of TRL's loss on the full, unsampled batch with A_i multiplied by c_i = (N_+ / M) sum_{draws j of row i} v_j
    (v = 1 / (N_+ p): importance weights re-centred by a constant; N_+ = 28 rows with p > 0). For bnpo the target is TRL's dapo normaliser (weighting.py: the sampled bnpo
    objective is the full batch's token mean, not the micro-batch's)."""
    from trl import GRPOTrainer

    trainer, batch = loss_setup
    batch = dict(batch)
    inert = torch.tensor([1, 7, 8, 30])
    batch["completion_mask"] = batch["completion_mask"].clone()
    batch["completion_mask"][inert] = 0
    batch["num_items_in_batch"] = batch["completion_mask"].sum()
    trainer.args.cost_num_draws = 13
    stage = CostAwareStage(trainer, trainer.args)
    trainer.args.cost_num_draws = None
    trainer.loss_type, stage.loss_type = loss_type, loss_type
    try:
        chunks = stage.split(trainer, batch, 2)
        draw = stage.last_draw
        rows, v = draw["rows"], draw["weights"]
        assert rows.numel() == 13 and not torch.isin(rows, inert).any()  # inert rows have p = 0
        assert rows.unique().numel() < 13  # this seed draws a row twice: repeats are covered
        live = torch.ones(32, dtype=torch.bool)
        live[inert] = False
        costs = rollout_costs(batch["prompt_mask"], batch["completion_mask"])
        p = torch.zeros(32, dtype=torch.float64)
        p[live] = stage.sampler.probabilities(batch["advantages"][live], costs[live]).double()
        assert draw["support_rows"] == 28
        torch.testing.assert_close(v, 1.0 / (28 * p[rows]), rtol=1e-5, atol=0)  # a constant re-centring
        assert sorted(c["completion_ids"].shape[0] for c in chunks) == [6, 7]
        sizes = [c["advantages"].numel() for c in chunks]
        for chunk, local in zip(chunks, torch.split(draw["local_rows"], sizes), strict=True):
            width = chunk["completion_ids"].shape[1]
            assert torch.equal(chunk["completion_ids"], batch["completion_ids"][local][:, :width])
            assert (batch["completion_mask"][local][:, width:] == 0).all()  # trimming removed only padding
        trainer.minibatch_sampler = stage
        ours = _grad_of_chunks(trainer, chunks, trainer._compute_loss)

        c = torch.zeros(32, dtype=torch.float64).index_add_(0, rows, v) * (28 / 13)
        reference = dict(batch)
        reference["advantages"] = batch["advantages"] * c.float()
        trainer.loss_type = "dapo" if loss_type == "bnpo" else loss_type
        theirs = _grad_of_chunks(
            trainer, split_rows(reference, 2), lambda model, inputs: GRPOTrainer._compute_loss(trainer, model, inputs)
        )
    finally:
        trainer.loss_type = "dapo"
    assert theirs.abs().max() > 1e-4
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(beta=0.04), "beta"),
        (dict(entropy_coef=0.01), "entropy_coef"),
        (dict(use_adaptive_entropy=True), "use_adaptive_entropy"),
        (dict(top_entropy_quantile=0.2), "top_entropy_quantile"),
        (dict(cost_num_draws=3, gradient_accumulation_steps=4), "cost_num_draws"),
    ],
)
def test_unweightable_setups_are_refused(grpo_kwargs, overrides, field):
    with pytest.raises(ValueError, match=field):  # at config construction, through check_cost_aware_config
        EfficientGRPOConfig(**grpo_kwargs(cost_aware_sampling=True, **overrides))
    args = EfficientGRPOConfig(**grpo_kwargs(**overrides))  # the same fields are fine without the method
    args.cost_aware_sampling = True
    with pytest.raises(ValueError, match=field):
        check_cost_aware_config(args, num_processes=1)
    check_cost_aware_config(EfficientGRPOConfig(**grpo_kwargs(cost_aware_sampling=True)), num_processes=1)


def test_draws_must_cover_every_micro_batch_of_every_process(grpo_kwargs):
    args = EfficientGRPOConfig(
        **grpo_kwargs(cost_aware_sampling=True, cost_num_draws=3, gradient_accumulation_steps=2)
    )
    check_cost_aware_config(args, num_processes=1)  # 3 >= 1 x 2
    with pytest.raises(ValueError, match="cost_num_draws=3 must be >= num_processes x steps_per_generation = 4"):
        check_cost_aware_config(args, num_processes=2)


def test_trainer_construction_refuses_a_kl_term(tiny_model_dir, chain_sum_splits, grpo_kwargs):
    train_ds, _ = chain_sum_splits
    with pytest.raises(ValueError, match="beta"):
        _trainer(tiny_model_dir, train_ds, grpo_kwargs(cost_aware_sampling=True, beta=0.04))


# ------------------------------------------------------------------------------------ training on the real task


def _record_splits(trainer: EfficientGRPOTrainer) -> list[dict]:
    """Wrap the stage's split to record, per generation batch, the draw and the tokens of the rows it handed out."""
    stage = trainer.minibatch_sampler
    split, records = stage.split, []

    def recording_split(trainer_, batch, num_chunks):
        chunks = split(trainer_, batch, num_chunks)
        records.append(
            {
                "global_step": trainer_.state.global_step,
                "rows": stage.last_draw["rows"].tolist(),
                "weights": stage.last_draw["weights"].tolist(),
                "completion_ids": batch["completion_ids"].tolist(),
                "drawn_tokens": sum(
                    float(rollout_costs(c["prompt_mask"], c["completion_mask"]).sum()) for c in chunks
                ),
                "batch_tokens": float(rollout_costs(batch["prompt_mask"], batch["completion_mask"]).sum()),
                "chunk_rows": [int(c["completion_ids"].shape[0]) for c in chunks],
            }
        )
        return chunks

    stage.split = recording_split
    return records


def test_training_logs_consistent_cost_metrics_and_resume_repeats_draws(base_model_dir, chain_sum_splits, tmp_path):
    """Base model on the embedded task, 8 prompts x 4 per step, gradient accumulation 2, num_iterations 2 (one draw
    every 2 optimizer steps, reused), 24 of 32 rows drawn. Per step, cost/policy_tokens is the tokens of the drawn
    rows (counted from the micro-batches themselves), cost/full_batch_tokens matches TRL's own token counter, and a run
    resumed from the step-2 checkpoint draws exactly what the uninterrupted run drew next."""
    train_ds, _ = chain_sum_splits
    kwargs = cpu_grpo_kwargs(
        str(tmp_path / "run"),
        per_device_train_batch_size=16,
        gradient_accumulation_steps=2,
        num_iterations=2,
        num_generations=4,
        max_completion_length=32,
        max_steps=4,
        learning_rate=2e-4,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="steps",
        save_steps=2,
        cost_aware_sampling=True,
        cost_num_draws=24,
    )
    trainer = _trainer(base_model_dir, train_ds, kwargs)
    records = _record_splits(trainer)
    trainer.train()
    assert [r["global_step"] for r in records] == [0, 2]  # one draw per generation batch, reused for 2 iterations
    assert all(r["chunk_rows"] == [12, 12] for r in records)
    logs = [h for h in trainer.state.log_history if "cost/policy_tokens" in h and "loss" in h]
    assert [h["step"] for h in logs] == [1, 2, 3, 4]
    cumulative = 0.0
    for h in logs:
        record = records[(h["step"] - 1) // 2]
        cumulative += record["drawn_tokens"]
        assert h["cost/policy_tokens"] == record["drawn_tokens"]
        assert h["cost/full_batch_tokens"] == record["batch_tokens"]
        assert h["cost/tokens_saved"] == record["batch_tokens"] - record["drawn_tokens"]
        assert h["cost/policy_tokens_cumulative"] == cumulative
        assert h["cost/policy_rows"] == 24 and h["cost/full_batch_rows"] == 32 and h["cost/draws"] == 24
        assert 0 < h["cost/weight_mean"] <= h["cost/weight_max"] and 0 < h["cost/ess"] <= 24
    assert logs[-1]["cost/tokens_saved_cumulative"] > 0  # 24 of 32 rows, short ones preferred
    # TRL counts the input tokens of each generation batch once: the same tokens as every rollout once.
    num_tokens = [h["num_tokens"] for h in logs if "num_tokens" in h]  # logged at generation steps (1 and 3)
    assert num_tokens == [records[0]["batch_tokens"], records[0]["batch_tokens"] + records[1]["batch_tokens"]]
    assert any(h["reward"] > 0 for h in trainer.state.log_history if "reward" in h)

    # resume from the step-2 checkpoint: the next draw (and the batch it is drawn from) repeats
    resumed = _trainer(base_model_dir, train_ds, kwargs)
    resumed_records = _record_splits(resumed)
    resumed.train(resume_from_checkpoint=os.path.join(kwargs["output_dir"], "checkpoint-2"))
    assert len(resumed_records) == 1
    assert resumed_records[0]["completion_ids"] == records[1]["completion_ids"]
    assert resumed_records[0]["rows"] == records[1]["rows"]
    assert resumed_records[0]["weights"] == records[1]["weights"]
    resumed_logs = [h for h in resumed.state.log_history if "cost/policy_tokens_cumulative" in h]
    assert resumed_logs[-1]["cost/policy_tokens_cumulative"] == logs[-1]["cost/policy_tokens_cumulative"]


# ------------------------------------------------------------------------------------------------- two processes


def test_two_processes_draw_identically_and_share_rows_equally(base_model_dir, tmp_path):
    """Two gloo processes, 2 prompts x 4 per process and micro-step, gradient accumulation 2, 3 steps, 27 draws, after
    a batch stage that drops process 1's last group (12 live + 4 inert rows there): every rank draws the same 28
    global rows (never an inert one), trains half of them in equal micro-batches, the rows it trains that another
    rank generated arrive intact (token ids equal the owner's), the logged cost/ metrics agree, and the parameters
    stay identical."""
    result = launch_two_cpu_processes(os.path.abspath(__file__), tmp_path, base_model_dir, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    steps = list(zip(ranks[0]["splits"], ranks[1]["splits"], strict=True))
    assert len(steps) == 3
    moved_total = 0
    for s0, s1 in steps:
        assert s0["rows"] == s1["rows"] and s0["weights"] == s1["weights"]  # one global draw
        n0, n = len(s0["own_rows"]), len(s0["own_rows"]) + len(s1["own_rows"])
        assert (n0, n) == (16, 32)  # keep_rows pads process 1 back to 16 rows with 4 inert ones
        inert = [g for g, tokens in enumerate(s0["own_rows"] + s1["own_rows"]) if not tokens]
        assert inert == [28, 29, 30, 31] and not set(inert) & set(s0["rows"])  # inert rows are never drawn
        assert len(s0["rows"]) == 28  # cost_num_draws=27, rounded up to a multiple of the 2 processes
        assert len(s0["local_rows"]) == len(s1["local_rows"]) == 14  # equal shares
        assert s0["chunk_rows"] == s1["chunk_rows"] == [7, 7]  # equal micro-batches: TRL's metric gathers work
        assert sorted(s0["local_rows"] + s1["local_rows"]) == sorted(s0["rows"])  # every draw trained once
        owned = s0["own_rows"] + s1["own_rows"]  # global row id -> tokens, rank 0's rows first
        for s in (s0, s1):
            for g, tokens in zip(s["local_rows"], s["trained_rows"], strict=True):
                assert tokens == owned[g]
        moved_total += sum(1 for g in s0["local_rows"] if g >= n0) + sum(1 for g in s1["local_rows"] if g < n0)
        assert s0["metrics"] == s1["metrics"]
        assert (s0["metrics"]["cost/pool_rows"], s0["metrics"]["cost/pool_valid_rows"]) == (32, 28)
        assert s0["metrics"]["cost/rows_moved"] == len(
            {g for g in s0["local_rows"] if g >= n0} | {g for g in s1["local_rows"] if g < n0}
        )
    assert moved_total >= 3 * 2  # process 1 owns 12 drawable rows but trains 14: rows cross processes every step
    assert ranks[0]["param_checksum"] == ranks[1]["param_checksum"]


class _DropLastGroupOnRank1:
    """A batch stage dropping process 1's last group with `efficient_rlvr.batch.keep_rows` (as pruning, the
    zero-variance gate or HES selection do): process 1 keeps 12 live rows, padded with 4 inert ones."""

    def process(self, trainer, rows, batch, rewards):
        from efficient_rlvr.batch import keep_rows

        keep = torch.ones(batch["completion_ids"].shape[0], dtype=torch.bool)
        if trainer.accelerator.process_index == 1:
            keep[-trainer.num_generations :] = False
        return keep_rows(batch, keep, trainer.accelerator, min_rows=trainer.args.steps_per_generation)


def _two_process_worker(out_dir: str, model_dir: str) -> None:
    from efficient_rlvr.tasks import load_task_splits

    train_ds, _ = load_task_splits("embedded", train_size=48, eval_size=8, seed=0)
    trainer = _trainer(
        model_dir,
        train_ds,
        cpu_grpo_kwargs(
            os.path.join(out_dir, "run"),
            per_device_train_batch_size=8,
            gradient_accumulation_steps=2,
            num_generations=4,
            max_completion_length=16,
            max_steps=3,
            learning_rate=2e-4,
            lr_scheduler_type="constant",
            logging_steps=1,
            save_strategy="no",
            cost_aware_sampling=True,
            cost_num_draws=27,
        ),
    )
    trainer.batch_stages.append(_DropLastGroupOnRank1())  # an earlier batch stage that leaves uneven row counts
    stage = trainer.minibatch_sampler
    split, splits = stage.split, []

    def strip(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
        return [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]

    def recording_split(trainer_, batch, num_chunks):
        chunks = split(trainer_, batch, num_chunks)
        splits.append(
            {
                "rows": stage.last_draw["rows"].tolist(),
                "weights": stage.last_draw["weights"].tolist(),
                "local_rows": stage.last_draw["local_rows"].tolist(),
                "own_rows": strip(batch["completion_ids"], batch["completion_mask"]),
                "trained_rows": [t for c in chunks for t in strip(c["completion_ids"], c["completion_mask"])],
                "chunk_rows": [int(c["completion_ids"].shape[0]) for c in chunks],
            }
        )
        return chunks

    stage.split = recording_split
    trainer.train()
    logs = [h for h in trainer.state.log_history if "cost/policy_tokens" in h and "loss" in h]
    for record, log in zip(splits, logs, strict=True):
        record["metrics"] = {k: v for k, v in log.items() if k.startswith("cost/")}
    checksum = float(sum(p.detach().double().sum() for p in trainer.model.parameters()))
    rank = trainer.accelerator.process_index
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"world": trainer.accelerator.num_processes, "splits": splits, "param_checksum": checksum}, f)


if __name__ == "__main__":
    _two_process_worker(sys.argv[1], sys.argv[2])
