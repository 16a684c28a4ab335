"""Configuration of `EfficientGRPOTrainer`.

`EfficientGRPOConfig` inherits every field of `trl.GRPOConfig` unchanged and declares only the fields of the
efficiency methods. With every method off (the default) the trainer behaves exactly like `trl.GRPOTrainer`.
Each field is validated in `__post_init__`; a bad value raises `ValueError` naming the field and its allowed range.
Every new field takes only values of its annotated type (`_check_type`, derived from the annotations, so a field added
later is covered): bools only True / False, ints at most 2**31 - 1, floats finite (an int is stored as a float).
A plain `trl.GRPOConfig` becomes the same values with every method off (`EfficientGRPOConfig.from_grpo_config`).
"""

from __future__ import annotations

import functools
import math
import typing
from dataclasses import MISSING, dataclass, field, fields

from transformers.utils import logging
from trl import GRPOConfig

logger = logging.get_logger(__name__)

_VLLM_DTYPES = ("auto", "float32", "bfloat16", "float16")

# Named combinations of methods (`EfficientGRPOConfig.from_preset`, and the recipe examples/recipes/efficient.yaml).
# The trainer runs the stages in one fixed order (documented in efficient_rlvr/trainer.py): select prompts -> pruned
# generation -> score -> baseline / budget -> trajectory selection -> cost-aware minibatches -> loss.
PRESETS: dict[str, dict[str, object]] = {
    # Rebuilt from the recurring-pool benchmark (README "Benchmark"): HIVE's history skip (GRESO rule) keeps flat
    # groups out of the batch as the pool recurs; the exact zero-advantage skip (the deterministic limit of Cost-Aware
    # GRPO's p = 0 for A = 0) removes the compute of the flat groups that remain; the vLLM importance ratio is taken
    # from the loss's own forward pass, so TRL's extra no-grad pass over every rollout never runs. The last two leave
    # vanilla's gradient unchanged. Left out: ARRoL pruning (its head does not rank the rollouts of one prompt here:
    # within-group AUC 0.52-0.62, so it prunes nearly at random; with `pruning=True` its gate, `pruning_gate_min_auc`,
    # stands it down in that case; scored by trace confidence, `pruning_scorer="confidence"`, it ranks within groups
    # but pruning on top of the preset cost learning per step and was not faster to vanilla's final), the entropy
    # median filter, cost-aware draws, the V0.5 baseline, HES selection and
    # the adaptive budget. Any of them can be switched on on top.
    "efficient": {
        "selection_history": True,
        "skip_zero_advantage": True,
        "old_logprobs_from_loss": True,
    },
}


@dataclass
class EfficientGRPOConfig(GRPOConfig):
    r"""
    Configuration class for [`EfficientGRPOTrainer`].

    Inherits every parameter of [`trl.GRPOConfig`]; the fields below are new.

    Parameters:
        vllm_dtype (`str`, *optional*, defaults to `"auto"`):
            Weight/activation dtype of the colocated vLLM engine. `"auto"` matches the trainer's precision (float32
            unless `bf16`/`fp16` is set), so the importance-sampling correction compares like with like; TRL itself
            passes no dtype, and vLLM's CPU backend would then run bfloat16 under a float32 trainer.
    """

    vllm_dtype: str = field(
        default="auto",
        metadata={
            "help": "dtype of the colocated vLLM engine: 'auto' (match the trainer: float32 unless bf16/fp16), "
            "'float32', 'bfloat16' or 'float16'.",
            "choices": list(_VLLM_DTYPES),
        },
    )

    # ---- 1. HIVE prompt selection (namespace `selection/`) --------------------------------------------------------
    selection_history: bool = field(
        default=False,
        metadata={"help": "HIVE stage 1: skip prompts whose recent groups were all-correct or all-wrong (GRESO)."},
    )
    selection_entropy: bool = field(
        default=False,
        metadata={"help": "HIVE stage 2: keep the candidates whose prompt entropy is at or above the pool median."},
    )
    selection_easy_threshold: float = field(
        default=1.0, metadata={"help": "A visit is 'easy' when its group mean reward is >= this (all correct)."}
    )
    selection_hard_threshold: float = field(
        default=0.0, metadata={"help": "A visit is 'hard' when its group mean reward is <= this (nothing correct)."}
    )
    selection_p_init: float = field(default=0.5, metadata={"help": "Initial p_easy and p_hard, in [0.05, 0.95]."})
    selection_p_floor: float = field(
        default=0.01, metadata={"help": "Skip probability is 1 - max(p ** z, p_floor), in [0, 1)."}
    )
    selection_target_zero_variance: float = field(
        default=0.25,
        metadata={"help": "Target share of zero-variance groups; 1/3 of it easy, 2/3 hard (GRESO), in (0, 1)."},
    )
    selection_adapt_warmup_steps: int | None = field(
        default=None,
        metadata={
            "help": "When p_easy / p_hard start adapting: None = from the first step that draws a revisited prompt "
            "(SPEC; GRESO adapts from its second epoch on); an int n >= 0 = after n optimizer steps, revisits or not."
        },
    )
    selection_min_skip_lift: float | None = field(
        default=0.0,
        metadata={
            "help": "The history skip stands down (keeps every prompt, selection/history/standing_down = 1) while "
            "the share of explored skip-eligible prompts that come back flat exceeds the share among prompts without "
            "a record by no more than this, after 32 such probes; in [-1, 1]. None: never stand down (GRESO)."
        },
    )
    selection_entropy_keep_ratio: float = field(
        default=0.5, metadata={"help": "Stage 2 keeps this share of the candidate pool (0.5 = median), in (0, 1]."}
    )
    selection_entropy_last_k: int | None = field(
        default=None,
        metadata={"help": "Prompt entropy over the last k prompt positions only; None = every prompt position."},
    )
    dynamic_sampling: bool = field(
        default=False,
        metadata={"help": "DAPO-style gate: drop groups with zero reward variance after scoring, refill from more."},
    )
    dynamic_sampling_max_rounds: int = field(
        default=3, metadata={"help": "Most extra generation rounds per step to refill dropped groups (>= 1)."}
    )

    # ---- 2. ARRoL online rollout pruning (namespace `pruning/`) -------------------------------------------------
    pruning: bool = field(
        default=False,
        metadata={"help": "ARRoL: score rollouts at L_detect tokens with a quality head and abort some in vLLM."},
    )
    pruning_mode: str = field(
        default="arrol",
        metadata={"help": "'arrol' (calibrated quality head) or 'random' (same keep rate, no head: a baseline)."},
    )
    pruning_scorer: str = field(
        default="head",
        metadata={
            "help": "What scores a rollout at L_detect: 'head' (ARRoL's quality head on the policy's hidden state) or "
            "'confidence' (DeepConf's trace confidence: exp of the lowest 4-token mean log-prob of the sampled "
            "tokens, which vLLM returns anyway; no hidden states, nothing to train). The calibrator, the survival "
            "rule and the gate are the same. On the embedded task confidence ranks within groups at 0.70 (AUC at "
            "L_detect), the head at 0.52-0.60 (docs/head/head.json)."
        },
    )
    pruning_l_detect: int = field(
        default=512, metadata={"help": "Generated tokens at which a rollout is scored and maybe pruned (>= 1)."}
    )
    pruning_keep_rate: float = field(
        default=0.5,
        metadata={
            "help": "kappa: expected share of rollouts reaching L_detect that survive, (0, 1]; with "
            "pruning_mode='arrol' it must lie in [pruning_p_min, pruning_p_max]."
        },
    )
    pruning_survival_rule: str = field(
        default="group_relative",
        metadata={
            "help": "'group_relative' (SPEC's correction): p = clip(kappa + delta + lambda sign(q_bar - rho) "
            "(q_bar - q), p_min, p_max) with q_bar the group's mean posterior, so a group above rho loses its "
            "likely-correct rollouts first and a group below rho its likely-wrong ones; 'literal': the appendix's "
            "p = clip(kappa + delta + lambda (rho - q), ...), in which rho cancels (for comparison)."
        },
    )
    pruning_lambda: float = field(
        default=0.5, metadata={"help": "lambda: weight of the balance term in the survival probability, >= 0."}
    )
    pruning_rho: float = field(
        default=0.5, metadata={"help": "rho: target positive ratio of a group's survivors, [0, 1]."}
    )
    pruning_p_min: float = field(default=0.25, metadata={"help": "Lower clip of the survival probability."})
    pruning_p_max: float = field(default=0.75, metadata={"help": "Upper clip of the survival probability."})
    pruning_num_bins: int = field(default=128, metadata={"help": "Calibration histogram bins (>= 2)."})
    pruning_buffer_size: int = field(
        default=4096,
        metadata={
            "help": "Most recent scores (both labels) in the calibration sliding buffer; its positive share "
            "is the prior (>= 1)."
        },
    )
    pruning_cold_start_steps: int = field(
        default=20, metadata={"help": "Optimizer steps without pruning while the head and buffers warm up (>= 0)."}
    )
    pruning_min_survivors: int = field(
        default=2, metadata={"help": "A group never drops below this many rollouts (>= 1, <= num_generations)."}
    )
    pruning_head_lr: float = field(default=0.01, metadata={"help": "Learning rate of the quality head (> 0)."})
    pruning_correct_threshold: float = field(
        default=0.5, metadata={"help": "A finished rollout counts as correct for the head when reward > this."}
    )
    pruning_gate_min_auc: float = field(
        default=0.6,
        metadata={
            "help": "Prune only while the head ranks within groups: its within-group AUC on the finished, unpruned "
            "rollouts of the last 10 steps (out-of-sample L_detect scores, >= 8 mixed groups) must be at least this; "
            "otherwise the step keeps every rollout and logs pruning/gated = 1. 0.6: from that within-group AUC on "
            "the group-relative rule balances survivors resolvably better than random pruning (tests/"
            "test_pruning_fidelity.py); the embedded task's head measured 0.51-0.56. 0 disables the gate. In [0, 1)."
        },
    )

    # ---- 3. Cost-aware minibatch sampling (namespace `cost/`) ----------------------------------------------------
    cost_aware_sampling: bool = field(
        default=False,
        metadata={"help": "Fill minibatches by sampling rollouts with p ~ |A|/sqrt(tokens), importance-weighted."},
    )
    cost_alpha: float = field(
        default=0.0, metadata={"help": "Smoothing: p = (1 - alpha) p* + alpha uniform, in [0, 1]."}
    )
    cost_num_draws: int | None = field(
        default=None,
        metadata={"help": "Rollouts drawn per generation batch; None = as many as vanilla TRL uses (all of them)."},
    )
    skip_zero_advantage: bool = field(
        default=False,
        metadata={
            "help": "Drop rollouts whose advantage is 0 before the loss, keeping the dapo token normaliser: the "
            "same gradient for less backward compute (cost/skip.py; dapo/cispo/vespo, beta=0)."
        },
    )
    old_logprobs_from_loss: bool = field(
        default=False,
        metadata={
            "help": "Take the vLLM importance ratio's old log-probs from the loss's own forward pass instead of TRL's "
            "separate no-grad pass over every rollout: the same loss for one forward pass less per generation "
            "(cost/old_logprobs.py; needs num_iterations=1 and aligned generation and optimizer steps)."
        },
    )
    cost_draw_fraction: float | None = field(
        default=None,
        metadata={
            "help": "Draws per generation batch as a share of the rows that reach this stage (after pruning or "
            "trajectory selection), in (0, 1]; exclusive with cost_num_draws. None = cost_num_draws decides."
        },
    )

    # ---- 4. V0.5 prior-fused baseline and adaptive rollout budget (namespace `budget/`) ---------------------------
    budget_baseline: bool = field(
        default=False,
        metadata={"help": "V0.5: advantages against a shrinkage fusion of the group mean and a value prior."},
    )
    budget_prior: str = field(
        default="history", metadata={"help": "Value prior: 'history' (the prompt's past group means, shrunk)."}
    )
    budget_adaptive: bool = field(
        default=False,
        metadata={"help": "V0.5 'rollout more': start at k_init rollouts and add more while they pay off."},
    )
    budget_k_init: int = field(default=4, metadata={"help": "Rollouts per prompt in the first round (>= 2)."})
    budget_k_max: int = field(default=16, metadata={"help": "Most rollouts per prompt (>= k_init)."})
    budget_cost: float = field(
        default=0.0039, metadata={"help": "c: add a rollout while its estimated MSE drop exceeds this (> 0)."}
    )
    budget_reward_min: float = field(default=0.0, metadata={"help": "Lowest reward (mapped to -1 for V0.5)."})
    budget_reward_max: float = field(default=1.0, metadata={"help": "Highest reward (mapped to +1 for V0.5)."})

    # ---- 5. HES high-entropy-sum trajectory selection (namespace `hes/`) ------------------------------------------
    hes_selection: bool = field(
        default=False,
        metadata={"help": "'Pos-High / Neg-Rand': keep the highest-HES correct rollouts and random incorrect ones."},
    )
    hes_keep_fraction: float = field(default=0.5, metadata={"help": "Share of rollouts kept for the loss, in (0, 1]."})
    hes_quantile: float = field(
        default=0.995, metadata={"help": "Token-entropy quantile: HES sums the tokens at or above it, in [0, 1)."}
    )

    def __post_init__(self):
        super().__post_init__()
        self._validate()

    def _validate(self) -> None:
        """Refuse bad values and incompatible combinations before any compute (errors name the field)."""
        for name, (kind, optional) in _declared_types().items():  # every field added to GRPOConfig, by annotation
            value = _check_type(name, getattr(self, name), kind, optional)
            if value is not getattr(self, name):
                setattr(self, name, value)  # an int given to a float field is stored as a float
        _choice("vllm_dtype", self.vllm_dtype, _VLLM_DTYPES)
        _range(
            "selection_easy_threshold",
            self.selection_easy_threshold,
            lo=self.selection_hard_threshold,
            lo_open=True,
            what="> selection_hard_threshold",
        )
        _range("selection_p_init", self.selection_p_init, 0.05, 0.95)
        _range("selection_p_floor", self.selection_p_floor, 0.0, 1.0, hi_open=True)
        _range("selection_target_zero_variance", self.selection_target_zero_variance, 0.0, 1.0, True, True)
        _range("selection_entropy_keep_ratio", self.selection_entropy_keep_ratio, 0.0, 1.0, lo_open=True)
        if self.selection_entropy_last_k is not None:
            _range("selection_entropy_last_k", self.selection_entropy_last_k, 1)
        if self.selection_adapt_warmup_steps is not None:
            _range("selection_adapt_warmup_steps", self.selection_adapt_warmup_steps, 0)
        if self.selection_min_skip_lift is not None:
            _range("selection_min_skip_lift", self.selection_min_skip_lift, -1.0, 1.0)
        _range("dynamic_sampling_max_rounds", self.dynamic_sampling_max_rounds, 1)
        # Selection refills each process's generation batch (per_device x steps_per_generation rows) with whole groups
        # of G; TRL only needs the global batch to hold whole groups (a group may span processes).
        local_rows = self.per_device_train_batch_size * self.steps_per_generation
        for switch in ("selection_history", "selection_entropy"):
            if getattr(self, switch) and local_rows % self.num_generations:
                raise ValueError(
                    f"{switch}=True needs whole groups on every process: per_device_train_batch_size x "
                    f"steps_per_generation = {self.per_device_train_batch_size} x {self.steps_per_generation} = "
                    f"{local_rows} rows is not a multiple of num_generations={self.num_generations}; set "
                    "per_device_train_batch_size (or steps_per_generation) so that it is."
                )
        _choice("pruning_mode", self.pruning_mode, ("arrol", "random"))
        _choice("pruning_scorer", self.pruning_scorer, ("head", "confidence"))
        _choice("pruning_survival_rule", self.pruning_survival_rule, ("group_relative", "literal"))
        _range("pruning_l_detect", self.pruning_l_detect, 1)
        _range("pruning_keep_rate", self.pruning_keep_rate, 0.0, 1.0, lo_open=True)
        _range("pruning_lambda", self.pruning_lambda, 0.0)
        _range("pruning_rho", self.pruning_rho, 0.0, 1.0)
        _range("pruning_p_min", self.pruning_p_min, 0.0, 1.0)
        _range("pruning_p_max", self.pruning_p_max, self.pruning_p_min, 1.0, what="in [pruning_p_min, 1]")
        if self.pruning_mode == "arrol":  # the bisection for delta needs kappa reachable inside the clip range
            _range(
                "pruning_keep_rate",
                self.pruning_keep_rate,
                self.pruning_p_min,
                self.pruning_p_max,
                what=f"in [pruning_p_min={self.pruning_p_min}, pruning_p_max={self.pruning_p_max}]",
            )
        _range("pruning_num_bins", self.pruning_num_bins, 2)
        _range("pruning_buffer_size", self.pruning_buffer_size, 1)
        _range("pruning_cold_start_steps", self.pruning_cold_start_steps, 0)
        _range(
            "pruning_min_survivors",
            self.pruning_min_survivors,
            1,
            self.num_generations,
            what=f"in [1, num_generations={self.num_generations}]",
        )
        _range("pruning_head_lr", self.pruning_head_lr, 0.0, lo_open=True)
        _range("pruning_gate_min_auc", self.pruning_gate_min_auc, 0.0, 1.0, hi_open=True)
        _range("cost_alpha", self.cost_alpha, 0.0, 1.0)
        if self.cost_num_draws is not None:
            _range("cost_num_draws", self.cost_num_draws, 1)
        if self.cost_draw_fraction is not None:
            _range("cost_draw_fraction", self.cost_draw_fraction, 0.0, 1.0, lo_open=True)
            if self.cost_num_draws is not None:
                raise ValueError("cost_draw_fraction and cost_num_draws are exclusive: set one of them, not both.")
        _choice("budget_prior", self.budget_prior, ("history",))
        _range("budget_k_init", self.budget_k_init, 2)
        _range("budget_k_max", self.budget_k_max, self.budget_k_init, what="an int >= budget_k_init")
        _range("budget_cost", self.budget_cost, 0.0, lo_open=True)
        _range(
            "budget_reward_max",
            self.budget_reward_max,
            self.budget_reward_min,
            lo_open=True,
            what="> budget_reward_min",
        )
        if not math.isfinite(self.budget_reward_max - self.budget_reward_min):  # V0.5 divides by the span
            raise ValueError(
                f"budget_reward_max - budget_reward_min must be finite, got budget_reward_min={self.budget_reward_min}, "
                f"budget_reward_max={self.budget_reward_max}."
            )
        _range("hes_keep_fraction", self.hes_keep_fraction, 0.0, 1.0, lo_open=True)
        _range("hes_quantile", self.hes_quantile, 0.0, 1.0, hi_open=True)
        if self.pruning and not (self.use_vllm and self.vllm_mode == "colocate"):
            raise ValueError(
                "pruning=True aborts requests inside a colocated vLLM engine: it needs use_vllm=True and "
                f"vllm_mode='colocate' (got use_vllm={self.use_vllm}, vllm_mode={self.vllm_mode!r})."
            )
        # Incompatible combinations that depend only on config fields; each stage keeps its own check at trainer build.
        if self.pruning and self.vllm_enable_sleep_mode:
            raise ValueError(
                "pruning=True drives the colocated vLLM engine step by step: it needs vllm_enable_sleep_mode=False."
            )
        if self.pruning and self.vllm_tensor_parallel_size != 1:
            raise ValueError(
                f"pruning=True needs vllm_tensor_parallel_size=1 (each process drives its own engine and aborts its "
                f"own requests), got vllm_tensor_parallel_size={self.vllm_tensor_parallel_size}."
            )
        if self.budget_adaptive and self.num_generations != self.budget_k_init:
            raise ValueError(
                f"budget_adaptive=True rolls every prompt out budget_k_init times in TRL's first round: num_generations "
                f"must equal budget_k_init (got num_generations={self.num_generations}, "
                f"budget_k_init={self.budget_k_init})."
            )
        if (self.budget_adaptive or self.budget_baseline) and self.dynamic_sampling:
            raise ValueError(
                "budget_adaptive / budget_baseline cannot run with dynamic_sampling=True (the zero-variance gate "
                "refills the batch with other prompts' groups, so V0.5 no longer sees the step's own groups): turn "
                f"one of them off (got budget_adaptive={self.budget_adaptive}, budget_baseline={self.budget_baseline})."
            )
        if self.budget_adaptive and self.use_vllm and self.vllm_mode == "server":
            raise ValueError(
                "budget_adaptive=True needs per-row generation (transformers, or use_vllm=True with "
                "vllm_mode='colocate'): TRL's vLLM server mode generates num_generations completions per unique "
                f"prompt (got use_vllm=True, vllm_mode={self.vllm_mode!r})."
            )
        if self.skip_zero_advantage:  # loss_type, beta, entropy terms: the dropped rows' loss must be exactly 0
            from .cost.skip import check_skip_config

            check_skip_config(self)
        if self.old_logprobs_from_loss:  # num_iterations, steps alignment, liger: old log-probs = the loss's own
            from .cost.old_logprobs import check_old_logprobs_config

            check_old_logprobs_config(self)
        if self.cost_aware_sampling:  # loss_type, beta, entropy_coef, use_adaptive_entropy, top_entropy_quantile, ...
            from .cost.stage import check_cost_aware_config

            check_cost_aware_config(self, self.world_size)

    @property
    def methods(self) -> list[str]:
        """Names of the methods switched on, in pipeline order."""
        switches = {
            "selection_history": self.selection_history,
            "selection_entropy": self.selection_entropy,
            "pruning": self.pruning,
            "dynamic_sampling": self.dynamic_sampling,
            "budget_baseline": self.budget_baseline,
            "budget_adaptive": self.budget_adaptive,
            "hes_selection": self.hes_selection,
            "skip_zero_advantage": self.skip_zero_advantage,
            "old_logprobs_from_loss": self.old_logprobs_from_loss,
            "cost_aware_sampling": self.cost_aware_sampling,
        }
        return [name for name, on in switches.items() if on]

    @classmethod
    def from_grpo_config(cls, args: GRPOConfig) -> EfficientGRPOConfig:
        """`args` (a plain `trl.GRPOConfig`) as an `EfficientGRPOConfig`: the same value of every field, every
        efficiency field at its default (every method off). Logs one line saying so.

        The values are copied as `GRPOConfig.__post_init__` left them, without running it again: it rewrites fields
        (e.g. derives `steps_per_generation` and `generation_batch_size`, then refuses to see both set) and resolves
        the distributed state. Only the new fields are validated. The copy is shallow, like passing `args` itself.
        """
        if isinstance(args, cls):
            return args
        if not isinstance(args, GRPOConfig):
            raise TypeError(f"from_grpo_config needs a trl.GRPOConfig, got {type(args).__name__}.")
        converted = cls.__new__(cls)
        converted.__dict__.update(vars(args))
        base = {f.name for f in fields(GRPOConfig)}
        for f in fields(cls):
            if f.name not in base:
                setattr(converted, f.name, f.default if f.default is not MISSING else f.default_factory())
        converted._validate()
        logger.warning(
            f"EfficientGRPOTrainer got a plain {type(args).__name__}: training with the same values and every "
            "efficiency method off (exactly trl.GRPOTrainer); use efficient_rlvr.EfficientGRPOConfig to switch "
            "methods on."
        )
        return converted

    @classmethod
    def from_preset(cls, name: str, **kwargs: object) -> EfficientGRPOConfig:
        """A config with the methods of preset `name` switched on (`PRESETS`); `kwargs` are any other fields and win
        over the preset's values (e.g. ``from_preset("efficient", pruning=False)`` keeps every method but pruning)."""
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}.")
        return cls(**{**PRESETS[name], **kwargs})

    def resolved_vllm_dtype(self) -> str:
        """The dtype string handed to `vllm.LLM(dtype=...)`."""
        if self.vllm_dtype != "auto":
            return self.vllm_dtype
        if self.bf16:
            return "bfloat16"
        if self.fp16:
            return "float16"
        return "float32"


# Largest value of an int field: counts and sizes (tokens, bins, buffer entries, steps, rollouts, draws) beyond a
# 32-bit int are a mistake (tensors of that many bins, rollouts that never end), refused before any compute.
_MAX_INT = 2**31 - 1
_ANNOTATION_TYPES: dict[str, type] = {"bool": bool, "int": int, "float": float, "str": str}


@functools.cache
def _declared_types() -> dict[str, tuple[type, bool]]:
    """`{name: (type, None allowed)}` of every field `EfficientGRPOConfig` declares beyond `trl.GRPOConfig`, read from
    its annotation (`bool`, `int`, `float`, `str`, each optionally `| None`), so a field added later is checked too.
    Fields of user subclasses are not included (their types are theirs to check)."""
    base = {f.name for f in fields(GRPOConfig)}
    out: dict[str, tuple[type, bool]] = {}
    # The class's own annotations, not `Field.type`: `HfArgumentParser` rewrites `Field.type` in place (it resolves
    # `int | None` to `int`), so after a CLI parse the fields no longer say which of them take None.
    annotations = EfficientGRPOConfig.__annotations__
    for f in fields(EfficientGRPOConfig):
        if f.name in base:
            continue
        annotation = annotations.get(f.name, f.type)
        if isinstance(annotation, str):
            parts = [part.strip() for part in annotation.split("|")]
        else:  # an evaluated annotation: a type or a union of types
            parts = [getattr(t, "__name__", repr(t)) for t in (typing.get_args(annotation) or (annotation,))]
        optional = "None" in parts or "NoneType" in parts
        kinds = [part for part in parts if part not in ("None", "NoneType")]
        if len(kinds) != 1 or kinds[0] not in _ANNOTATION_TYPES:
            raise TypeError(
                f"EfficientGRPOConfig.{f.name} is annotated {annotation!r}: the config's type check handles bool, int, "
                "float and str, each optionally `| None` (extend efficient_rlvr.config._check_type)."
            )
        out[f.name] = (_ANNOTATION_TYPES[kinds[0]], optional)
    return out


def _check_type(name: str, value: object, kind: type, optional: bool) -> object:
    """`value` if it is of type `kind` (None allowed when `optional`), else a ValueError naming `name`.

    bool: True or False only (not 0/1, not the strings "true"/"false": the CLI parser converts those before the
    dataclass). int: an int, not a bool, at most `_MAX_INT` in magnitude. float: an int or a float, not a bool, finite;
    returned as a float. str: a str.
    """
    if value is None and optional:
        return value
    or_none = " or None" if optional else ""
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be a bool (True or False){or_none}, got {value!r}.")
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an int{or_none}, got {value!r}.")
        if abs(value) > _MAX_INT:
            raise ValueError(f"{name} must be an int of at most {_MAX_INT} (2**31 - 1), got {value!r}.")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number{or_none}, got {value!r}.")
        return float(value) if type(value) is not float else value
    elif not isinstance(value, kind):
        raise ValueError(f"{name} must be a {kind.__name__}{or_none}, got {value!r}.")
    return value


def _choice(name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}.")


def _range(
    name: str,
    value: float,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
    what: str | None = None,
) -> None:
    """Raise a ValueError naming `name` unless lo <(=) value <(=) hi."""
    ok = value is not None and not isinstance(value, bool)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        if what is None:
            left = "(" if lo_open else "["
            right = ")" if hi_open else "]"
            what = f"in {left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
        raise ValueError(f"{name} must be {what}, got {value!r}.")
