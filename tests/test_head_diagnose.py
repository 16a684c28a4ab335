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
    assert {"majority", "weighted", "deepconf_weighted", "deepconf_filtered"} <= set(saved["vote"])
    assert saved["vote"]["keep"] == diagnose.VOTE_KEEP
    assert 0 <= saved["vote"]["headroom_prompts"] <= saved["vote"]["prompts"] == 8
    slips = saved["slips"]
    assert 0.0 <= slips["confident_slip"] <= slips["visible_slip"] <= 1.0 and slips["confident_threshold"] == 0.5
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


def test_first_slip_line_spans_the_tokens_of_the_first_wrong_line():
    from efficient_rlvr.pruning.diagnose import first_slip_line
    from efficient_rlvr.run import load_tokenizer_for, resolve_model_path

    tokenizer = load_tokenizer_for(resolve_model_path("embedded"))

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    right, wrong = "3+4=7\n", "7-9=-3\n"
    span = first_slip_line(tokenizer, ids(right + wrong + "Answer: -3"))
    assert span is not None
    start, end = span
    assert start == len(ids(right)) and tokenizer.decode(ids(right + wrong + "Answer: -3")[start:end]) == wrong
    assert first_slip_line(tokenizer, ids("3+4=7\n7-9=-2\nAnswer: -2")) is None
    # an unfinished last line counts as finished at the last token
    assert first_slip_line(tokenizer, ids("3+4=8")) == (0, len(ids("3+4=8")))


def test_slip_breakdown_separates_confident_slips():
    """Two prompts of 4 rollouts: confidence ranks the unconfident slips below the correct rollouts (AUC 1) but the
    confident slip above them (AUC 0); rollouts of unmixed prompts are left out."""
    import math

    from efficient_rlvr.pruning.diagnose import slip_breakdown

    nan = math.nan
    data = {
        "labels": torch.tensor([1, 1, 0, 0, 1, 0, 0, 0, 0, 0]).bool(),
        "groups": torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2]),
        # least likely token on the first wrong line: p 0.9 (confident), 0.1, 0.2, none visible; prompt 2 unmixed
        "slip_line_logprob": torch.tensor(
            [nan, nan, math.log(0.9), math.log(0.1), nan, math.log(0.2), nan, nan, math.log(0.9), math.log(0.9)]
        ),
    }
    scores = torch.tensor([0.5, 0.6, 0.9, 0.1, 0.5, 0.2, 0.3, 0.4, 0.0, 0.0])
    out = slip_breakdown(data, scores, torch.ones(10, dtype=torch.bool))
    assert out["wrong_rollouts"] == 5 and out["visible_slip"] == pytest.approx(3 / 5)
    assert out["confident_slip"] == pytest.approx(1 / 5)
    assert out["within_group_auc_vs_confident_slips"] == pytest.approx(0.0)
    assert out["within_group_auc_vs_other_slips"] == pytest.approx(1.0)


def test_vote_headroom_counts_the_prompts_a_weighting_could_win():
    """Prompt 0: the majority "7" is wrong, the right "5" is the most confident candidate; prompt 1: majority right;
    prompt 2: majority wrong, the right candidate less confident than the majority's best."""
    from efficient_rlvr.pruning.diagnose import vote_accuracy

    texts = ["Answer: 7", "Answer: 7", "Answer: 5"] + ["Answer: 1", "Answer: 1", "Answer: 2"]
    texts += ["Answer: 3", "Answer: 3", "Answer: 4"]
    data = {"texts": texts, "labels": torch.tensor([0, 0, 1, 1, 1, 0, 0, 0, 1]).bool()}
    scores = torch.tensor([0.2, 0.3, 0.9, 0.5, 0.5, 0.5, 0.8, 0.1, 0.4])
    out = vote_accuracy(data, scores, torch.ones(9, dtype=torch.bool), num_samples=3)
    assert out["prompts"] == 3 and out["majority"] == pytest.approx(1 / 3)
    assert out["headroom_prompts"] == 2 and out["right_above_majority"] == pytest.approx(0.5)
