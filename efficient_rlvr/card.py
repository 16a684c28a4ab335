"""Model card of an `EfficientGRPOTrainer` run: TRL's card plus what the efficiency methods did.

`create_model_card` first lets TRL 1.16.0 write its own card (`trl.trainer.base_trainer._BaseTrainer.
create_model_card`, which renders `trl/templates/lm_model_card.md` through `trl.trainer.utils.generate_model_card`:
metadata, tags, quick start, tracker badges, framework versions and the GRPO/TRL citations), then inserts one extra
section, "Efficiency methods", just before TRL's "### Framework versions" heading (or at the end if a future
template drops that heading). Nothing of TRL's card is removed. The extra section states:

- the methods switched on (`EfficientGRPOConfig.methods`), each with its paper(s) as arXiv ids and Hugging Face
  paper links (ids and titles from the project's SPEC.md and the seed papers; no title is given where the seed
  texts do not state one);
- the configuration: every efficiency field of `EfficientGRPOConfig` (a field it declares beyond `trl.GRPOConfig`)
  whose value differs from its default, with the default beside it;
- the run's savings, read from the components' cumulative metrics (`metrics()` of every entry of
  `trainer.components`): rollouts and tokens saved per method, the work the methods added (extra rollouts, seconds of
  their own passes), and a table of every cumulative counter.

Seconds saved in wall-clock are not measured by the components (that needs a vanilla run with the same seed, e.g.
`python -m efficient_rlvr.bench`); the card reports the seconds the methods themselves spent and the run's
`train_runtime` instead, and says so. With every method off the card is exactly TRL's.

The section is built by the pure function `efficiency_section(config, metrics)` (unit-testable without a trainer).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from huggingface_hub import ModelCard
from trl import GRPOConfig, GRPOTrainer

SECTION_TITLE = "## Efficiency methods"
_ANCHOR = "### Framework versions"


@dataclass(frozen=True)
class Paper:
    """A paper a method implements: arXiv id and, when the seed texts state it, its title."""

    arxiv_id: str
    name: str
    title: str | None = None

    def markdown(self) -> str:
        """`[name: title](https://huggingface.co/papers/<id>) (arXiv:<id>)`."""
        text = f"{self.name}: {self.title}" if self.title else self.name
        return f"[{text}](https://huggingface.co/papers/{self.arxiv_id}) (arXiv:{self.arxiv_id})"


HIVE = Paper("2603.25184", "HIVE")
GRESO = Paper(
    "2506.02177",
    "GRESO",
    "Act Only When It Pays: Efficient Reinforcement Learning for LLM Reasoning via Selective Rollouts",
)
ARROL = Paper("2603.24840", "ARRoL", "Prune as You Generate: Online Rollout Pruning for Faster and Better RLVR")
DAPO = Paper("2503.14476", "DAPO", "An Open-Source LLM Reinforcement Learning System at Scale")
V05 = Paper("2603.10848", "V0.5")
HES = Paper("2605.22389", "HES (High-Entropy Sum)")
COST_AWARE = Paper("2604.28020", "Cost-Aware Learning")


@dataclass(frozen=True)
class MethodInfo:
    """How the card names a method (keyed by its `EfficientGRPOConfig` switch)."""

    description: str
    namespace: str
    papers: tuple[Paper, ...]


# Keyed by the switches of `EfficientGRPOConfig.methods`, in pipeline order.
METHODS: dict[str, MethodInfo] = {
    "selection_history": MethodInfo(
        "HIVE stage 1: skip prompts whose recent groups were all-correct or all-wrong (GRESO history rule)",
        "selection/",
        (HIVE, GRESO),
    ),
    "selection_entropy": MethodInfo(
        "HIVE stage 2: keep the candidate prompts with prompt entropy at or above the pool median",
        "selection/",
        (HIVE,),
    ),
    "pruning": MethodInfo(
        "ARRoL: score rollouts at L_detect tokens with a quality head and abort some inside vLLM",
        "pruning/",
        (ARROL,),
    ),
    "dynamic_sampling": MethodInfo(
        "DAPO dynamic sampling: drop zero-variance groups after scoring and refill",
        "selection/dynamic/",
        (DAPO,),
    ),
    "budget_baseline": MethodInfo(
        "V0.5: advantages against a shrinkage fusion of the group mean and a value prior",
        "budget/",
        (V05,),
    ),
    "budget_adaptive": MethodInfo(
        "V0.5: adaptive rollout budget (start at k_init rollouts, add more while they pay off)",
        "budget/",
        (V05,),
    ),
    "hes_selection": MethodInfo(
        "HES: keep the highest-HES correct rollouts and random incorrect ones for the loss (Pos-High / Neg-Rand)",
        "hes/",
        (HES,),
    ),
    "skip_zero_advantage": MethodInfo(
        "Zero-advantage skip: rollouts with A = 0 skip the old-log-prob pass and the loss (Cost-Aware GRPO's p = 0, exact)",
        "cost/zero_adv_",
        (COST_AWARE,),
    ),
    "old_logprobs_from_loss": MethodInfo(
        "Old log-probs from the loss's forward pass: the vLLM importance ratio without TRL's extra no-grad pass (exact)",
        "cost/old_logprob_",
        (),
    ),
    "cost_aware_sampling": MethodInfo(
        "Cost-Aware GRPO: fill minibatches by sampling rollouts with p proportional to abs(A) / sqrt(tokens), importance-weighted",
        "cost/",
        (COST_AWARE,),
    ),
}

# Derived in `efficiency_section`: budget/total_rollouts_fixed - budget/total_rollouts.
BUDGET_SAVED_KEY = "budget/rollouts_saved_vs_k_max"
# (method switches, what was saved, rollouts key, tokens key): work the methods did not do.
SAVINGS: tuple[tuple[tuple[str, ...], str, str | None, str | None], ...] = (
    (
        ("selection_history", "selection_entropy"),
        "prompts skipped before generation (prompts x num_generations rollouts)",
        "selection/rollouts_saved_total",
        None,
    ),
    (
        ("pruning",),
        "rollouts aborted at L_detect and the tokens they did not generate",
        "pruning/rollouts_pruned_total",
        "pruning/tokens_not_generated_total",
    ),
    (
        ("budget_adaptive",),
        "rollouts not generated compared with a fixed group size of budget_k_max",
        BUDGET_SAVED_KEY,
        None,
    ),
    (
        ("skip_zero_advantage",),
        "zero-advantage rollouts and their tokens skipped before the loss",
        "cost/zero_adv_rows_skipped_total",
        "cost/zero_adv_tokens_skipped_total",
    ),
    (
        ("skip_zero_advantage",),
        "zero-advantage rollouts left out of the old-log-prob pass",
        "cost/zero_adv_logprob_rows_skipped_total",
        None,
    ),
    (
        ("old_logprobs_from_loss",),
        "rollouts not run through TRL's old-log-prob pass (the loss's forward pass gives them)",
        "cost/old_logprob_rows_skipped_total",
        None,
    ),
    (
        ("cost_aware_sampling",),
        "rollout rows and tokens not sent through the policy forward/backward",
        "cost/rows_saved_cumulative",
        "cost/tokens_saved_cumulative",
    ),
    (
        ("hes_selection",),
        "rollouts and tokens dropped from the loss",
        "hes/total_rollouts_dropped",
        "hes/total_tokens_dropped",
    ),
)
# (method switches, what was added, rollouts key, seconds key): work the methods added.
COSTS: tuple[tuple[tuple[str, ...], str, str | None, str | None], ...] = (
    (("selection_entropy",), "prompt-entropy pass", None, "selection/entropy_seconds_total"),
    (
        ("dynamic_sampling",),
        "rollouts generated and then dropped by the zero-variance gate",
        "selection/dynamic/rollouts_dropped_total",
        None,
    ),
    (
        ("budget_adaptive",),
        "extra rollouts of 'rollout more' rounds",
        "budget/total_extra_rollouts",
        "budget/total_extra_seconds",
    ),
    (("hes_selection",), "HES scoring pass", None, "hes/total_scoring_seconds"),
)


def method_tags(methods: list[str]) -> list[str]:
    """Hub tags for the enabled methods: `arxiv:<id>` of each of their papers (deduplicated, in order)."""
    tags: list[str] = []
    for name in methods:
        info = METHODS.get(name)
        for paper in info.papers if info else ():
            tag = f"arxiv:{paper.arxiv_id}"
            if tag not in tags:
                tags.append(tag)
    return tags


def efficiency_fields(config: Any) -> list[dataclasses.Field]:
    """The dataclass fields `type(config)` declares beyond `trl.GRPOConfig` (the efficiency fields)."""
    inherited = {f.name for f in dataclasses.fields(GRPOConfig)}
    return [f for f in dataclasses.fields(type(config)) if f.name not in inherited]


def non_default_fields(config: Any) -> dict[str, tuple[Any, Any]]:
    """`{name: (value, default)}` for every efficiency field whose value differs from its default, method switches
    excluded (the methods table names them)."""
    out: dict[str, tuple[Any, Any]] = {}
    for f in efficiency_fields(config):
        if f.name in METHODS:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        value = getattr(config, f.name)
        if default is dataclasses.MISSING or value != default:
            out[f.name] = (value, default)
    return out


def format_count(value: float) -> str:
    """A counter as the card prints it: an integer (rounded), e.g. `1536`."""
    return str(int(round(value)))


def format_seconds(value: float) -> str:
    """Seconds as the card prints them: one decimal, e.g. `12.3`."""
    return f"{value:.1f}"


def _format_value(value: Any) -> str:
    if value is dataclasses.MISSING:
        return "(required)"
    if isinstance(value, float):
        return f"`{value:g}`"
    return f"`{value!r}`" if isinstance(value, str) else f"`{value}`"


def _is_cumulative(key: str) -> bool:
    last = key.rsplit("/", 1)[-1]
    return last.endswith("_total") or last.endswith("_cumulative") or last.startswith("total_")


def efficiency_section(config: Any, metrics: Mapping[str, float]) -> str:
    """Markdown of the card's "Efficiency methods" section, or "" when no method is on.

    Args:
        config: an `EfficientGRPOConfig` (its `methods`, efficiency fields and `num_generations` are read).
        metrics: the components' metrics merged into one dict (namespaced keys such as
            `selection/rollouts_saved_total`), optionally with `train_runtime` (seconds) from the trainer's log.
    """
    methods = list(config.methods)
    if not methods:
        return ""
    lines = [
        SECTION_TITLE,
        "",
        "This model was trained with `efficient_rlvr.EfficientGRPOTrainer`, a subclass of TRL's `GRPOTrainer` that "
        "skips compute which teaches nothing. Methods switched on:",
        "",
        "| Method | Config switch | Paper(s) | Metrics namespace |",
        "|---|---|---|---|",
    ]
    for name in methods:
        info = METHODS.get(name)
        if info is None:  # a method this card does not know yet: still named
            lines.append(f"| {name} | `{name}=True` | | |")
            continue
        papers = "; ".join(paper.markdown() for paper in info.papers) or "- (exact rewrite of TRL's computation)"
        lines.append(f"| {info.description} | `{name}=True` | {papers} | `{info.namespace}` |")

    lines += ["", "### Efficiency configuration", ""]
    changed = non_default_fields(config)
    lines.append(f"GRPO group size (`num_generations`): {config.num_generations}.")
    if changed:
        lines += [
            "Efficiency fields that differ from their defaults:",
            "",
            "| Field | Value | Default |",
            "|---|---|---|",
        ]
        lines += [f"| `{k}` | {_format_value(v)} | {_format_value(d)} |" for k, (v, d) in changed.items()]
    else:
        lines.append("Every efficiency field has its default value.")

    lines += ["", "### Savings", ""]
    counters = {k: v for k, v in sorted(metrics.items()) if _is_cumulative(k)}
    metrics = dict(metrics)
    if "budget/total_rollouts_fixed" in metrics and "budget/total_rollouts" in metrics:
        metrics[BUDGET_SAVED_KEY] = metrics["budget/total_rollouts_fixed"] - metrics["budget/total_rollouts"]
    saved_rows = []
    for switches, what, rollouts_key, tokens_key in SAVINGS:
        method = " + ".join(name for name in switches if name in methods)
        if not method:
            continue
        rollouts = metrics.get(rollouts_key) if rollouts_key else None
        tokens = metrics.get(tokens_key) if tokens_key else None
        if rollouts is None and tokens is None:
            continue
        saved_rows.append(
            f"| {method} | {what} | {'' if rollouts is None else format_count(rollouts)} | "
            f"{'' if tokens is None else format_count(tokens)} |"
        )
    if saved_rows:
        lines += ["Work the methods saved over the whole run:", "", "| Method | What | Rollouts | Tokens |"]
        lines += ["|---|---|---|---|", *saved_rows, ""]
    else:
        lines += ["No savings were recorded (no training step ran, or the methods on only add work).", ""]

    added_rows = []
    for switches, what, rollouts_key, seconds_key in COSTS:
        method = " + ".join(name for name in switches if name in methods)
        if not method:
            continue
        rollouts = metrics.get(rollouts_key) if rollouts_key else None
        seconds = metrics.get(seconds_key) if seconds_key else None
        if rollouts is None and seconds is None:
            continue
        added_rows.append(
            f"| {method} | {what} | {'' if rollouts is None else format_count(rollouts)} | "
            f"{'' if seconds is None else format_seconds(seconds)} |"
        )
    if added_rows:
        lines += ["Work the methods added:", "", "| Method | What | Rollouts | Seconds |", "|---|---|---|---|"]
        lines += [*added_rows, ""]
    runtime = metrics.get("train_runtime")
    if runtime is not None and math.isfinite(runtime):
        lines.append(f"Training wall-clock (`train_runtime`): {format_seconds(runtime)} s.")
    lines += [
        "Wall-clock seconds saved are not measured inside a run: compare with a vanilla `GRPOTrainer` run of the "
        "same seed (`python -m efficient_rlvr.bench`).",
        "",
    ]

    if counters:
        lines += ["All cumulative counters at the end of the run:", "", "| Metric | Value |", "|---|---|"]
        for key, value in counters.items():
            shown = format_count(value) if float(value).is_integer() else f"{value:.4g}"
            lines.append(f"| `{key}` | {shown} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def insert_section(card_text: str, section: str) -> str:
    """`card_text` with `section` inserted before TRL's "### Framework versions" heading (appended if absent)."""
    if not section:
        return card_text
    index = card_text.find(_ANCHOR)
    if index < 0:
        return card_text.rstrip() + "\n\n" + section
    return card_text[:index] + section + "\n" + card_text[index:]


def collect_metrics(trainer: Any) -> dict[str, float]:
    """Every component's `metrics()` merged, plus the last `train_runtime` the trainer logged (if any)."""
    metrics: dict[str, float] = {}
    for component in getattr(trainer, "components", {}).values():
        metrics.update(component.metrics())
    for entry in reversed(trainer.state.log_history):
        if "train_runtime" in entry:
            metrics["train_runtime"] = float(entry["train_runtime"])
            break
    return metrics


def create_model_card(
    trainer: Any,
    model_name: str | None = None,
    dataset_name: str | None = None,
    tags: str | list[str] | None = None,
) -> None:
    """Write `output_dir/README.md`: TRL 1.16.0's GRPO card plus the "Efficiency methods" section.

    Same arguments as `trl.GRPOTrainer.create_model_card`; the enabled methods' `arxiv:<id>` tags are added to
    `tags`. Every process collects the components' metrics; only the main process writes (as in TRL).
    """
    methods = list(trainer.args.methods)
    if isinstance(tags, str):
        tags = [tags]
    tags = [*(tags or []), *method_tags(methods)]
    metrics = collect_metrics(trainer)  # on every process, like the trainer's `log` (metrics() may communicate)
    GRPOTrainer.create_model_card(trainer, model_name=model_name, dataset_name=dataset_name, tags=tags)
    if not trainer.is_world_process_zero() or not methods:
        return
    path = os.path.join(trainer.args.output_dir, "README.md")
    card = ModelCard.load(path)
    card.text = insert_section(card.text, efficiency_section(trainer.args, metrics))
    card.save(path)
