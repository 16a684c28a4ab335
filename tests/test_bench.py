"""The benchmark's arithmetic: flag resolution, time-to-target, medians over seeds, the table and the README block.

The training runs themselves are `make bench`'s job (minutes per run); here the figures are computed from
hand-made run summaries whose answers are known.
"""

import pytest

from efficient_rlvr import bench

RECIPE = "examples/recipes/default.yaml"


def test_resolve_flags_scales_the_batch_and_expands_the_preset():
    flags = bench.resolve_flags(RECIPE, bench.SETTINGS["generation_heavy"] + bench.VARIANTS["cost_aware"])
    # 128 x 0.25 = 32 rows per device; 70% of 32 x 2 accumulation steps = 45 draws (the scaled batch)
    assert flags[:2] == ["--per_device_train_batch_size", "32"]
    assert flags[flags.index("--cost_num_draws") + 1] == "45"
    v05 = bench.resolve_flags(RECIPE, bench.SETTINGS["generation_heavy"] + bench.VARIANTS["v05"])
    sizes = [v05[i + 1] for i, f in enumerate(v05) if f == "--per_device_train_batch_size"]
    assert sizes == ["32", "16"]  # the variant's half applies to the setting's quarter; the last flag wins
    full = bench.resolve_flags(RECIPE, bench.VARIANTS["efficient"])
    pairs = dict(zip(full[::2], full[1::2], strict=True))
    assert pairs["--pruning"] == "true" and pairs["--selection_history"] == "true"
    assert "--model_name_or_path" not in pairs  # keys equal to the recipe's are not repeated


def test_same_time_variant_scales_the_step_budget():
    flags = bench.resolve_flags(RECIPE, bench.VARIANTS["efficient_same_time"]) + ["--max_steps", "25"]
    scaled = bench._scale_steps(flags)
    assert "--max_steps_scale" not in scaled
    assert scaled[scaled.index("--max_steps") + 1] == "45"
    assert bench._scale_steps(["--max_steps", "25"]) == ["--max_steps", "25"]


@pytest.mark.parametrize(
    "curve,target,expected",
    [
        ([(0, 0.30), (10, 0.40), (20, 0.50)], 0.45, 15.0),  # interpolated between 10 s and 20 s
        ([(0, 0.50), (10, 0.40)], 0.45, 0.0),  # already there before training
        ([(0, 0.30), (10, 0.40)], 0.45, None),  # never reached
        ([(0, 0.30), (10, 0.45)], 0.45, 10.0),
    ],
)
def test_first_crossing(curve, target, expected):
    assert bench.first_crossing(curve, target) == expected


def test_median_time_counts_unreached_runs_as_slowest():
    assert bench._median_time([10.0, None, 30.0]) == 30.0
    assert bench._median_time([None, None, 30.0]) is None
    assert bench._median_time([10.0, 20.0]) == 15.0


def _run(variant, seed, final, curve, seconds=100.0, rollouts=1000):
    records = [
        {"wall_time": t, "step": i, "reward": 0.5, "rollouts/cumulative": rollouts * t / seconds}
        for i, t in enumerate([seconds / 4, seconds / 2, seconds])
    ]
    return {
        "setting": "default",
        "variant": variant,
        "seed": seed,
        "steps": 3,
        "train_seconds": seconds,
        "seconds_per_step": seconds / 3,
        "phase_seconds": {"generation": 30.0, "logprobs": 10.0, "update": 60.0},
        "rollouts_generated": rollouts,
        "tokens_generated": 10 * rollouts,
        "loss_tokens": 5 * rollouts,
        "informative_rollouts": rollouts / 2,
        "eval_before": {"accuracy": curve[0][1]},
        "eval_after": {"accuracy": final},
        "eval_curve": [(t, i, a) for i, (t, a) in enumerate(curve)],
        "records": records,
    }


def test_aggregate_speedup_and_rollouts_against_vanilla():
    runs = []
    for seed, final in enumerate([0.44, 0.45, 0.46]):
        runs.append(_run("trl", seed, final, [(0, 0.35), (50, 0.40), (100, final)]))
        # twice as fast: reaches 0.45 at 50 s with half the rollouts per second
        runs.append(_run("fast", seed, 0.50, [(0, 0.35), (25, 0.40), (50, 0.45), (100, 0.50)], rollouts=500))
    results = [bench.summarize(r) for r in runs]
    rows = {r["variant"]: r for r in bench.aggregate(results)}
    assert rows["trl"]["target_accuracy"] == pytest.approx(0.45)
    # vanilla reaches 0.45 at 100 s for seeds 1-2 (not at all for seed 0): median 100 s
    assert rows["trl"]["time_to_target"] == pytest.approx(100.0)
    assert rows["fast"]["time_to_target"] == pytest.approx(50.0)
    assert rows["fast"]["speedup"] == pytest.approx(2.0)
    assert rows["fast"]["rollouts_vs_vanilla"] == pytest.approx(0.5)
    # vanilla's rollouts to 0.45: seed 1 at 100 s (1000), seed 2 at 91.7 s (917; 0.46 final), seed 0 never
    vanilla_rollouts = (1000 + 1000 * (50 + 50 * 0.05 / 0.06) / 100) / 2
    assert rows["fast"]["rollouts_to_target_vs_vanilla"] == pytest.approx(250 / vanilla_rollouts)
    assert rows["fast"]["final_accuracy"] == pytest.approx(0.50)
    assert rows["fast"]["informative_per_second"] == pytest.approx(2.5)
    assert rows["fast"]["loss_tokens_per_informative"] == pytest.approx(10.0)
    low, high = rows["fast"]["speedup_interval90"]
    assert low <= 2.0 <= high
    table = bench.markdown_table(list(rows.values()), [0, 1, 2], 3)
    assert "| default | fast | 50 s | 2.00x" in table
    assert table.count("\n| default |") == 2


def test_update_readme_replaces_only_the_block(tmp_path):
    path = tmp_path / "README.md"
    path.write_text("intro\n<!-- bench:start -->\nold\n<!-- bench:end -->\noutro\n")
    bench.update_readme(str(path), "| new |\n")
    assert path.read_text() == "intro\n<!-- bench:start -->\n| new |\n<!-- bench:end -->\noutro\n"
    (tmp_path / "other.md").write_text("no block")
    with pytest.raises(ValueError, match="bench:start"):
        bench.update_readme(str(tmp_path / "other.md"), "x")


def test_unknown_variant_is_refused_before_any_run():
    with pytest.raises(SystemExit, match="unknown"):
        bench.main(["--variants", "trl,warp_speed", "--output_dir", "/nonexistent"])
