"""HIVE stage 1: the history sampler, i.e. GRESO's probabilistic pre-rollout skip rule (arXiv 2506.02177).

Algorithm (SPEC section 1, stage 1). Every rolled-out group is classified on all of its G rollouts. A complete group
(every reward known) is classified by its mean reward m: "easy" if m >= `easy_threshold` (all correct with 0/1
rewards), "hard" if m <= `hard_threshold` (nothing correct), otherwise "mixed". A group with unknown rewards (`None` /
NaN: rollouts pruned by ARRoL or dropped before scoring; or fewer than `group_size` rewards when that is set) is
"mixed" if its known rewards differ, and otherwise "unknown": the pruned rollouts could have gone either way (a group
whose correct rollouts were pruned is not "hard"), so an unknown visit is not recorded (the prompt's record is left as
it was) and not counted in easy_ratio / hard_ratio; `unknown_total` counts such visits. For each prompt key the
sampler remembers only the type of the last visit and the length z of the run of identical most-recent visits (z
consecutive easy visits, or z consecutive hard visits): that is all the rule reads, so a record is O(1) whatever the
number of visits. When a candidate is drawn:

- unseen, or last visit mixed: always kept (skip probability 0);
- last visit easy, z consecutive easy visits: skipped with probability 1 - max(p_easy ** z, p_floor);
- last visit hard, z consecutive hard visits: skipped with probability 1 - max(p_hard ** z, p_floor).

(GRESO evaluates the easy rule first and the hard rule only when the last visit was hard; since a visit cannot be
both, at most one rule applies.) A skipped prompt is not rolled out, so its record is unchanged until it is kept and
observed again. One uniform draw from the sampler's own generator decides each candidate whose skip probability is
positive, in candidate order; candidates with probability 0 consume no randomness.

Adaptive exploration (GRESO): after every optimizer step (`on_step_end`), with easy_ratio / hard_ratio the fractions
of the groups observed since the previous update (unknown visits left out) that were easy / hard, target_easy =
target_zero_variance * easy_target_share and target_hard = target_zero_variance * (1 - easy_target_share) (0.25/3 and
0.25*2/3 by default): p -= p_step if ratio >= target else p += p_step, clamped to [p_min, p_max]. Lowering p skips
more.

Standing down (not in GRESO; `min_lift`): the rule pays only if the prompts it would skip are likelier to come back
flat than prompts without a record. Eligible candidates that were kept anyway (explored, skip probability > 0) are
the rule's own test: the share of them whose next known visit is again easy or hard is its precision; the share of
flat visits among prompts without a record (unseen or last mixed) is the base rate. Once `MIN_PROBES` explored
visits were observed and precision - base rate <= `min_lift`, the sampler stops skipping (every candidate is kept,
`standing_down` = 1 in the metrics) until the measured lift exceeds `min_lift` again; both rates are cumulative over
the run. `min_lift=None` never stands down.

When adaptation starts (SPEC correction): GRESO adapts p only from its second epoch on, when skips become possible;
adapting during the first pass would walk both p to a clamp before any prompt is revisited. So p adapts only once
revisits happen. `adapt_warmup_steps=None` (the default): from the first step at which a revisited prompt is drawn,
i.e. a candidate passed to `select`, or a group passed to `observe` (refills reach the history that way), whose key
was observed in an earlier visit; that step's `on_step_end` adapts, and every later one does. To detect that, the
sampler remembers the keys it observed until adaptation starts (at most `max_records`, oldest forgotten first) and
then forgets them. `adapt_warmup_steps=n` (an int): adapt from the (n+1)-th `on_step_end` on, revisits or not (0 =
from the first step; GRESO's rule is n = optimizer steps per epoch). Whether adaptation has started is part of the
state (`adapting` in `state_dict` and in the metrics).

Deviations and choices, all configurable:
- Thresholds default to 1.0 / 0.0, which are exact for 0/1 rewards (mean of 0/1 floats is exact); GRESO used
  0.98 / 0.11 on its 0 / 0.1 / 1 reward scale. The adaptation counts the same easy/hard classes (GRESO counted
  groups whose rewards were all exactly 1 / all exactly 0.1, the same sets on its scale).
- A step that observed no group (e.g. TRL reusing one generation for several optimizer steps) leaves p unchanged
  (GRESO would divide by zero).
- "Mixed if the known rewards differ" is exact for 0/1 rewards; on a graded scale a group whose known rewards differ
  slightly could still have reached `easy_threshold` had it been complete: it is counted mixed (kept, the
  conservative side).
- A prompt whose last visit was mixed needs no record (it behaves as unseen), so its record is dropped: the history
  holds only prompts whose last visit had zero variance.
- Memory is bounded: at most `max_records` records are kept; when a new record would exceed it, the record updated
  least recently is evicted (that prompt then behaves as unseen: it is always a candidate, the conservative side).
  GRESO keeps every prompt of a finite dataset; the bound only matters for very large or streamed prompt sets.
- Identical decisions on every process require identical inputs: feed `observe` the rewards gathered across
  ranks and every rank the same candidates.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from .base import Candidate, RewardGroups, Selector, iter_group_entries

MIXED, EASY, HARD = 0, 1, 2
_COUNTERS = ("candidates", "kept", "skipped_easy", "skipped_hard")
MIN_PROBES = 32  # explored eligible visits before the sampler may stand down


class HistorySampler(Selector):
    """GRESO's history-based skip rule with adaptive exploration probabilities (HIVE stage 1).

    Args:
        easy_threshold: a group with mean reward >= this is "easy".
        hard_threshold: a group with mean reward <= this is "hard"; must be < `easy_threshold`.
        p_init: starting value of both p_easy and p_hard, in [p_min, p_max].
        p_floor: lower bound of the keep probability p ** z of a prompt with a history, in [0, 1).
        p_step: change of p per adaptation, > 0.
        p_min, p_max: clamp range of p, 0 < p_min <= p_max <= 1.
        target_zero_variance: targeted fraction of zero-variance groups among rolled-out groups, in [0, 1].
        easy_target_share: share of that target given to easy groups (1/3; hard gets the rest), in [0, 1].
        adapt_warmup_steps: None = p adapts from the first step at which a revisited prompt is drawn (SPEC); an int
            n >= 0 = p adapts after n `on_step_end` calls, revisits or not.
        seed: seed of the sampler's own numpy generator, >= 0.
        max_records: most prompts with a record, >= 1 (least recently updated evicted first); None = unbounded.
            Also bounds the keys remembered to detect the first revisit.
        group_size: rollouts per complete group (G), >= 1; a group with fewer entries has unknown rewards. None =
            every entry a group has counts as its full size (unknown rewards are then marked `None` / NaN only).
        min_lift: stop skipping while the rule's measured precision exceeds the base rate of flat visits by no more
            than this (module docstring), in [-1, 1]; None = never stand down.
    """

    def __init__(
        self,
        *,
        easy_threshold: float = 1.0,
        hard_threshold: float = 0.0,
        p_init: float = 0.5,
        p_floor: float = 0.01,
        p_step: float = 0.01,
        p_min: float = 0.05,
        p_max: float = 0.95,
        target_zero_variance: float = 0.25,
        easy_target_share: float = 1.0 / 3.0,
        adapt_warmup_steps: int | None = None,
        seed: int = 0,
        max_records: int | None = None,
        group_size: int | None = None,
        min_lift: float | None = None,
    ):
        if not hard_threshold < easy_threshold:
            raise ValueError(
                f"hard_threshold must be < easy_threshold, got hard_threshold={hard_threshold}, "
                f"easy_threshold={easy_threshold}."
            )
        if not 0.0 < p_min <= p_max <= 1.0:
            raise ValueError(f"p_min and p_max must satisfy 0 < p_min <= p_max <= 1, got {p_min}, {p_max}.")
        if not p_min <= p_init <= p_max:
            raise ValueError(f"p_init must be in [p_min, p_max] = [{p_min}, {p_max}], got {p_init}.")
        if not 0.0 <= p_floor < 1.0:
            raise ValueError(f"p_floor must be in [0, 1), got {p_floor}.")
        if not p_step > 0.0:
            raise ValueError(f"p_step must be > 0, got {p_step}.")
        if not 0.0 <= target_zero_variance <= 1.0:
            raise ValueError(f"target_zero_variance must be in [0, 1], got {target_zero_variance}.")
        if not 0.0 <= easy_target_share <= 1.0:
            raise ValueError(f"easy_target_share must be in [0, 1], got {easy_target_share}.")
        if adapt_warmup_steps is not None and (
            isinstance(adapt_warmup_steps, bool) or not isinstance(adapt_warmup_steps, int) or adapt_warmup_steps < 0
        ):
            raise ValueError(f"adapt_warmup_steps must be an int >= 0 or None, got {adapt_warmup_steps!r}.")
        if group_size is not None and (
            isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1
        ):
            raise ValueError(f"group_size must be an int >= 1 or None, got {group_size!r}.")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}.")
        if max_records is not None and (isinstance(max_records, bool) or max_records < 1):
            raise ValueError(f"max_records must be an int >= 1 or None, got {max_records!r}.")
        if min_lift is not None and not -1.0 <= min_lift <= 1.0:
            raise ValueError(f"min_lift must be in [-1, 1] or None, got {min_lift}.")
        self.min_lift = min_lift
        self.max_records = max_records
        self.easy_threshold = float(easy_threshold)
        self.hard_threshold = float(hard_threshold)
        self.p_floor = float(p_floor)
        self.p_step = float(p_step)
        self.p_min = float(p_min)
        self.p_max = float(p_max)
        self.target_easy = target_zero_variance * easy_target_share
        self.target_hard = target_zero_variance * (1.0 - easy_target_share)
        self.adapt_warmup_steps = adapt_warmup_steps
        self.group_size = group_size

        self.p_easy = float(p_init)
        self.p_hard = float(p_init)
        self._rng = np.random.default_rng(seed)
        # key -> (type of the last visit, length of the run of that type ending at the last visit); EASY/HARD only.
        # Ordered from least to most recently updated (the eviction order when `max_records` is reached).
        self._records: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self._evicted_total = 0
        self._unknown_total = 0  # visits left undetermined by unknown (pruned) rewards
        self._steps = 0
        self._adapting = False  # whether p adapts at every on_step_end (set once, never unset)
        # Until adaptation starts with adapt_warmup_steps=None: keys observed so far (oldest first) and whether a
        # prompt drawn or observed since the last on_step_end had been observed before.
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._revisit = False
        self._pending = {"groups": 0, "easy": 0, "hard": 0}  # groups observed since the last adaptation
        self._window = dict.fromkeys(_COUNTERS, 0)  # selection counts since the last on_step_end
        self._last = dict.fromkeys(_COUNTERS, 0)  # counts of the most recent step that selected anything
        self._totals = dict.fromkeys(_COUNTERS, 0)
        self._last_ratios: dict[str, float] | None = None
        # The rule's own test: explored eligible keys -> kind of their record; cumulative probe counts.
        self._explored: dict[str, int] = {}
        self._probes = {"explored": 0, "explored_flat": 0, "fresh": 0, "fresh_flat": 0}

    # --------------------------------------------------------------------------------------------------------------
    def classify(self, mean_reward: float) -> int:
        """EASY, HARD or MIXED for a group with this mean reward."""
        if mean_reward >= self.easy_threshold:
            return EASY
        if mean_reward <= self.hard_threshold:
            return HARD
        return MIXED

    def visit_kind(self, rewards: Sequence[float], entries: int) -> int | None:
        """EASY, HARD or MIXED for a visit with these known `rewards` out of `entries` rollouts, None if unknown.

        Complete (every entry known and, when `group_size` is set, at least `group_size` of them): classified on the
        mean. Otherwise MIXED if the known rewards differ, else None (the unknown ones could change the class)."""
        if not rewards:
            return None
        if len(rewards) == entries and (self.group_size is None or entries >= self.group_size):
            return self.classify(sum(rewards) / len(rewards))
        return MIXED if max(rewards) > min(rewards) else None

    def record(self, key: str) -> tuple[int, int]:
        """(type of the last visit, run length z) of a prompt; (MIXED, 0) if unseen or last visit mixed."""
        return self._records.get(key, (MIXED, 0))

    def skip_probability(self, key: str) -> float:
        """1 - max(p ** z, p_floor) with p = p_easy or p_hard by the last visit's type; 0 if no rule applies."""
        kind, z = self.record(key)
        if kind == MIXED or z == 0:
            return 0.0
        p = self.p_easy if kind == EASY else self.p_hard
        return 1.0 - max(p**z, self.p_floor)

    @property
    def adapting(self) -> bool:
        """Whether p_easy / p_hard adapt after every step (set once adaptation has started)."""
        return self._adapting

    def _watching_revisits(self) -> bool:
        return not self._adapting and self.adapt_warmup_steps is None

    def _is_revisit(self, key: str) -> bool:
        return key in self._seen or key in self._records

    @property
    def lift(self) -> float:
        """Measured precision of the skip rule minus the base rate of flat visits (NaN before any probe)."""
        p = self._probes
        if not p["explored"] or not p["fresh"]:
            return float("nan")
        return p["explored_flat"] / p["explored"] - p["fresh_flat"] / p["fresh"]

    @property
    def standing_down(self) -> bool:
        """Whether the sampler keeps every candidate because the rule does not pay (module docstring)."""
        if self.min_lift is None or self._probes["explored"] < MIN_PROBES or not self._probes["fresh"]:
            return False
        return self.lift <= self.min_lift

    def select(self, candidates: Sequence[Candidate]) -> list[Candidate]:
        kept: list[Candidate] = []
        if self._watching_revisits() and any(self._is_revisit(c.key) for c in candidates):
            self._revisit = True
        standing_down = self.standing_down
        for candidate in candidates:
            prob = self.skip_probability(candidate.key)
            if prob > 0.0 and not standing_down and self._rng.random() < prob:
                kind = self._records[candidate.key][0]
                self._count("skipped_easy" if kind == EASY else "skipped_hard")
            else:
                if prob > 0.0:  # eligible but kept: its next visit tests the rule
                    self._explored[candidate.key] = self._records[candidate.key][0]
                kept.append(candidate)
                self._count("kept")
            self._count("candidates")
        return kept

    def observe(self, keys: Sequence[str], group_rewards: RewardGroups) -> None:
        groups = iter_group_entries(group_rewards)
        if len(keys) != len(groups):
            raise ValueError(f"keys and group_rewards must have the same length, got {len(keys)} and {len(groups)}.")
        for key, (rewards, entries) in zip(keys, groups, strict=True):
            if not rewards:  # nothing known: not a visit
                continue
            if self._watching_revisits():
                if self._is_revisit(key):
                    self._revisit = True
                self._seen[key] = None
                self._seen.move_to_end(key)
                if self.max_records is not None and len(self._seen) > self.max_records:
                    self._seen.popitem(last=False)
            kind = self.visit_kind(rewards, entries)
            explored = self._explored.pop(key, None) is not None
            if kind is None:  # unknown: no record change, not counted in the ratios
                self._unknown_total += 1
                continue
            probe = "explored" if explored else "fresh" if key not in self._records else None
            if probe is not None:
                self._probes[probe] += 1
                self._probes[probe + "_flat"] += int(kind != MIXED)
            self._pending["groups"] += 1
            if kind == MIXED:
                self._records.pop(key, None)
                continue
            self._pending["easy" if kind == EASY else "hard"] += 1
            last_kind, z = self.record(key)
            self._records[key] = (kind, z + 1 if last_kind == kind else 1)
            self._records.move_to_end(key)
            if self.max_records is not None and len(self._records) > self.max_records:
                evicted, _ = self._records.popitem(last=False)
                self._explored.pop(evicted, None)
                self._evicted_total += 1

    def on_step_end(self) -> None:
        """Adapt p_easy / p_hard from the groups observed since the last call, and close the step's counters."""
        self._steps += 1
        if not self._adapting:
            if self.adapt_warmup_steps is None:
                self._adapting = self._revisit
            else:
                self._adapting = self._steps > self.adapt_warmup_steps
            if self._adapting:
                self._seen.clear()  # only needed to detect the first revisit
        self._revisit = False
        groups = self._pending["groups"]
        if groups > 0 and self._adapting:
            easy_ratio = self._pending["easy"] / groups
            hard_ratio = self._pending["hard"] / groups
            self.p_easy = self._adapt(self.p_easy, easy_ratio, self.target_easy)
            self.p_hard = self._adapt(self.p_hard, hard_ratio, self.target_hard)
            self._last_ratios = {"easy": easy_ratio, "hard": hard_ratio}
        self._pending = {"groups": 0, "easy": 0, "hard": 0}
        if self._window["candidates"] > 0:
            self._last = self._window
        self._window = dict.fromkeys(_COUNTERS, 0)

    def _adapt(self, p: float, ratio: float, target: float) -> float:
        p = p - self.p_step if ratio >= target else p + self.p_step
        return min(max(p, self.p_min), self.p_max)

    def _count(self, name: str) -> None:
        self._window[name] += 1
        self._totals[name] += 1

    # --------------------------------------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """Cumulative selection counts: `candidates`, `kept`, `skipped_easy`, `skipped_hard`."""
        return dict(self._totals)

    @property
    def num_records(self) -> int:
        """Number of prompts with a record (last visit easy or hard)."""
        return len(self._records)

    def state_dict(self) -> dict[str, Any]:
        return {
            "records": dict(self._records),  # insertion order = update order (kept by dict and torch.save)
            "evicted_total": self._evicted_total,
            "unknown_total": self._unknown_total,
            "adapting": self._adapting,
            "seen": list(self._seen),  # oldest first; empty once adapting
            "revisit": self._revisit,
            "p_easy": self.p_easy,
            "p_hard": self.p_hard,
            "rng": copy.deepcopy(self._rng.bit_generator.state),
            "steps": self._steps,
            "pending": dict(self._pending),
            "window": dict(self._window),
            "last": dict(self._last),
            "totals": dict(self._totals),
            "last_ratios": None if self._last_ratios is None else dict(self._last_ratios),
            "explored": dict(self._explored),
            "probes": dict(self._probes),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._records = OrderedDict((str(k), (int(v[0]), int(v[1]))) for k, v in state["records"].items())
        self._evicted_total = int(state.get("evicted_total", 0))
        self._unknown_total = int(state.get("unknown_total", 0))
        # states saved before these fields existed: adaptation had started if it had ever adapted
        self._adapting = bool(state.get("adapting", state["last_ratios"] is not None))
        self._seen = OrderedDict((str(k), None) for k in state.get("seen", []))
        self._revisit = bool(state.get("revisit", False))
        self.p_easy = float(state["p_easy"])
        self.p_hard = float(state["p_hard"])
        self._rng.bit_generator.state = copy.deepcopy(state["rng"])
        self._steps = int(state["steps"])
        self._pending = dict(state["pending"])
        self._window = dict(state["window"])
        self._last = dict(state["last"])
        self._totals = dict(state["totals"])
        self._last_ratios = None if state["last_ratios"] is None else dict(state["last_ratios"])
        self._explored = {str(k): int(v) for k, v in state.get("explored", {}).items()}  # none before standing down
        self._probes = dict(state.get("probes", {"explored": 0, "explored_flat": 0, "fresh": 0, "fresh_flat": 0}))

    def metrics(self) -> dict[str, float]:
        """Counts of the most recent step that selected anything (closed by `on_step_end`), cumulative totals,
        the current p_easy / p_hard, whether they adapt (`adapting`, 0/1), the easy / hard ratios of the last
        adaptation, the visits left unknown by pruned rewards (`unknown_total`), and the rule's own test:
        `skip_precision`, `fresh_flat_rate`, their difference `lift` and `standing_down` (0/1)."""
        prefix = "selection/history/"
        out = {prefix + name: float(value) for name, value in self._last.items()}
        out[prefix + "skipped_total"] = float(self._totals["skipped_easy"] + self._totals["skipped_hard"])
        out[prefix + "candidates_total"] = float(self._totals["candidates"])
        out[prefix + "p_easy"] = self.p_easy
        out[prefix + "p_hard"] = self.p_hard
        out[prefix + "adapting"] = float(self._adapting)
        out[prefix + "unknown_total"] = float(self._unknown_total)
        if self._last_ratios is not None:  # set by the first adaptation
            out[prefix + "easy_ratio"] = self._last_ratios["easy"]
            out[prefix + "hard_ratio"] = self._last_ratios["hard"]
        out[prefix + "tracked_prompts"] = float(len(self._records))
        if self._probes["explored"]:  # set once a probe exists (no NaN in the logs)
            out[prefix + "skip_precision"] = self._probes["explored_flat"] / self._probes["explored"]
        if self._probes["fresh"]:
            out[prefix + "fresh_flat_rate"] = self._probes["fresh_flat"] / self._probes["fresh"]
        if self._probes["explored"] and self._probes["fresh"]:
            out[prefix + "lift"] = self.lift
        out[prefix + "standing_down"] = float(self.standing_down)
        out[prefix + "evicted_total"] = float(self._evicted_total)
        return out
