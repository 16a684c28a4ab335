"""Every method at once on two CPU processes (`accelerate launch`, gloo, one colocated vLLM engine per process).

What the methods promise under data parallelism: every decision that shapes the global batch is made identically on
both ranks (prompt selection, the gathered pruned flags, the quality head's weights, the V0.5 budget, the HES keep
mask, the cost-aware draws); each rank rolls out and prunes its own rows; no rank trains on a rollout that was pruned
or dropped; both ranks count the same global completion tokens and end with identical parameters.
"""

import json
import os

import pytest
from grpo_args import launch_two_cpu_processes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_two_processes_agree_on_every_decision_with_all_methods_on(base_model_dir, tmp_path):
    script = os.path.join(REPO, "tests", "_full_stack_two_process.py")
    result = launch_two_cpu_processes(script, tmp_path, base_model_dir, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    steps0, steps1 = ranks[0]["steps"], ranks[1]["steps"]
    assert len(steps0) == len(steps1) == 4
    pruned_somewhere = False
    for s0, s1 in zip(steps0, steps1, strict=True):
        # HIVE: the same 8 global prompts; rank r rolls out prompts [4r, 4r + 4), G = 4 times each.
        assert s0["global_keys"] == s1["global_keys"] and len(s0["global_keys"]) == 8
        assert s0["local_keys"] == [k for k in s0["global_keys"][:4] for _ in range(4)]
        assert s1["local_keys"] == [k for k in s0["global_keys"][4:] for _ in range(4)]
        # ARRoL: each rank prunes its own rows; both see the same global flags, head and calibrator.
        assert s0["pruned_global"] == s1["pruned_global"]
        assert s0["pruned_global"] == s0["pruned_local"] + s1["pruned_local"]
        assert s0["head_checksum"] == s1["head_checksum"]
        assert s0["calibrator_ready"] == s1["calibrator_ready"]
        pruned_somewhere |= any(s0["pruned_global"])
        # V0.5, HES, cost-aware: global decisions identical on both ranks.
        assert s0["budget_counts"] == s1["budget_counts"]
        assert s0["hes_keep"] == s1["hes_keep"]
        assert s0["cost_draws"] == s1["cost_draws"]
        # Nobody trains on a pruned or dropped rollout; same global token count; equal shapes on both ranks.
        assert s0["trained_rewards_known"] and s1["trained_rewards_known"]
        assert s0["num_items_in_batch"] == s1["num_items_in_batch"]
        assert s0["local_rows"] == s1["local_rows"]
    assert pruned_somewhere, "after the 1-step cold start some rollouts must be pruned"
    assert ranks[0]["params"] == ranks[1]["params"]
