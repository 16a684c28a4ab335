"""Candidate drawing for pre-rollout selection: an epoch-wise shuffled pool and GRESO-style accumulation.

`CandidatePool(dataset_size, seed)` yields dataset indices epoch after epoch; each epoch is a permutation of
range(dataset_size) drawn from numpy's generator seeded with (seed, epoch), so every process with the same seed
draws the same sequence, and the state is just (epoch, cursor). A draw that crosses an epoch boundary takes the rest
of one permutation and the head of the next (an index can then appear twice in that draw).

`gather_candidates` is the accumulation loop of GRESO: draw what is still missing, pass it through a stage-1
selector, repeat until `target` candidates survive. If a whole epoch's worth of draws (`max_draw`, default
max(dataset_size, target)) does not fill it, the pool is "dry" (nearly every prompt is being skipped): the result
says so, the pool counts it in its metrics, and by default the shortfall is topped up with skipped candidates in
draw order so that training keeps going with a full batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .base import Candidate, Selector


class CandidatePool:
    """Dataset indices without replacement within an epoch, reshuffled every epoch with the pool's own seed."""

    def __init__(self, dataset_size: int, seed: int = 0):
        if dataset_size < 1:
            raise ValueError(f"dataset_size must be >= 1, got {dataset_size}.")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}.")
        self.dataset_size = int(dataset_size)
        self.seed = int(seed)
        self._epoch = 0
        self._cursor = 0
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)
        self._drawn_total = 0
        self._dry_total = 0
        self._dry_window = 0
        self._dry_last = 0

    @property
    def epoch(self) -> int:
        """Index of the epoch the next draw starts in."""
        return self._epoch

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of epoch `epoch` (a permutation of range(dataset_size))."""
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.dataset_size)
            self._perm_epoch = epoch
        return self._perm

    def draw(self, n: int) -> list[int]:
        """The next `n` (>= 0) dataset indices."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}.")
        out: list[int] = []
        while len(out) < n:
            take = min(n - len(out), self.dataset_size - self._cursor)
            out.extend(self.permutation(self._epoch)[self._cursor : self._cursor + take].tolist())
            self._cursor += take
            if self._cursor == self.dataset_size:
                self._epoch += 1
                self._cursor = 0
        self._drawn_total += n
        return out

    def note_dry(self) -> None:
        """Record that selection could not fill a batch from a whole epoch's worth of draws."""
        self._dry_window += 1
        self._dry_total += 1

    def on_step_end(self) -> None:
        self._dry_last = self._dry_window
        self._dry_window = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "dataset_size": self.dataset_size,
            "seed": self.seed,
            "epoch": self._epoch,
            "cursor": self._cursor,
            "drawn_total": self._drawn_total,
            "dry_total": self._dry_total,
            "dry_window": self._dry_window,
            "dry_last": self._dry_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["dataset_size"] != self.dataset_size or state["seed"] != self.seed:
            raise ValueError(
                f"state is for dataset_size={state['dataset_size']}, seed={state['seed']}; this pool has "
                f"dataset_size={self.dataset_size}, seed={self.seed}."
            )
        self._epoch = int(state["epoch"])
        self._cursor = int(state["cursor"])
        self._drawn_total = int(state["drawn_total"])
        self._dry_total = int(state["dry_total"])
        self._dry_window = int(state["dry_window"])
        self._dry_last = int(state["dry_last"])

    def metrics(self) -> dict[str, float]:
        """`epoch` (fractional progress), `drawn_total`, `dry` (dry events in the last completed step) and
        `dry_total`, under `selection/pool/`."""
        return {
            "selection/pool/epoch": self._epoch + self._cursor / self.dataset_size,
            "selection/pool/drawn_total": float(self._drawn_total),
            "selection/pool/dry": float(self._dry_last),
            "selection/pool/dry_total": float(self._dry_total),
        }


@dataclass
class GatherResult:
    """What `gather_candidates` found: the candidates to pass on, how many indices it drew, whether the pool ran
    dry, and how many skipped candidates were added back to fill the target."""

    candidates: list[Candidate]
    drawn: int
    dry: bool
    topped_up: int


def gather_candidates(
    pool: CandidatePool,
    selector: Selector,
    make_candidate: Callable[[int], Candidate],
    target: int,
    max_draw: int | None = None,
    top_up: bool = True,
) -> GatherResult:
    """Draw from `pool` and filter with `selector` (a stage-1 selector, e.g. `HistorySampler`) until `target`
    candidates survive or `max_draw` indices were drawn (then the pool is dry; see the module docstring).

    `make_candidate(index)` builds the candidate of a dataset row (its key is usually `prompt_key(prompt)`).
    Topped-up candidates still count as skipped in the selector's own metrics; `topped_up` says how many there are.
    """
    if target < 0:
        raise ValueError(f"target must be >= 0, got {target}.")
    max_draw = max(pool.dataset_size, target) if max_draw is None else max_draw
    if max_draw < target:
        raise ValueError(f"max_draw must be >= target ({target}), got {max_draw}.")
    kept: list[Candidate] = []
    skipped: list[Candidate] = []
    drawn = 0
    while len(kept) < target and drawn < max_draw:
        n = min(target - len(kept), max_draw - drawn)
        batch = [make_candidate(index) for index in pool.draw(n)]
        drawn += n
        survivors = selector.select(batch)
        matched = 0  # selectors return survivors in input order: walk both lists once
        for candidate in batch:
            if matched < len(survivors) and survivors[matched] is candidate:
                matched += 1
            else:
                skipped.append(candidate)
        kept.extend(survivors)
    dry = len(kept) < target
    topped_up = 0
    if dry:
        pool.note_dry()
        if top_up:
            fill = skipped[: target - len(kept)]
            kept.extend(fill)
            topped_up = len(fill)
    return GatherResult(candidates=kept, drawn=drawn, dry=dry, topped_up=topped_up)
