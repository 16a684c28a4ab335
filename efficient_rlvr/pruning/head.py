"""ARRoL quality head: predicts from a partial rollout's hidden state whether the finished rollout will be correct.

Algorithm (ARRoL, arXiv 2603.24840, section 4.2; SPEC section 2):

- Input: the policy's final-layer, post-norm hidden state of one position of a rollout, detached (no gradient ever
  reaches the policy).
- Model: ``Linear(hidden, 128) -> ReLU -> Linear(128, 1)``; the score is ``sigmoid(logit)`` in [0, 1].
- Training: online, binary cross-entropy against the finished rollout's correctness (``reward > threshold``), on the
  hidden states at generated length ``min(L_detect, len)`` and at the last token. Pruned rollouts have no label and
  are never used. The head has its own Adam optimizer (lr 0.01, as in the authors' scripts).

Position convention (used everywhere in :mod:`efficient_rlvr.pruning`): "the hidden state at generated length k" is
the state from which the policy sampled its k-th completion token, i.e. the state over the prompt plus the first
``k - 1`` completion tokens. The generation engine has it in the very step that emits token k, so a rollout can be
scored and aborted with exactly ``L_detect`` tokens and no extra forward pass. In a teacher-forced HF forward over
``prompt + completion`` it is ``hidden_states[-1][:, prompt_len + k - 2]`` (see :func:`hidden_state_positions`).
The paper does not pin this off-by-one down; this choice keeps training and pruning on the same positions.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["QualityHead", "QualityHeadTrainer", "hidden_state_positions", "roc_auc", "within_group_auc"]


def hidden_state_positions(prompt_len: int, completion_len: int, l_detect: int) -> tuple[int, int]:
    """Indices into a teacher-forced sequence ``prompt + completion`` of the two training positions of a rollout.

    Returns ``(detect_index, last_index)``: the positions of the hidden states at generated length
    ``min(l_detect, completion_len)`` and ``completion_len`` (see the module docstring for the convention).
    """
    if prompt_len < 1:
        raise ValueError(f"prompt_len must be >= 1, got {prompt_len}")
    if completion_len < 1:
        raise ValueError(f"completion_len must be >= 1, got {completion_len}")
    if l_detect < 1:
        raise ValueError(f"l_detect must be >= 1, got {l_detect}")
    return prompt_len + min(l_detect, completion_len) - 2, prompt_len + completion_len - 2


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` ``[N]`` for binary ``labels`` ``[N]`` (Mann-Whitney U / (n+ n-)).

    Tied scores count one half. NaN if either class is empty. Computed in float64 on CPU.
    """
    s = torch.as_tensor(scores).detach().reshape(-1).to("cpu", torch.float64)
    y = torch.as_tensor(labels).detach().reshape(-1).to("cpu").bool()
    if s.shape != y.shape:
        raise ValueError(f"scores and labels must have the same length, got {s.numel()} and {y.numel()}")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # average ranks (1-based) with ties sharing their mean rank
    order = torch.argsort(s, stable=True)
    sorted_s = s[order]
    ranks = torch.empty_like(s)
    ranks[order] = torch.arange(1, s.numel() + 1, dtype=torch.float64)
    _, inverse, counts = torch.unique_consecutive(sorted_s, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)  # last 1-based rank of each tie block
    mean_rank = ends - (counts.to(torch.float64) - 1) / 2  # [U]
    ranks[order] = mean_rank[inverse]
    u = ranks[y].sum().item() - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def within_group_auc(
    scores: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor | list
) -> tuple[float, float, int, list[float]]:
    """ROC AUC of ``scores`` among the rollouts of the same prompt: the mean over groups with both labels.

    A head that only knows prompt difficulty (which prompts are easy) scores ~0.5 here, however high its overall AUC.

    Args:
        scores: ``[N]`` scores (only their order within a group matters).
        labels: ``[N]`` binary labels.
        groups: ``[N]`` group ids (any hashable values), e.g. the prompt of each rollout.

    Returns:
        ``(mean, standard error over groups, number of mixed groups, per-group AUCs)``; NaN mean (and SE) without a
        mixed group, NaN SE with one.
    """
    s = torch.as_tensor(scores).detach().reshape(-1).to("cpu", torch.float64)
    y = torch.as_tensor(labels).detach().reshape(-1).to("cpu").bool()
    keys = groups.reshape(-1).tolist() if isinstance(groups, torch.Tensor) else list(groups)
    if not s.numel() == y.numel() == len(keys):
        raise ValueError(
            f"scores, labels and groups must have the same length, got {s.numel()}, {y.numel()}, {len(keys)}"
        )
    members: dict[Any, list[int]] = {}
    for i, key in enumerate(keys):
        members.setdefault(key, []).append(i)
    per_group = []
    for rows in members.values():
        index = torch.tensor(rows)
        auc = roc_auc(s[index], y[index])
        if auc == auc:  # both labels present
            per_group.append(auc)
    n = len(per_group)
    if n == 0:
        return float("nan"), float("nan"), 0, []
    mean = sum(per_group) / n
    se = (sum((a - mean) ** 2 for a in per_group) / (n - 1) / n) ** 0.5 if n > 1 else float("nan")
    return mean, se, n, per_group


class QualityHead(nn.Module):
    """Two-layer MLP scoring a hidden state: ``Linear(hidden, inner) -> ReLU -> Linear(inner, 1)``.

    ``forward`` returns logits; :meth:`score` returns ``sigmoid(logits)`` in float32. Inputs are detached and cast to
    the head's device and dtype, so states from a bf16 GPU engine can be scored by a float32 head anywhere.

    Args:
        hidden_size: width of the policy's hidden states (> 0).
        inner_size: width of the hidden layer (> 0; 128 in the paper).
        seed: if given, the weights are initialised from this seed without touching the global torch RNG.
    """

    def __init__(self, hidden_size: int, inner_size: int = 128, seed: int | None = None):
        super().__init__()
        if not isinstance(hidden_size, int) or hidden_size <= 0:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        if not isinstance(inner_size, int) or inner_size <= 0:
            raise ValueError(f"inner_size must be a positive int, got {inner_size!r}")
        self.hidden_size = hidden_size
        self.inner_size = inner_size
        if seed is None:
            self.net = nn.Sequential(nn.Linear(hidden_size, inner_size), nn.ReLU(), nn.Linear(inner_size, 1))
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.net = nn.Sequential(nn.Linear(hidden_size, inner_size), nn.ReLU(), nn.Linear(inner_size, 1))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Logits of ``hidden_states`` ``[..., H]`` -> ``[...]`` (in the head's dtype)."""
        if hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(
                f"expected hidden states of width {self.hidden_size}, got shape {tuple(hidden_states.shape)}"
            )
        weight = self.net[0].weight
        x = hidden_states.detach().to(device=weight.device, dtype=weight.dtype)  # [..., H]
        return self.net(x).squeeze(-1)  # [...]

    @torch.no_grad()
    def score(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Quality scores ``sigmoid(logit)`` in [0, 1], float32, on the head's device: ``[..., H] -> [...]``."""
        return torch.sigmoid(self.forward(hidden_states).float())


class QualityHeadTrainer:
    """Online BCE training of a :class:`QualityHead` with its own Adam optimizer.

    Each :meth:`observe` call is one training step of the policy: it takes the detect-position and last-token hidden
    states of the finished (not pruned) rollouts and their rewards, and runs ``updates_per_step`` Adam steps on the
    mean BCE over both positions (``2N`` examples). Loss and accuracy are measured before the update (out of sample:
    the head has not seen these rollouts), which is the "quality-head accuracy" the paper reports.

    Args:
        head: the :class:`QualityHead` to train (its parameters are updated in place).
        lr: Adam learning rate (> 0; 0.01 in the authors' scripts).
        reward_threshold: a rollout is positive when ``reward > reward_threshold``.
        updates_per_step: optimizer steps per :meth:`observe` call (>= 1).
        weight_decay: Adam weight decay (>= 0).
    """

    def __init__(
        self,
        head: QualityHead,
        lr: float = 0.01,
        reward_threshold: float = 0.5,
        updates_per_step: int = 1,
        weight_decay: float = 0.0,
    ):
        if not isinstance(head, QualityHead):
            raise ValueError(f"head must be a QualityHead, got {type(head).__name__}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not isinstance(updates_per_step, int) or updates_per_step < 1:
            raise ValueError(f"updates_per_step must be an int >= 1, got {updates_per_step!r}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.head = head
        self.lr = float(lr)
        self.reward_threshold = float(reward_threshold)
        self.updates_per_step = updates_per_step
        self.optimizer = torch.optim.Adam(head.parameters(), lr=self.lr, weight_decay=weight_decay)
        self.num_updates = 0
        self._last: dict[str, float] = {}

    def labels(self, rewards: torch.Tensor) -> torch.Tensor:
        """Binary labels ``rewards > reward_threshold`` as float32: ``[N] -> [N]``."""
        return (rewards.detach().float() > self.reward_threshold).float()

    def loss(self, hidden_states: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean BCE (float32) of the head on ``hidden_states`` ``[N, H]`` against ``labels`` ``[N]`` in {0, 1}."""
        logits = self.head(hidden_states).float()  # [N]
        return F.binary_cross_entropy_with_logits(logits, labels.to(device=logits.device, dtype=torch.float32))

    def observe(
        self, detect_states: torch.Tensor, last_states: torch.Tensor, rewards: torch.Tensor
    ) -> dict[str, float]:
        """One training step on finished rollouts.

        Args:
            detect_states: ``[N, H]`` hidden states at generated length ``min(L_detect, len)``.
            last_states: ``[N, H]`` hidden states at the last generated token.
            rewards: ``[N]`` rewards; labels are ``rewards > reward_threshold``.

        Returns:
            ``pruning/head_loss`` and ``pruning/head_accuracy`` (before the update, detect position for accuracy) and
            ``pruning/head_loss_after`` (after it); empty if ``N == 0``.
        """
        if detect_states.shape != last_states.shape or detect_states.dim() != 2:
            raise ValueError(
                f"detect_states and last_states must both be [N, H], got {tuple(detect_states.shape)} and "
                f"{tuple(last_states.shape)}"
            )
        if rewards.shape != detect_states.shape[:1]:
            raise ValueError(f"rewards must be [N]={detect_states.shape[0]}, got {tuple(rewards.shape)}")
        if detect_states.shape[0] == 0:
            return {}
        labels = self.labels(rewards)  # [N]
        states = torch.cat([detect_states.detach(), last_states.detach()], dim=0)  # [2N, H]
        targets = torch.cat([labels, labels], dim=0)  # [2N]
        with torch.no_grad():
            before = self.loss(states, targets).item()
            detect_pred = self.head(detect_states).float() > 0  # [N]
            accuracy = (detect_pred.cpu() == labels.bool().cpu()).float().mean().item()
        for _ in range(self.updates_per_step):
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.loss(states, targets)
            loss.backward()
            self.optimizer.step()
            self.num_updates += 1
        with torch.no_grad():
            after = self.loss(states, targets).item()
        self._last = {
            "pruning/head_loss": before,
            "pruning/head_loss_after": after,
            "pruning/head_accuracy": accuracy,
            "pruning/head_positive_fraction": labels.mean().item(),
        }
        return dict(self._last)

    def metrics(self) -> dict[str, float]:
        """Metrics of the last :meth:`observe` plus the number of optimizer updates so far."""
        return {**self._last, "pruning/head_updates": float(self.num_updates)}

    def state_dict(self) -> dict[str, Any]:
        """Head weights, optimizer state and counters: a snapshot (deep copy), torch.save-able."""
        return {
            "head": copy.deepcopy(self.head.state_dict()),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "num_updates": self.num_updates,
            "last_metrics": dict(self._last),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (copied: the state stays independent of this trainer)."""
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self.num_updates = int(state["num_updates"])
        self._last = dict(state.get("last_metrics", {}))
