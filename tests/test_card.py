"""The model card (efficient_rlvr.card): TRL 1.16.0's GRPO card plus the "Efficiency methods" section.

The Hub is unreachable here, so cards are generated locally with `trainer.create_model_card()` (what `push_to_hub`
and TRL's `_save_checkpoint` call) and read back from `output_dir/README.md`.
"""

from __future__ import annotations

import os

from grpo_args import cpu_grpo_kwargs, verifier_trainer
from huggingface_hub import ModelCard

from efficient_rlvr import EfficientGRPOConfig
from efficient_rlvr.card import (
    METHODS,
    SECTION_TITLE,
    collect_metrics,
    efficiency_section,
    format_count,
    insert_section,
    method_tags,
    non_default_fields,
)

# TRL 1.16.0's template text that must survive (lm_model_card.md + GRPOTrainer._paper).
TRL_CONTENT = (
    "It has been trained using [TRL](https://github.com/huggingface/trl).",
    "## Quick start",
    "## Training procedure",
    "This model was trained with EfficientGRPO, a method introduced in [DeepSeekMath",
    "https://huggingface.co/papers/2402.03300",
    "### Framework versions",
    "- TRL: 1.16.0",
    "Cite EfficientGRPO as:",
    "@article{shao2024deepseekmath,",
    "Cite TRL as:",
    "@software{vonwerra2020trl,",
)


def _config(tmp_path, **overrides) -> EfficientGRPOConfig:
    return EfficientGRPOConfig(**cpu_grpo_kwargs(str(tmp_path / "out"), num_generations=4, **overrides))


def test_section_lists_methods_papers_changed_fields_and_savings(tmp_path):
    config = _config(tmp_path, selection_history=True, hes_selection=True, hes_keep_fraction=0.25, cost_alpha=0.1)
    metrics = {
        "selection/rollouts_saved_total": 48.0,  # 12 prompts skipped x G = 4
        "selection/kept": 8.0,  # not cumulative: only in the metric stream, not in the counters table
        "hes/total_rollouts_dropped": 10.0,
        "hes/total_tokens_dropped": 250.4,
        "hes/total_scoring_seconds": 1.26,
        "cost/tokens_saved_cumulative": 99.0,  # cost-aware sampling is off: no savings row for it
        "train_runtime": 12.34,
    }
    section = efficiency_section(config, metrics)
    assert section.startswith(SECTION_TITLE + "\n")
    # Methods in pipeline order, with their switches and papers (HIVE + GRESO for the history sampler).
    assert section.index("`selection_history=True`") < section.index("`hes_selection=True`")
    assert "`cost_aware_sampling=True`" not in section
    for arxiv_id in ("2603.25184", "2506.02177", "2605.22389"):
        assert f"(https://huggingface.co/papers/{arxiv_id}) (arXiv:{arxiv_id})" in section
    assert "2604.28020" not in section  # Cost-Aware Learning: method off
    # Non-default efficiency fields with their defaults; switches and default-valued fields are not listed.
    assert "| `hes_keep_fraction` | `0.25` | `0.5` |" in section
    assert "| `cost_alpha` | `0.1` | `0` |" in section
    assert "`hes_quantile`" not in section and "| `selection_history` |" not in section
    assert "(`num_generations`): 4." in section
    # Savings (rollouts | tokens) and added work (rollouts | seconds), rounded as documented.
    assert "| selection_history | prompts skipped before generation" in section
    assert "| 48 |  |" in section
    assert "| hes_selection | rollouts and tokens dropped from the loss | 10 | 250 |" in section
    assert "| hes_selection | HES scoring pass |  | 1.3 |" in section
    assert "(`train_runtime`): 12.3 s." in section
    # The counters table holds the cumulative keys only.
    assert "| `hes/total_tokens_dropped` | 250.4 |" in section
    assert "| `selection/rollouts_saved_total` | 48 |" in section
    assert "`selection/kept`" not in section


def test_entropy_filter_alone_reports_skipped_prompts(tmp_path):
    section = efficiency_section(_config(tmp_path, selection_entropy=True), {"selection/rollouts_saved_total": 64.0})
    assert "| selection_entropy | prompts skipped before generation (prompts x num_generations rollouts) | 64 |" in (
        section
    )


def test_zero_advantage_skip_savings(tmp_path):
    config = _config(tmp_path, skip_zero_advantage=True)
    metrics = {"cost/zero_adv_rows_skipped_total": 40.0, "cost/zero_adv_tokens_skipped_total": 1033.0}
    section = efficiency_section(config, metrics)
    assert "`skip_zero_advantage=True` | [Cost-Aware Learning](https://huggingface.co/papers/2604.28020)" in section
    assert (
        "| skip_zero_advantage | zero-advantage rollouts and their tokens skipped before the loss | 40 | 1033 |"
        in (section)
    )


def test_adaptive_budget_saving_is_fixed_minus_used(tmp_path):
    config = _config(tmp_path, budget_adaptive=True)  # k_init 4 = num_generations, k_max 16
    metrics = {
        "budget/total_rollouts": 103.0,
        "budget/total_rollouts_fixed": 256.0,
        "budget/total_extra_rollouts": 39.0,
    }
    section = efficiency_section(config, metrics)
    assert (
        "| budget_adaptive | rollouts not generated compared with a fixed group size of budget_k_max | 153 |"
        in section
    )
    assert "| budget_adaptive | extra rollouts of 'rollout more' rounds | 39 |  |" in section
    assert "| `budget/total_rollouts_fixed` | 256 |" in section


def test_non_default_fields_and_tags(tmp_path):
    config = _config(tmp_path, pruning_l_detect=12, vllm_dtype="float32", selection_entropy=True)
    assert non_default_fields(config) == {"vllm_dtype": ("float32", "auto"), "pruning_l_detect": (12, 512)}
    assert method_tags(["selection_history", "selection_entropy", "pruning"]) == [
        "arxiv:2603.25184",
        "arxiv:2506.02177",
        "arxiv:2603.24840",
    ]
    # The card knows every switch of EfficientGRPOConfig.methods (one at a time: some do not combine).
    for name in METHODS:
        assert _config(tmp_path, **{name: True}, **(_vllm() if name == "pruning" else {})).methods == [name]


def _vllm() -> dict:
    return {"use_vllm": True, "vllm_mode": "colocate"}  # pruning's requirement; the config is never run here


def test_no_method_no_section(tmp_path):
    config = _config(tmp_path, cost_alpha=0.5)  # a changed field alone does not make a section
    assert efficiency_section(config, {"selection/rollouts_saved_total": 3.0}) == ""
    card = "# Card\n\n### Framework versions\n\n- TRL: x\n"
    assert insert_section(card, "") == card
    assert insert_section(card, "## X\n") == "# Card\n\n## X\n\n### Framework versions\n\n- TRL: x\n"
    assert insert_section("# Card\n", "## X\n") == "# Card\n\n## X\n"


ON = {
    "selection_history": True,
    "selection_entropy": True,
    "selection_entropy_keep_ratio": 0.75,
    "hes_selection": True,
    "hes_keep_fraction": 0.75,
    "cost_aware_sampling": True,
    "cost_alpha": 0.2,
}


def test_trained_card_extends_trls_card(base_model_dir, chain_sum_splits, grpo_kwargs):
    train_ds, _ = chain_sum_splits
    kwargs = grpo_kwargs(max_steps=2, save_strategy="steps", save_steps=2, learning_rate=2e-4, **ON)
    trainer = verifier_trainer(base_model_dir, train_ds, kwargs)
    trainer.train()
    path = os.path.join(kwargs["output_dir"], "README.md")
    # TRL's _save_checkpoint already wrote a card through our override.
    assert SECTION_TITLE in open(path, encoding="utf-8").read()

    trainer.create_model_card(model_name="tiny-efficient", dataset_name="chain_sum", tags=["my-tag"])
    text = open(path, encoding="utf-8").read()
    for piece in TRL_CONTENT:
        assert piece in text, piece
    assert "# Model Card for tiny-efficient" in text
    # Our section sits inside "Training procedure", before TRL's framework versions.
    assert text.index("## Training procedure") < text.index(SECTION_TITLE) < text.index("### Framework versions")
    for method in ("selection_history", "selection_entropy", "hes_selection", "cost_aware_sampling"):
        assert f"`{method}=True`" in text
    for arxiv_id in ("2603.25184", "2506.02177", "2605.22389", "2604.28020"):
        assert f"(arXiv:{arxiv_id})" in text
    assert "| `selection_entropy_keep_ratio` | `0.75` | `0.5` |" in text
    assert "| `hes_keep_fraction` | `0.75` | `0.5` |" in text
    assert "| `cost_alpha` | `0.2` | `0` |" in text
    # Savings figures are the components' cumulative metrics at the end of the run.
    metrics = collect_metrics(trainer)
    assert metrics["selection/rollouts_saved_total"] > 0  # keep ratio 0.75 skips a quarter of the candidates
    assert metrics["hes/total_rollouts_dropped"] > 0
    saved = format_count(metrics["selection/rollouts_saved_total"])
    assert (
        f"| selection_history + selection_entropy | prompts skipped before generation (prompts x num_generations "
        f"rollouts) | {saved} |" in (text)
    )
    hes = (format_count(metrics["hes/total_rollouts_dropped"]), format_count(metrics["hes/total_tokens_dropped"]))
    assert f"| hes_selection | rollouts and tokens dropped from the loss | {hes[0]} | {hes[1]} |" in text
    cost = (format_count(metrics["cost/rows_saved_cumulative"]), format_count(metrics["cost/tokens_saved_cumulative"]))
    assert f"not sent through the policy forward/backward | {cost[0]} | {cost[1]} |" in text
    assert (
        f"| `selection/prompts_skipped_total` | {format_count(metrics['selection/prompts_skipped_total'])} |" in text
    )
    assert "(`train_runtime`): " in text
    # Metadata: TRL's tags, ours and the papers' arXiv tags.
    tags = ModelCard.load(path).data.tags
    for tag in ("generated_from_trainer", "trl", "grpo", "efficient-rlvr", "my-tag", "arxiv:2604.28020"):
        assert tag in tags


def test_card_with_every_method_off_is_trls(tiny_model_dir, chain_sum_splits, grpo_kwargs):
    train_ds, _ = chain_sum_splits
    kwargs = grpo_kwargs(cost_alpha=0.5)
    trainer = verifier_trainer(tiny_model_dir, train_ds, kwargs)
    assert trainer.args.methods == []
    trainer.create_model_card(model_name="plain")
    text = open(os.path.join(kwargs["output_dir"], "README.md"), encoding="utf-8").read()
    for piece in TRL_CONTENT:
        assert piece in text, piece
    assert SECTION_TITLE not in text and "(arXiv:" not in text
    assert not any(tag.startswith("arxiv:") for tag in ModelCard.load(kwargs["output_dir"] + "/README.md").data.tags)
