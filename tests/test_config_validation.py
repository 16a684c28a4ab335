"""`EfficientGRPOConfig._validate`, table-driven: every rule, with a bad value and a good boundary value per field,
and every incompatible combination of methods / TRL settings refused at construction.

A bad case must raise ValueError whose message contains the expected text (the field name and its allowed range or
the conflicting fields); a good case must construct. `test_every_new_field_has_a_rule` fails when a field is added to
the config without a row here.
"""

from __future__ import annotations

import re
from dataclasses import fields

import pytest
from grpo_args import cpu_grpo_kwargs
from trl import GRPOConfig

from efficient_rlvr import EfficientGRPOConfig

NAN, INF = float("nan"), float("inf")
# Base: 2 prompts x G=4 per device, one process (num_generations bounds pruning_min_survivors; budget_k_init = G).
BASE = {"per_device_train_batch_size": 8, "num_generations": 4}
COLOCATE = {"use_vllm": True, "vllm_mode": "colocate"}
SERVER = {"use_vllm": True, "vllm_mode": "server"}


def bad(field: str, expected: str, **overrides):
    """A row that must be refused with a message containing `expected` (and naming `field`)."""
    value = overrides.get(field, "")
    return pytest.param(field, overrides, expected, id=f"bad-{field}={value!r}")


def good(field: str, **overrides):
    """A row that must be accepted (a boundary value of `field`)."""
    value = overrides.get(field, "")
    return pytest.param(field, overrides, None, id=f"ok-{field}={value!r}")


ALL_DTYPES = "('auto', 'float32', 'bfloat16', 'float16')"
TABLE = [
    # ---- vLLM engine dtype
    bad("vllm_dtype", f"vllm_dtype must be one of {ALL_DTYPES}, got 'int8'", vllm_dtype="int8"),
    good("vllm_dtype", vllm_dtype="bfloat16"),
    # ---- selection (HIVE) and dynamic sampling
    bad(
        "selection_easy_threshold",
        "selection_easy_threshold must be > selection_hard_threshold, got 0.0",
        selection_easy_threshold=0.0,
    ),
    good("selection_easy_threshold", selection_easy_threshold=0.01),
    bad(
        "selection_hard_threshold",
        "selection_hard_threshold must be a finite number, got nan",
        selection_hard_threshold=NAN,
    ),
    bad(
        "selection_hard_threshold",
        "selection_easy_threshold must be > selection_hard_threshold",
        selection_hard_threshold=1.0,
    ),
    good("selection_hard_threshold", selection_hard_threshold=0.99),
    bad("selection_p_init", "selection_p_init must be in [0.05, 0.95], got 0.04", selection_p_init=0.04),
    bad("selection_p_init", "selection_p_init must be in [0.05, 0.95], got 0.96", selection_p_init=0.96),
    good("selection_p_init", selection_p_init=0.05),
    bad(
        "selection_adapt_warmup_steps",
        "selection_adapt_warmup_steps must be in [0, inf], got -1",
        selection_adapt_warmup_steps=-1,
    ),
    good("selection_adapt_warmup_steps", selection_adapt_warmup_steps=0),
    bad(
        "selection_min_skip_lift",
        "selection_min_skip_lift must be in [-1.0, 1.0], got 1.5",
        selection_min_skip_lift=1.5,
    ),
    good("selection_min_skip_lift", selection_min_skip_lift=None),
    bad(
        "pruning_survival_rule",
        "pruning_survival_rule must be one of ('group_relative', 'literal'), got 'greedy'",
        pruning_survival_rule="greedy",
    ),
    good("pruning_survival_rule", pruning_survival_rule="literal"),
    good("selection_p_init", selection_p_init=0.95),
    bad("selection_p_floor", "selection_p_floor must be in [0.0, 1.0), got 1.0", selection_p_floor=1.0),
    bad("selection_p_floor", "selection_p_floor must be in [0.0, 1.0), got -0.1", selection_p_floor=-0.1),
    good("selection_p_floor", selection_p_floor=0.0),
    bad(
        "selection_target_zero_variance",
        "selection_target_zero_variance must be in (0.0, 1.0), got 0.0",
        selection_target_zero_variance=0.0,
    ),
    bad(
        "selection_target_zero_variance",
        "selection_target_zero_variance must be in (0.0, 1.0), got 1.0",
        selection_target_zero_variance=1.0,
    ),
    good("selection_target_zero_variance", selection_target_zero_variance=0.999),
    bad(
        "selection_entropy_keep_ratio",
        "selection_entropy_keep_ratio must be in (0.0, 1.0], got 0.0",
        selection_entropy_keep_ratio=0.0,
    ),
    good("selection_entropy_keep_ratio", selection_entropy_keep_ratio=1.0),
    bad("selection_entropy_last_k", "selection_entropy_last_k must be in [1, inf], got 0", selection_entropy_last_k=0),
    bad(
        "selection_entropy_last_k",
        "selection_entropy_last_k must be an int or None, got 1.5",
        selection_entropy_last_k=1.5,
    ),
    good("selection_entropy_last_k", selection_entropy_last_k=1),
    good("selection_entropy_last_k", selection_entropy_last_k=None),
    bad(
        "dynamic_sampling_max_rounds",
        "dynamic_sampling_max_rounds must be in [1, inf], got 0",
        dynamic_sampling_max_rounds=0,
    ),
    bad(
        "dynamic_sampling_max_rounds",
        "dynamic_sampling_max_rounds must be an int, got True",
        dynamic_sampling_max_rounds=True,
    ),
    good("dynamic_sampling_max_rounds", dynamic_sampling_max_rounds=1),
    # ---- pruning (ARRoL)
    bad("pruning_mode", "pruning_mode must be one of ('arrol', 'random'), got 'greedy'", pruning_mode="greedy"),
    good("pruning_mode", pruning_mode="random"),
    bad(
        "pruning_scorer",
        "pruning_scorer must be one of ('head', 'confidence'), got 'oracle'",
        pruning_scorer="oracle",
    ),
    good("pruning_scorer", pruning_scorer="confidence"),
    bad("pruning_l_detect", "pruning_l_detect must be in [1, inf], got 0", pruning_l_detect=0),
    bad("pruning_l_detect", "pruning_l_detect must be an int, got 2.5", pruning_l_detect=2.5),
    good("pruning_l_detect", pruning_l_detect=1),
    bad("pruning_keep_rate", "pruning_keep_rate must be in (0.0, 1.0], got 0.0", pruning_keep_rate=0.0),
    bad(
        "pruning_keep_rate",
        "pruning_keep_rate must be in [pruning_p_min=0.25, pruning_p_max=0.75], got 0.2",
        pruning_keep_rate=0.2,
    ),
    bad(
        "pruning_keep_rate",
        "pruning_keep_rate must be in [pruning_p_min=0.25, pruning_p_max=0.75], got 0.8",
        pruning_keep_rate=0.8,
    ),
    good("pruning_keep_rate", pruning_keep_rate=0.25),
    good("pruning_keep_rate", pruning_keep_rate=0.75),
    good("pruning_keep_rate", pruning_keep_rate=1.0, pruning_mode="random"),  # no clip range without the head
    bad("pruning_lambda", "pruning_lambda must be in [0.0, inf], got -0.1", pruning_lambda=-0.1),
    bad("pruning_lambda", "pruning_lambda must be a finite number, got inf", pruning_lambda=INF),
    good("pruning_lambda", pruning_lambda=0.0),
    bad("pruning_rho", "pruning_rho must be in [0.0, 1.0], got 1.1", pruning_rho=1.1),
    good("pruning_rho", pruning_rho=1.0),
    bad("pruning_p_min", "pruning_p_min must be in [0.0, 1.0], got -0.1", pruning_p_min=-0.1),
    good("pruning_p_min", pruning_p_min=0.0),
    bad("pruning_p_max", "pruning_p_max must be in [pruning_p_min, 1], got 0.2", pruning_p_max=0.2),
    bad("pruning_p_max", "pruning_p_max must be in [pruning_p_min, 1], got 1.5", pruning_p_max=1.5),
    good("pruning_p_max", pruning_p_max=1.0),
    bad("pruning_num_bins", "pruning_num_bins must be in [2, inf], got 1", pruning_num_bins=1),
    good("pruning_num_bins", pruning_num_bins=2),
    bad("pruning_buffer_size", "pruning_buffer_size must be in [1, inf], got 0", pruning_buffer_size=0),
    good("pruning_buffer_size", pruning_buffer_size=1),
    bad(
        "pruning_cold_start_steps", "pruning_cold_start_steps must be in [0, inf], got -1", pruning_cold_start_steps=-1
    ),
    good("pruning_cold_start_steps", pruning_cold_start_steps=0),
    bad(
        "pruning_min_survivors",
        "pruning_min_survivors must be in [1, num_generations=4], got 0",
        pruning_min_survivors=0,
    ),
    bad(
        "pruning_min_survivors",
        "pruning_min_survivors must be in [1, num_generations=4], got 5",
        pruning_min_survivors=5,
    ),
    good("pruning_min_survivors", pruning_min_survivors=4),
    bad("pruning_head_lr", "pruning_head_lr must be in (0.0, inf], got 0.0", pruning_head_lr=0.0),
    good("pruning_head_lr", pruning_head_lr=1e-12),
    bad(
        "pruning_correct_threshold",
        "pruning_correct_threshold must be a finite number, got -inf",
        pruning_correct_threshold=-INF,
    ),
    good("pruning_correct_threshold", pruning_correct_threshold=-1.0),
    bad("pruning_gate_min_auc", "pruning_gate_min_auc must be in [0.0, 1.0), got 1.0", pruning_gate_min_auc=1.0),
    good("pruning_gate_min_auc", pruning_gate_min_auc=0.0),
    # ---- cost-aware minibatch sampling
    bad("cost_alpha", "cost_alpha must be in [0.0, 1.0], got 1.5", cost_alpha=1.5),
    bad("cost_alpha", "cost_alpha must be a finite number, got 'x'", cost_alpha="x"),
    good("cost_alpha", cost_alpha=0.0),
    good("cost_alpha", cost_alpha=1.0),
    bad("cost_num_draws", "cost_num_draws must be in [1, inf], got 0", cost_num_draws=0),
    good("cost_num_draws", cost_num_draws=1),
    good("cost_num_draws", cost_num_draws=None),
    bad("cost_draw_fraction", "cost_draw_fraction must be in (0.0, 1.0], got 0.0", cost_draw_fraction=0.0),
    bad("cost_draw_fraction", "cost_draw_fraction must be a finite number or None, got nan", cost_draw_fraction=NAN),
    bad(
        "cost_draw_fraction",
        "cost_draw_fraction and cost_num_draws are exclusive",
        cost_draw_fraction=0.5,
        cost_num_draws=4,
    ),
    good("cost_draw_fraction", cost_draw_fraction=1.0),
    good("cost_draw_fraction", cost_draw_fraction=None),
    # ---- V0.5 baseline and adaptive budget
    bad("budget_prior", "budget_prior must be one of ('history',), got 'learned'", budget_prior="learned"),
    good("budget_prior", budget_prior="history"),
    bad("budget_k_init", "budget_k_init must be in [2, inf], got 1", budget_k_init=1),
    bad("budget_k_init", "budget_k_init must be an int, got True", budget_k_init=True),
    good("budget_k_init", budget_k_init=2),
    bad("budget_k_max", "budget_k_max must be an int >= budget_k_init, got 3", budget_k_max=3),
    good("budget_k_max", budget_k_max=4),
    bad("budget_cost", "budget_cost must be in (0.0, inf], got 0.0", budget_cost=0.0),
    bad("budget_cost", "budget_cost must be a finite number, got inf", budget_cost=INF),
    good("budget_cost", budget_cost=1e-12),
    bad("budget_reward_max", "budget_reward_max must be > budget_reward_min, got 0.0", budget_reward_max=0.0),
    good("budget_reward_max", budget_reward_max=0.001),
    bad("budget_reward_min", "budget_reward_min must be a finite number, got nan", budget_reward_min=NAN),
    bad("budget_reward_min", "budget_reward_max must be > budget_reward_min, got 1.0", budget_reward_min=1.0),
    good("budget_reward_min", budget_reward_min=-1.0),
    # ---- HES trajectory selection
    bad("hes_keep_fraction", "hes_keep_fraction must be in (0.0, 1.0], got 0.0", hes_keep_fraction=0.0),
    good("hes_keep_fraction", hes_keep_fraction=1.0),
    bad("hes_quantile", "hes_quantile must be in [0.0, 1.0), got 1.0", hes_quantile=1.0),
    good("hes_quantile", hes_quantile=0.0),
    # ---- incompatible combinations (each message names the fields)
    bad(
        "pruning", "pruning=True aborts requests inside a colocated vLLM engine: it needs use_vllm=True", pruning=True
    ),
    bad("pruning", "vllm_mode='colocate' (got use_vllm=True, vllm_mode='server')", pruning=True, **SERVER),
    bad(
        "pruning",
        "pruning=True drives the colocated vLLM engine step by step: it needs vllm_enable_sleep_mode=False",
        pruning=True,
        vllm_enable_sleep_mode=True,
        **COLOCATE,
    ),
    bad(
        "pruning",
        "pruning=True needs vllm_tensor_parallel_size=1",
        pruning=True,
        vllm_tensor_parallel_size=2,
        **COLOCATE,
    ),
    good("pruning", pruning=True, **COLOCATE),
    bad(
        "budget_adaptive",
        "num_generations must equal budget_k_init (got num_generations=8, budget_k_init=4)",
        budget_adaptive=True,
        num_generations=8,
    ),
    bad(
        "budget_adaptive",
        "budget_adaptive / budget_baseline cannot run with dynamic_sampling=True",
        budget_adaptive=True,
        dynamic_sampling=True,
    ),
    bad(
        "budget_baseline",
        "(got budget_adaptive=False, budget_baseline=True)",
        budget_baseline=True,
        dynamic_sampling=True,
    ),
    good("budget_baseline", budget_baseline=True),
    good("dynamic_sampling", dynamic_sampling=True),
    bad(
        "budget_adaptive",
        "budget_adaptive=True needs per-row generation (transformers, or use_vllm=True with vllm_mode='colocate')",
        budget_adaptive=True,
        **SERVER,
    ),
    good("budget_adaptive", budget_adaptive=True),
    good("budget_adaptive", budget_adaptive=True, budget_baseline=True, **COLOCATE),
    good("budget_adaptive", budget_adaptive=True, budget_k_init=8, num_generations=8),
    bad("cost_aware_sampling", "beta=0.04: cost_aware_sampling", cost_aware_sampling=True, beta=0.04),
    bad("cost_aware_sampling", "entropy_coef=0.01", cost_aware_sampling=True, entropy_coef=0.01),
    bad("cost_aware_sampling", "use_adaptive_entropy=True", cost_aware_sampling=True, use_adaptive_entropy=True),
    bad("cost_aware_sampling", "top_entropy_quantile=0.2 < 1", cost_aware_sampling=True, top_entropy_quantile=0.2),
    bad(
        "cost_aware_sampling",
        "cost_num_draws=3 must be >= num_processes x steps_per_generation = 4",
        cost_aware_sampling=True,
        cost_num_draws=3,
        gradient_accumulation_steps=4,
    ),
    good("cost_aware_sampling", cost_aware_sampling=True, cost_num_draws=4, gradient_accumulation_steps=4),
    good("cost_aware_sampling", cost_aware_sampling=True, **COLOCATE),
]


@pytest.mark.parametrize(("field", "overrides", "expected"), TABLE)
def test_validation_table(tmp_path, field, overrides, expected):
    kwargs = cpu_grpo_kwargs(str(tmp_path), **{**BASE, **overrides})
    if expected is None:
        config = EfficientGRPOConfig(**kwargs)
        for name, value in overrides.items():
            if value == value:  # not NaN
                assert getattr(config, name) == value
        return
    with pytest.raises(ValueError, match=re.escape(expected)) as info:
        EfficientGRPOConfig(**kwargs)
    assert field in str(info.value) or any(name in str(info.value) for name in overrides)


def test_every_new_field_has_a_rule():
    """Every non-switch field the config adds to GRPOConfig has a refused and an accepted row; every switch that
    takes part in a refused combination has a row too."""
    new = {f.name for f in fields(EfficientGRPOConfig)} - {f.name for f in fields(GRPOConfig)}
    switches = {name for name in new if isinstance(getattr(EfficientGRPOConfig, name, None), bool)}
    refused = {p.values[0] for p in TABLE if p.values[2] is not None}
    accepted = {p.values[0] for p in TABLE if p.values[2] is None}
    missing = sorted((new - switches) - (refused & accepted))
    assert not missing, f"fields without a bad and a good row: {missing}"
    assert {"pruning", "budget_adaptive", "cost_aware_sampling"} <= refused & accepted


def test_defaults_construct_and_switch_every_method_off(tmp_path):
    config = EfficientGRPOConfig(**cpu_grpo_kwargs(str(tmp_path)))
    assert config.methods == []


def test_stage_still_refuses_what_the_config_refuses(tmp_path):
    """The stages keep their own checks (a config mutated after construction is not re-validated)."""
    from efficient_rlvr.cost.stage import check_cost_aware_config

    config = EfficientGRPOConfig(**cpu_grpo_kwargs(str(tmp_path), cost_aware_sampling=True))
    config.beta = 0.04
    with pytest.raises(ValueError, match="beta=0.04"):
        check_cost_aware_config(config, num_processes=1)


def test_every_preset_passes_validation(tmp_path):
    from efficient_rlvr.config import PRESETS

    for name in PRESETS:
        config = EfficientGRPOConfig.from_preset(name, **cpu_grpo_kwargs(str(tmp_path), **BASE))
        assert config.methods


# ---------------------------------------------------------------------------------------------------- field types
# Every field the config adds to GRPOConfig takes only values of its declared type (`bool`, `int`, `float`, `str`,
# each optionally `| None`), else a ValueError naming it. Each field has a row: its type and the bad values of its
# range beyond the wrong types every field of that type refuses (negatives where the range starts at 0 or above,
# huge numbers where it is bounded above; every int field is at most 2**31 - 1).
HUGE_INT, HUGE_FLOAT = 10**12, 1e300
NEG = (-1, -0.5)
TYPES = {
    "vllm_dtype": ("str", []),
    "selection_history": ("bool", []),
    "selection_entropy": ("bool", []),
    "selection_easy_threshold": ("float", []),  # any finite threshold above selection_hard_threshold
    "selection_hard_threshold": ("float", []),
    "selection_p_init": ("float", [*NEG, 0.0, HUGE_FLOAT]),
    "selection_p_floor": ("float", [*NEG, HUGE_FLOAT]),
    "selection_target_zero_variance": ("float", [*NEG, HUGE_FLOAT]),
    "selection_entropy_keep_ratio": ("float", [*NEG, HUGE_FLOAT]),
    "selection_entropy_last_k": ("int | None", [-1, 0, HUGE_INT]),
    "dynamic_sampling": ("bool", []),
    "dynamic_sampling_max_rounds": ("int", [-1, 0, HUGE_INT]),
    "pruning": ("bool", []),
    "pruning_mode": ("str", []),
    "pruning_scorer": ("str", []),
    "pruning_l_detect": ("int", [-1, 0, HUGE_INT, 2**31]),
    "pruning_keep_rate": ("float", [*NEG, HUGE_FLOAT]),
    "pruning_lambda": ("float", list(NEG)),  # unbounded above
    "pruning_rho": ("float", [*NEG, HUGE_FLOAT]),
    "pruning_p_min": ("float", [*NEG, HUGE_FLOAT]),
    "pruning_p_max": ("float", [*NEG, HUGE_FLOAT]),
    "pruning_num_bins": ("int", [-1, HUGE_INT]),
    "pruning_buffer_size": ("int", [-1, HUGE_INT]),
    "pruning_cold_start_steps": ("int", [-1, HUGE_INT]),
    "pruning_min_survivors": ("int", [-1, HUGE_INT]),
    "pruning_head_lr": ("float", [*NEG, 0.0]),  # unbounded above
    "pruning_correct_threshold": ("float", []),  # any finite reward threshold
    "pruning_gate_min_auc": ("float", [*NEG, 1.0, HUGE_FLOAT]),
    "cost_aware_sampling": ("bool", []),
    "cost_alpha": ("float", [*NEG, HUGE_FLOAT]),
    "cost_num_draws": ("int | None", [-1, 0, HUGE_INT]),
    "skip_zero_advantage": ("bool", []),
    "old_logprobs_from_loss": ("bool", []),
    "cost_draw_fraction": ("float | None", [*NEG, 0.0, HUGE_FLOAT]),
    "budget_baseline": ("bool", []),
    "budget_prior": ("str", []),
    "budget_adaptive": ("bool", []),
    "budget_k_init": ("int", [-1, HUGE_INT]),
    "budget_k_max": ("int", [-1, HUGE_INT]),
    "budget_cost": ("float", [*NEG, 0.0]),  # unbounded above
    "budget_reward_min": ("float", [HUGE_FLOAT]),  # above budget_reward_max
    "budget_reward_max": ("float", [-HUGE_FLOAT]),  # below budget_reward_min
    "hes_selection": ("bool", []),
    "hes_keep_fraction": ("float", [*NEG, HUGE_FLOAT]),
    "hes_quantile": ("float", [*NEG, HUGE_FLOAT]),
    # fields other sessions add (the rows are checked against the dataclass below)
    "pruning_survival_rule": ("str", []),
    "selection_adapt_warmup_steps": ("int | None", [-1, HUGE_INT]),
    "selection_min_skip_lift": ("float | None", [-2.0, HUGE_FLOAT]),
}
WRONG_TYPES = {  # refused by every field of the type
    "bool": ["false", "true", "False", "", 0, 1, 1.0, None, [True]],
    "int": ["3", "x", 1.5, 2.0, True, False, NAN, INF, None, [1], 1j],
    "float": ["x", "0.5", "nan", True, False, NAN, INF, -INF, None, [0.5], 1j],
    "str": [1, 0.5, True, None, b"auto", ["auto"]],
}


def _new_fields() -> dict[str, object]:
    return {f.name: f for f in fields(EfficientGRPOConfig) if f.name not in {g.name for g in fields(GRPOConfig)}}


def _type_rows():
    present = _new_fields()
    for name, (kind, extra) in TYPES.items():
        if name not in present:  # a row for a field another session has not added yet
            continue
        base, _, optional = kind.partition(" | ")
        for value in WRONG_TYPES[base] + extra:
            if value is None and optional:
                continue
            yield pytest.param(name, value, id=f"{name}={value!r}")


def test_every_new_field_has_a_type_row_matching_its_annotation():
    """A field added to the config without a row here fails this test (and its annotation must match the row)."""
    present = _new_fields()
    missing = sorted(set(present) - set(TYPES))
    assert not missing, f"fields without a row in TYPES: {missing}"
    for name, f in present.items():
        assert str(f.type).replace("Optional[", "").replace(" ", "") == TYPES[name][0].replace(" ", ""), name


@pytest.mark.parametrize(("name", "value"), list(_type_rows()))
def test_every_new_field_refuses_values_of_another_type_or_out_of_range(tmp_path, name, value):
    kwargs = cpu_grpo_kwargs(str(tmp_path), **{**BASE, name: value})
    with pytest.raises(ValueError, match=rf"\b{name}\b") as info:
        EfficientGRPOConfig(**kwargs)
    assert not isinstance(info.value, TypeError)


def test_float_fields_take_ints_as_floats_and_optional_fields_none(tmp_path):
    config = EfficientGRPOConfig(
        **cpu_grpo_kwargs(str(tmp_path), **BASE, cost_alpha=1, pruning_lambda=2, cost_draw_fraction=1)
    )
    assert (config.cost_alpha, config.pruning_lambda, config.cost_draw_fraction) == (1.0, 2.0, 1.0)
    assert all(type(v) is float for v in (config.cost_alpha, config.pruning_lambda, config.cost_draw_fraction))
    for name, (kind, _) in TYPES.items():
        if name in _new_fields() and kind.endswith("| None"):
            assert getattr(EfficientGRPOConfig(**cpu_grpo_kwargs(str(tmp_path), **BASE, **{name: None})), name) is None
    # huge values are fine where the range is open above
    config = EfficientGRPOConfig(**cpu_grpo_kwargs(str(tmp_path), **BASE, pruning_lambda=1e300, budget_cost=1e300))
    assert config.pruning_lambda == 1e300 and config.budget_cost == 1e300
    assert EfficientGRPOConfig(**cpu_grpo_kwargs(str(tmp_path), **BASE, pruning_l_detect=2**31 - 1)).pruning_l_detect


def test_the_reward_span_must_be_finite(tmp_path):
    with pytest.raises(ValueError, match="budget_reward_max - budget_reward_min"):
        EfficientGRPOConfig(
            **cpu_grpo_kwargs(str(tmp_path), **BASE, budget_reward_min=-1e308, budget_reward_max=1e308)
        )


def test_cli_strings_for_bool_switches_still_parse(tmp_path):
    """The parser of examples/train_grpo.py turns `--selection_history false` into False before the dataclass, and
    YAML booleans arrive as bools."""
    from trl import TrlParser

    common = ["--output_dir", str(tmp_path), "--use_cpu", "true", "--report_to", "none"]
    parser = TrlParser((EfficientGRPOConfig,))
    (off,) = parser.parse_args_and_config(common + ["--selection_history", "false", "--pruning", "False"])
    assert off.selection_history is False and off.pruning is False
    (on,) = parser.parse_args_and_config(common + ["--selection_history", "true", "--cost_alpha", "0.5"])
    assert on.selection_history is True and on.cost_alpha == 0.5
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("selection_history: true\nskip_zero_advantage: false\ncost_alpha: 0\n")
    (yaml_config,) = TrlParser((EfficientGRPOConfig,)).parse_args_and_config(["--config", str(recipe), *common])
    assert yaml_config.selection_history is True and yaml_config.skip_zero_advantage is False
    assert yaml_config.cost_alpha == 0.0


# ------------------------------------------------------------------------- selection: whole groups on every process
@pytest.mark.parametrize("switch", ["selection_history", "selection_entropy"])
def test_selection_needs_whole_groups_per_device_at_construction(tmp_path, monkeypatch, switch):
    """Two processes x 2 rows: TRL accepts the global batch of 4 = G, but selection refills each process's batch with
    whole groups of G; that fails at construction naming the field, not at the first step."""
    monkeypatch.setattr(EfficientGRPOConfig, "world_size", property(lambda self: 2))
    kwargs = cpu_grpo_kwargs(str(tmp_path), per_device_train_batch_size=2, num_generations=4)
    EfficientGRPOConfig(**kwargs)  # fine without selection (TRL spreads a group over the processes)
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"{switch}=True needs whole groups on every process: per_device_train_batch_size x steps_per_generation "
            "= 2 x 1 = 2 rows is not a multiple of num_generations=4"
        ),
    ):
        EfficientGRPOConfig(**kwargs, **{switch: True})
    # 2 rows x 2 steps per generation = one whole group per process
    assert EfficientGRPOConfig(**kwargs, **{switch: True}, steps_per_generation=2).methods == [switch]


def test_optional_fields_keep_none_after_a_cli_parser_rewrote_the_field_types(tmp_path):
    # HfArgumentParser (TrlParser, examples/train_grpo.py) resolves `int | None` to `int` on the dataclass fields in
    # place; the type check must read the class's annotations, or every None default is refused after a CLI parse.
    from transformers import HfArgumentParser

    from efficient_rlvr import config

    HfArgumentParser(EfficientGRPOConfig)
    config._declared_types.cache_clear()
    args = EfficientGRPOConfig(
        **cpu_grpo_kwargs(str(tmp_path), selection_adapt_warmup_steps=None, cost_num_draws=None)
    )
    assert args.selection_adapt_warmup_steps is None and args.cost_num_draws is None
