"""The quality-head diagnostic (efficient_rlvr.pruning.diagnose) and within-group AUC: difficulty is not correctness."""

import json

import pytest
import torch

from efficient_rlvr.pruning import roc_auc, within_group_auc


def test_a_difficulty_only_score_has_high_overall_but_chance_within_group_auc():
    """Scores equal to each prompt's pass rate rank prompts, not rollouts: overall AUC high, within-group 0.5."""
    gen = torch.Generator().manual_seed(0)
    rates = torch.rand(200, 1, generator=gen)
    labels = torch.rand(200, 8, generator=gen) < rates  # [prompts, G]
    groups = torch.arange(200).repeat_interleave(8)
    difficulty = rates.expand(200, 8).reshape(-1)
    assert roc_auc(difficulty, labels.reshape(-1)) > 0.75
    mean, se, n, per_group = within_group_auc(difficulty, labels.reshape(-1), groups)
    assert mean == pytest.approx(0.5) and n == len(per_group) > 100 and se == pytest.approx(0.0)
    # a score that knows correctness ranks within groups too
    oracle = labels.reshape(-1).float() + 0.1 * torch.rand(1600, generator=gen)
    assert within_group_auc(oracle, labels.reshape(-1), groups)[0] == pytest.approx(1.0)
    assert within_group_auc(torch.zeros(3), torch.tensor([1, 1, 1]), [0, 0, 1])[2] == 0  # no mixed group
    with pytest.raises(ValueError, match="same length"):
        within_group_auc(torch.zeros(3), torch.zeros(3), [0, 1])


def test_diagnose_cli_reports_every_scorer_at_both_positions(tmp_path):
    from efficient_rlvr.pruning import diagnose

    out = tmp_path / "head.json"
    result = diagnose.main(
        ["--model", "embedded", "--eval_size", "16", "--num_samples", "4", "--l_detect", "8", "--output", str(out)]
    )
    saved = json.loads(out.read_text())
    assert saved["within_group_auc"] == result["within_group_auc"]
    for scorer in ("head", "deepconf", "random"):
        assert set(saved["within_group_auc"][scorer]) == {"l_detect", "last_token"}
    assert {"majority", "weighted", "deepconf_weighted"} <= set(saved["vote"])
    scorers = {row["scorer"] for row in saved["table"]}
    assert scorers == {
        "bce_final",
        "rank_final",
        "bce_rich",
        "rank_rich",
        "deepconf_mean",
        "deepconf_lowest",
        "random",
        "slip_oracle",
    }
    assert len(saved["table"]) == 2 * len(scorers)
    assert saved["measured_rollouts"] == 8 * 4  # the second half of the prompts
    for row in saved["table"]:
        assert row["mixed_prompts"] <= 8 and set(row["within_group_auc_by_terms"]) <= {"2", "3", "4", "5"}


def test_first_slip_detector_reads_running_sums():
    from efficient_rlvr.pruning.diagnose import first_slip_free

    assert first_slip_free("3+4=7\n7-9=-2\nAnswer: -2")
    assert not first_slip_free("3+4=8\n8-9=-1\n")  # wrong arithmetic
    assert not first_slip_free("3+4=7\n6-9=-3\n")  # does not continue the previous result
    assert first_slip_free("3+4=7\n7-9=-")  # the last line is still being written
