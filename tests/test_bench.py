"""The benchmark's arithmetic: flag resolution, smoothing and curve fits, levels, paired speedups, bootstrap intervals, the GPU
projection, the resolution check, the tables and the README block.

The training runs themselves are `make bench`'s job (minutes per run); here the figures are computed from
hand-made run summaries whose answers are known.
"""

import json
import math

import pytest

from efficient_rlvr import bench

RECIPE = "examples/recipes/default.yaml"


def test_resolve_flags_expands_fractions_and_the_preset():
    flags = bench.resolve_flags(RECIPE, bench.VARIANTS["cost_aware"])
    # 70% of 128 rows x 2 accumulation steps = 179 draws
    assert flags[flags.index("--cost_num_draws") + 1] == "179"
    v05 = bench.resolve_flags(RECIPE, bench.VARIANTS["v05"])
    assert v05[v05.index("--per_device_train_batch_size") + 1] == "64"
    full = bench.resolve_flags(RECIPE, bench.VARIANTS["efficient"])
    pairs = dict(zip(full[::2], full[1::2], strict=True))
    assert pairs["--skip_zero_advantage"] == "true" and pairs["--selection_history"] == "true"
    assert pairs["--old_logprobs_from_loss"] == "true"
    assert "--pruning" not in pairs
    assert "--model_name_or_path" not in pairs  # keys equal to the recipe's are not repeated


def test_faster_variants_run_more_steps_to_cover_vanillas_wall_clock():
    _, cmd = bench.run_command(RECIPE, "efficient", 3, "/tmp/x", ["--max_steps", "150"])
    assert "--max_steps_scale" not in cmd
    assert cmd[cmd.index("--max_steps") + 1] == "375"  # a cap: the time limit below ends it
    assert "--max_train_seconds" not in cmd  # vanilla's run of the seed has not finished
    assert cmd[cmd.index("--seed") + 1] == "3"
    _, vanilla = bench.run_command(RECIPE, "trl", 3, "/tmp/x", ["--max_steps", "150"])
    assert vanilla[vanilla.index("--max_steps") + 1] == "150"


def test_faster_variants_stop_at_vanillas_wall_clock_once_it_is_known(tmp_path):
    (tmp_path / "trl-seed3").mkdir()
    (tmp_path / "trl-seed3" / "summary.json").write_text(json.dumps({"train_seconds": 700.0}))
    _, cmd = bench.run_command(RECIPE, "skip", 3, str(tmp_path), ["--max_steps", "150"])
    assert cmd[cmd.index("--max_train_seconds") + 1] == str(round(700.0 * bench.TIME_MARGIN))
    _, other_seed = bench.run_command(RECIPE, "skip", 4, str(tmp_path), ["--max_steps", "150"])
    assert "--max_train_seconds" not in other_seed
    _, vanilla = bench.run_command(RECIPE, "trl", 3, str(tmp_path), ["--max_steps", "150"])
    assert "--max_train_seconds" not in vanilla


def _clock():
    """A MetricsRecorder whose training clock reads `.now`."""
    from efficient_rlvr.reporting import MetricsRecorder

    class Clock(MetricsRecorder):
        now = 0.0

        def training_seconds(self):
            return self.now

    return Clock("/tmp/unused")


def _stops_at(stop, recorder, now: float) -> bool:
    """Whether `stop` ends training after a step that finishes at training second `now`."""
    from transformers import TrainerControl, TrainerState

    recorder.now = now
    control = TrainerControl()
    stop.on_step_end(None, TrainerState(), control)
    return control.should_training_stop


def test_stop_after_seconds_ends_training_at_the_step_that_passes_the_clock():
    from efficient_rlvr.reporting import StopAfterSeconds

    recorder = _clock()
    stop = StopAfterSeconds(recorder, 10.0)
    assert not _stops_at(stop, recorder, 9.9) and _stops_at(stop, recorder, 10.0)
    with pytest.raises(ValueError, match="max_train_seconds"):
        StopAfterSeconds(recorder, 0.0)


def test_plan_runs_whole_seeds_first_and_method_rows_on_their_seeds():
    plan = bench.plan_runs([0, 1], ["trl", "skip"], ["greso", "skip"], [0])
    assert plan == [[("trl", 0)], [("skip", 0)], [("greso", 0)], [("trl", 1)], [("skip", 1)]]


def test_plan_runs_beside_pairs_every_variant_with_its_own_vanilla_run():
    units = bench.plan_runs([0, 1, 2], ["trl", "skip"], ["greso"], [0], beside=True)
    partner = bench.partner_of("skip")
    assert units == [
        [("trl", 0), ("trl", 1)],  # vanilla's own runs: two seeds side by side
        [("trl", 2)],
        [(partner, 0), ("skip", 0)],
        [(bench.partner_of("greso"), 0), ("greso", 0)],
        [(partner, 1), ("skip", 1)],
        [(partner, 2), ("skip", 2)],
    ]
    assert bench.base_variant(partner) == "trl" and bench.base_variant("skip") == "skip"


def test_beside_a_variant_stops_after_its_partner_and_the_partner_trains_vanilla(tmp_path):
    (tmp_path / "trl-seed3").mkdir()
    (tmp_path / "trl-seed3" / "summary.json").write_text(json.dumps({"train_seconds": 700.0}))
    _, cmd = bench.run_command(RECIPE, "skip", 3, str(tmp_path), ["--max_steps", "150"], beside=True)
    assert "--max_train_seconds" not in cmd  # not the `trl` run's clock, which shared the machine with another run
    limit = cmd[cmd.index("--stop_after_run") + 1]
    assert limit == str(tmp_path / f"{bench.partner_of('skip')}-seed3" / "summary.json")
    assert cmd[cmd.index("--stop_after_run_margin") + 1] == str(bench.TIME_MARGIN)
    partner_dir, partner = bench.run_command(RECIPE, bench.partner_of("skip"), 3, str(tmp_path), [], beside=True)
    _, vanilla = bench.run_command(RECIPE, "trl", 3, str(tmp_path), [])
    assert partner_dir.endswith("trl-beside-skip-seed3") and "--stop_after_run" not in partner
    assert partner[partner.index("--seed") :] == vanilla[vanilla.index("--seed") :]  # the same training job


def test_execute_beside_starts_a_units_runs_together_and_units_one_after_the_other():
    import threading

    units = bench.plan_runs([0, 1], ["trl", "skip"], [], [], beside=True)
    barrier = threading.Barrier(2, timeout=10)
    active, seen = [], []
    lock = threading.Lock()

    def run(index, variant, seed, unit):
        with lock:
            assert all(u is unit for u in active), "a run started before the previous unit had finished"
            active.append(unit)
        if len(unit) == 2:
            barrier.wait()  # raises BrokenBarrierError unless its partner runs at the same time
        with lock:
            active.remove(unit)
            seen.append((index, variant, seed))
        return {"variant": variant, "seed": seed}

    out = bench.execute(units, 2, True, run)
    assert [(r["variant"], r["seed"]) for r in out] == [run_ for unit in units for run_ in unit]
    assert sorted(i for i, _, _ in seen) == list(range(6))


def test_stop_after_another_run_waits_for_its_summary(tmp_path):
    from efficient_rlvr.reporting import StopAfterSeconds, after_run

    recorder = _clock()
    summary = tmp_path / "summary.json"
    stop = StopAfterSeconds(recorder, after_run(str(summary), 1.15))
    assert not _stops_at(stop, recorder, 1e6)  # the other run has not finished: no limit yet
    summary.write_text(json.dumps({"train_seconds": 100.0}))
    assert not _stops_at(stop, recorder, 114.0) and _stops_at(stop, recorder, 115.0)
    with pytest.raises(ValueError, match="stop_after_run_margin"):
        after_run(str(summary), 0.0)


def test_bad_stop_after_run_margin_is_refused_before_any_model_work():
    from efficient_rlvr.run import RunArguments, train

    with pytest.raises(ValueError, match="stop_after_run_margin"):
        train(RunArguments(stop_after_run="x/summary.json", stop_after_run_margin=0.0), None)


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


def test_value_at_interpolates_and_is_unknown_past_the_end():
    curve = [(0, 0.3), (10, 0.5), (20, 0.4)]
    assert bench.value_at(curve, 5) == pytest.approx(0.4)
    assert bench.value_at(curve, 15) == pytest.approx(0.45)
    assert bench.value_at(curve, 20) == pytest.approx(0.4)
    assert bench.value_at(curve, 21) is None


def test_smoothing_is_a_centred_window_that_keeps_the_starting_point():
    assert bench.smooth([0.3, 0.4, 0.6, 0.5, 0.7], 3) == pytest.approx([0.3, 0.5, 0.5, 0.6, 0.6])
    assert bench.smooth([0.3, 0.4, 0.6], 1) == [0.3, 0.4, 0.6]
    # the window never reaches back to the pre-training point
    assert bench.smooth([0.0, 1.0, 1.0], 3)[1] == pytest.approx(1.0)


def test_duplicate_final_evaluation_is_dropped():
    run = {"eval_curve": [(0.0, 0, 0.3), (10.0, 10, 0.4), (20.0, 20, 0.5), (20.1, 20, 0.5)]}
    assert bench.held_out_points(run) == [(0.0, 0, 0.3), (10.0, 10, 0.4), (20.0, 20, 0.5)]


def test_bootstrap_interval_brackets_the_median_and_is_degenerate_for_equal_values():
    values = [1.0, 1.2, 1.4, 1.6, 1.8]
    low, high = bench.bootstrap_interval(values)
    assert low <= 1.4 <= high and low >= 1.0 and high <= 1.8
    assert bench.bootstrap_interval([2.0, 2.0, 2.0]) == [2.0, 2.0]
    assert bench.bootstrap_interval([]) is None
    assert bench.bootstrap_interval([1.5]) is None  # one seed: no interval


def test_speedup_edge_cases():
    assert bench.speedup(100.0, 50.0) == 2.0
    assert bench.speedup(100.0, None) == 0.0  # the variant never got there
    assert bench.speedup(100.0, 0.0) == math.inf  # it started there
    assert bench.speedup(None, 10.0) is None


def _run(variant, seed, accuracies, seconds=100.0, rollouts=1000, work=None, steps=10):
    """A run evaluated at equal intervals over `seconds` and `steps`, with `accuracies` as its held-out curve."""
    n = len(accuracies) - 1
    curve = [(seconds * i / n, steps * i // n, a) for i, a in enumerate(accuracies)]
    records = [
        {
            "wall_time": seconds * (i + 1) / steps,
            "step": i + 1,
            "reward": 0.5,
            "rollouts/cumulative": rollouts * (i + 1),
        }
        for i in range(steps)
    ]
    return {
        "variant": variant,
        "seed": seed,
        "steps": steps,
        "train_seconds": seconds,
        "seconds_per_step": seconds / steps,
        "phase_seconds": {"generation": 30.0, "logprobs": 10.0, "update": 60.0},
        "work": work
        or {"decode_tokens": 1000.0, "decode_steps": 100.0, "logprob_tokens": 500.0, "update_tokens": 2000.0},
        "rollouts_generated": rollouts * steps,
        "tokens_generated": 10 * rollouts,
        "loss_tokens": 5 * rollouts,
        "informative_rollouts": rollouts / 2,
        "eval_before": {"accuracy": accuracies[0]},
        "eval_after": {"accuracy": accuracies[-1]},
        "eval_curve": curve,
        "records": records,
    }


VANILLA = [0.30, 0.40, 0.50, 0.60, 0.70]  # smoothed: 0.30, 0.45, 0.50, 0.60, 0.65 (gain 0.35)


def test_levels_come_from_vanillas_smoothed_gain():
    levels = bench.levels_of(bench.summarize(_run("trl", 0, VANILLA)))
    assert levels == pytest.approx({0.5: 0.475, 0.75: 0.5625, 1.0: 0.65})


def test_paired_speedup_rollouts_and_accuracy_differences():
    vanilla = bench.summarize(_run("trl", 0, VANILLA))
    # vanilla's curve, then 100 s more: smoothing at 100 s now sees the next point (0.75), so the smoothed curve is
    # 0.60 at 75 s and (0.6 + 0.7 + 0.75) / 3 = 0.6833 at 100 s: it reaches 0.65 at 75 + 25 * 0.05 / 0.0833 = 90 s
    fast = bench.summarize(_run("fast", 0, VANILLA + [0.75, 0.75, 0.75, 0.75], seconds=200.0, steps=20))
    p = bench.paired(fast, vanilla, None)
    assert p["speedup"][1.0] == pytest.approx(100.0 / 90.0)
    assert p["accuracy_diff_equal_time"] == pytest.approx((0.6 + 0.7 + 0.75) / 3 - 0.65)
    assert p["accuracy_diff_equal_steps"] == pytest.approx(
        (0.6 + 0.7 + 0.75) / 3 - 0.65
    )  # step 10 is its 100 s point too
    half = bench.summarize(_run("half", 0, VANILLA, seconds=50.0))
    q = bench.paired(half, vanilla, None)
    assert q["speedup"] == pytest.approx({0.5: 2.0, 0.75: 2.0, 1.0: 2.0})
    assert q["step_time_ratio"] == pytest.approx(2.0)
    assert q["accuracy_diff_equal_steps"] == pytest.approx(0.0)
    assert q["accuracy_diff_equal_time"] is None  # it ended before vanilla's wall-clock
    assert q["rollouts_to_target_vs_vanilla"] == pytest.approx(1.0)  # same rollouts per step, same steps
    never = bench.summarize(_run("never", 0, [0.30, 0.31, 0.32, 0.33, 0.34]))
    assert bench.paired(never, vanilla, None)["speedup"][0.5] == 0.0


def test_rollouts_to_dapos_final_accuracy_and_the_last_50_steps_gain():
    """DAPO on its own terms: rollouts to DAPO's final smoothed accuracy over DAPO's; and is a curve flat yet."""
    vanilla = bench.summarize(_run("trl", 0, VANILLA))
    # smoothed: 0.30, 0.50, 0.55, 0.65, 0.70; its final 0.70 is first reached at its end (100 s, 20,000 rollouts)
    dapo = bench.summarize(_run(bench.DAPO, 0, [0.30, 0.45, 0.55, 0.65, 0.75], rollouts=2000))
    # smoothed ... 0.6833 at 100 s, 0.7333 at 125 s: 0.70 at 108.33 s, i.e. 10,833 rollouts at 1,000 per 10 s
    fast = bench.summarize(_run("fast", 0, VANILLA + [0.75, 0.75, 0.75, 0.75], seconds=200.0, steps=20))
    p = bench.paired(fast, vanilla, dapo)
    assert p["rollouts_to_dapo_final_vs_dapo"] == pytest.approx((100 + 25 / 3) * 100 / 20000)
    assert bench.paired(vanilla, vanilla, dapo)["rollouts_to_dapo_final_vs_dapo"] is None  # never reaches 0.70
    assert bench.paired(fast, vanilla, None)["rollouts_to_dapo_final_vs_dapo"] is None
    # vanilla's smoothed curve over steps 0..10: 0.65 at step 10, and 50 steps back is before the run: unknown
    assert bench.last_gain(vanilla) is None
    assert bench.last_gain(vanilla, steps=5) == pytest.approx(0.65 - 0.50)  # step 5 lies at the 0.50 point


def test_gpu_projection_weights_work_ratios_by_the_published_phase_shares():
    vanilla = bench.summarize(_run("trl", 0, VANILLA))
    half_decode = bench.summarize(
        _run(
            "v",
            0,
            VANILLA,
            work={"decode_tokens": 500.0, "decode_steps": 50.0, "logprob_tokens": 500.0, "update_tokens": 1000.0},
        )
    )
    total = sum(bench.GPU_PHASE_SECONDS.values())
    g, lp, u = (bench.GPU_PHASE_SECONDS[k] / total for k in ("generation", "logprobs", "update"))
    expected = 0.5 * g + 1.0 * lp + 0.5 * u
    assert bench.projected_step_ratio(half_decode, vanilla) == pytest.approx(expected)
    p = bench.paired(half_decode, vanilla, None)
    assert p["projected_speedup"][1.0] == pytest.approx(1.0 / expected)  # same steps to the level
    assert bench.projected_step_ratio(bench.summarize({**_run("old", 0, VANILLA), "work": None}), vanilla) is None


def _record(speedups):
    """Runs where `skip` reaches vanilla's levels `speedups[seed]` times sooner with equally faster steps."""
    runs = []
    for seed, s in enumerate(speedups):
        runs.append(_run("trl", seed, VANILLA))
        runs.append(_run("skip", seed, VANILLA, seconds=100.0 / s))
        runs.append(_run(bench.DAPO, seed, VANILLA, rollouts=2000))
    return [bench.summarize(r) for r in runs]


def test_aggregate_and_resolution_check_pass_when_skip_resolves():
    rows = bench.aggregate(_record([1.3, 1.25, 1.35, 1.3, 1.28]))
    skip = next(r for r in rows if r["variant"] == "skip")
    assert skip["speedup"][1.0]["median"] == pytest.approx(1.3)
    assert skip["rollouts_to_target_vs_dapo"] == pytest.approx(0.5)
    check = bench.resolution_check(rows)
    assert check["passed"] and check["excludes_1"] and check["agrees_with_step_time_ratio"]
    assert check["smallest_resolved_speedup"] == pytest.approx(1.3 / check["interval90"][0])
    table = bench.markdown_table(rows, {"description": "test."}, check)
    assert "| skip | 5 |" in table and "Resolution check (passed)" in table


def test_a_variant_beside_its_partner_is_timed_against_the_partners_clock():
    """Vanilla's `trl` run of the seed took 100 s beside another heavy run; beside the light variant, the same job
    (the same curve) took 70 s. The variant's 50 s run is 1.4x faster than its partner, not 2x."""
    runs = [
        _run("trl", 0, VANILLA),
        _run(bench.partner_of("skip"), 0, VANILLA, seconds=70.0),
        _run("skip", 0, VANILLA, seconds=50.0),
        _run("greso", 0, VANILLA, seconds=50.0),  # no partner: against the `trl` run
    ]
    rows = {r["variant"]: r for r in bench.aggregate([bench.summarize(r) for r in runs])}
    assert set(rows) == {"trl", "skip", "greso"}  # partners are clocks, not rows
    assert rows["skip"]["speedup"][1.0]["median"] == pytest.approx(1.4)
    assert rows["skip"]["step_time_ratio"] == pytest.approx(1.4)
    assert rows["skip"]["timing"] == "beside" and rows["skip"]["vanilla_seconds_per_step"] == pytest.approx(7.0)
    assert rows["skip"]["partner_curve_matches"] is True
    assert rows["greso"]["speedup"][1.0]["median"] == pytest.approx(2.0) and rows["greso"]["timing"] == "shared"
    table = bench.markdown_table(list(rows.values()), {"description": "test."}, None)
    assert "| skip † |" in table and "| greso |" in table and "curves equal" in table
    diverged = [*runs[:1], _run(bench.partner_of("skip"), 0, [0.3, 0.4, 0.5, 0.6, 0.6]), runs[2]]
    rows = {r["variant"]: r for r in bench.aggregate([bench.summarize(r) for r in diverged])}
    assert rows["skip"]["partner_curve_matches"] is False


def test_resolution_check_needs_two_seeds():
    assert bench.resolution_check(bench.aggregate(_record([1.3]))) is None


def test_resolution_check_fails_when_the_interval_holds_1():
    runs = _record([1.3, 0.8, 1.5, 0.9, 1.2])
    # step times stay 1.2x faster whatever the curve did: the measured speedups scatter around it
    check = bench.resolution_check(bench.aggregate(runs))
    assert not check["passed"] and not check["excludes_1"]


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
    with pytest.raises(SystemExit, match="must include trl"):
        bench.main(["--variants", "skip", "--output_dir", "/nonexistent"])


def _weibull(x, y0=0.3, gain=0.3, tau=80.0, shape=1.2):
    return y0 + gain * (1.0 - math.exp(-((x / tau) ** shape)))


@pytest.mark.parametrize("gain,tau,shape", [(0.3, 80.0, 1.2), (0.25, 60.0, 3.0), (0.2, 400.0, 0.7), (-0.1, 50.0, 1.0)])
def test_fit_curve_recovers_a_learning_curve(gain, tau, shape):
    """Concave, sigmoidal, nearly linear and falling curves: the parameters come back, and the start stays put."""
    points = [(x, _weibull(x, 0.3, gain, tau, shape)) for x in range(0, 151, 10)]
    fit = bench.fit_curve(points)
    assert fit["y0"] == 0.3 and fit["rms"] < 1e-4
    assert [bench.fitted(fit, x) for x, _ in points] == pytest.approx([y for _, y in points], abs=1e-4)
    if tau < 150:  # a curve that has bent inside its span pins its parameters down
        assert (fit["gain"], fit["tau"], fit["shape"]) == pytest.approx((gain, tau, shape), rel=0.01)
    assert bench.fit_curve([(0.0, 0.4)]) == {"y0": 0.4, "gain": 0.0, "tau": 1.0, "shape": 1.0, "rms": 0.0}


def test_the_fitted_curve_is_not_fooled_by_an_early_touch():
    """Vanilla (4 s/step, 150 steps) and a run on the same learning curve at 2.5 s/step (so 1.6x sooner), each
    evaluated every 10 steps. Vanilla's evaluations are high at steps 120-130 and low at its last: its moving
    average touches its (low) final level early and crosses it at step ~115, so the average reads 1.40x. The fit
    reads vanilla's level off all 16 evaluations and the crossings off whole curves: 1.6x within 5%."""
    noise = {12: 0.03, 13: 0.03, 15: -0.02}
    vanilla = _run("trl", 0, [_weibull(10 * i) + noise.get(i, 0.0) for i in range(16)], seconds=600.0, steps=150)
    fast = _run("skip", 0, [_weibull(10 * i) for i in range(25)], seconds=600.0, steps=240)
    average = bench.paired(bench.summarize(fast), bench.summarize(vanilla), None)
    assert average["speedup"][1.0] == pytest.approx(1.40, abs=0.01)
    fitted = bench.paired(bench.summarize(fast, curve="fit"), bench.summarize(vanilla, curve="fit"), None)
    assert fitted["speedup"][1.0] == pytest.approx(1.6, rel=0.05)
    assert fitted["steps_speedup"][1.0] == pytest.approx(1.0, rel=0.05)  # the same curve per step
    summary = bench.summarize(vanilla, curve="fit")
    assert summary["curve_fit"]["steps"]["rms"] == pytest.approx(summary["curve_fit"]["seconds"]["rms"])
    with pytest.raises(ValueError, match="summarize: curve"):
        bench.summarize(vanilla, curve="loess")


def test_resolution_check_needs_the_same_learning_per_step():
    """A `skip` whose speedup in steps is resolved away from 1 is not vanilla's gradient: the check fails."""

    def rows(steps_interval):
        interval = {"median": 1.3, "interval90": [1.2, 1.4]}
        return [
            {
                "variant": "skip",
                "speedup": {1.0: interval},
                "step_time_ratio": 1.3,
                "steps_speedup": {1.0: {"median": sum(steps_interval) / 2, "interval90": steps_interval}},
            }
        ]

    assert bench.resolution_check(rows([0.9, 1.1]))["passed"]
    failed = bench.resolution_check(rows([1.1, 1.3]))
    assert not failed["passed"] and failed["excludes_1"] and not failed["steps_interval_holds_1"]


def test_report_only_writes_a_partial_record_from_finished_runs(tmp_path):
    import json

    out = tmp_path / "bench"
    for seed in (0,):
        for variant, seconds in (("trl", 100.0), ("skip", 80.0)):
            run_dir, cmd = bench.run_command(RECIPE, variant, seed, str(out), _extra())
            (tmp_path / run_dir).mkdir(parents=True, exist_ok=True)
            run = _run(variant, seed, VANILLA, seconds=seconds)
            records = run.pop("records")
            (tmp_path / run_dir / "summary.json").write_text(json.dumps(run))
            (tmp_path / run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
            (tmp_path / run_dir / "command.json").write_text(json.dumps(cmd[1:]))
    record = bench.main(
        [
            "--report_only",
            "--seeds",
            "0,1",
            "--variants",
            "trl,skip",
            "--method_variants",
            "",
            "--output_dir",
            str(out),
        ]
    )
    assert record["finished_runs"] == 2 and record["planned_runs"] == 6  # beside: skip's partners are planned too
    assert (out / "accuracy_vs_time.png").exists() and (out / "bench.md").exists()
    table = (out / "bench.md").read_text()
    assert "partial record" in table and "fitted learning curve" in table  # the default reading
    assert "The same record read on curves smoothed by a moving average over 3 evaluations" in table
    assert record["curve"] == "fit" and record["other_curve"]["curve"] == "average"


def _extra():
    return ["--max_steps", "150", "--eval_every_steps", "10", "--torch_threads", "1"]
