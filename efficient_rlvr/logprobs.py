"""A generation batch's old-log-prob pass run on the rows that can reach the loss only.

TRL 1.16 `GRPOTrainer._generate_and_score_completions` runs the policy over every rollout of a generation batch,
without gradients, for ``old_per_token_logps`` (the vLLM importance-sampling correction needs them) before any
batch stage sees the batch. Rows that a stage will drop before the loss (pruned rollouts, zero-advantage rows) do not
need that pass. `PartialLogprobPass` temporarily wraps ``trainer._get_per_token_logps_and_entropies`` so that the one
no-grad call on exactly this generation's rows (checked token by token) runs the model on the other rows only; a
skipped row gets its vLLM sampling log-probs as "old" log-probs (importance ratio exactly 1) and zero entropies. Any
other call (with grad, other rows, multimodal inputs) goes to the original method unchanged. The owner removes the
wrapper before the loss (`remove`), so no training forward pass ever sees it. The rows it does run go through the
model sorted by length, in chunks of the call's ``batch_size``, each chunk without its trailing all-padding
completion columns (as `efficient_rlvr.batch.pack_rows_by_length` packs the loss's micro-batches); their log-probs
past their own tokens are 0, positions TRL reads only under the completion mask. When every row is skipped, no
forward runs. Use it only where `partial_pass_allowed` (not under ZeRO-3 / FSDP with several processes).

The filled values reach only rows that a stage drops before the loss. TRL's logged importance-sampling metrics
(``sampling/*``) include a skipped row's tokens with a log-prob difference of 0 (unless masked already, e.g. a pruned
row under ``mask_truncated_completions``).
"""

from __future__ import annotations

from typing import Any

import torch

LOGPS_METHOD = "_get_per_token_logps_and_entropies"


def partial_pass_allowed(trainer: Any) -> bool:
    """Whether a pass over fewer rows (or chunks) than TRL's is safe here: not under ZeRO-3 / FSDP with several
    processes, where every forward is a collective and each process must run the same number of them."""
    if trainer.accelerator.num_processes == 1:
        return True
    if getattr(trainer, "is_fsdp_enabled", False):
        return False
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return not (getattr(trainer, "is_deepspeed_enabled", False) and plugin is not None and plugin.zero_stage == 3)


class PartialLogprobPass:
    """Wraps ``trainer._get_per_token_logps_and_entropies`` for one generation batch (module docstring).

    Args:
        trainer: the trainer whose method is wrapped (set as an instance attribute; `remove` restores it).
        completion_ids: this process's completions, one token list per row, in generation order.
        fill_logps: per row, the values a skipped row gets (its sampling log-probs; NaN where vLLM gave none).
        skip: per row, True = not run through the model.
    """

    def __init__(self, trainer: Any, completion_ids: list[list[int]], fill_logps: list[list[float]], skip: list[bool]):
        if not len(completion_ids) == len(fill_logps) == len(skip):
            raise ValueError(
                f"PartialLogprobPass: completion_ids, fill_logps and skip need one entry per row, got "
                f"{len(completion_ids)}, {len(fill_logps)} and {len(skip)}"
            )
        self.trainer = trainer
        self.completion_ids = completion_ids
        self.fill_logps = fill_logps
        self.skip = torch.tensor(skip, dtype=torch.bool)  # [N]
        self.calls = 0
        self._had_attribute = LOGPS_METHOD in vars(trainer)
        self._saved = vars(trainer).get(LOGPS_METHOD)
        self._original = getattr(trainer, LOGPS_METHOD)
        setattr(trainer, LOGPS_METHOD, self)

    @property
    def rows_skipped(self) -> int:
        """Rows left out of the model so far (0 until the matching call ran)."""
        return int(self.skip.sum()) * self.calls

    def remove(self) -> None:
        """Restore the trainer's method exactly as it was."""
        if self._had_attribute:
            setattr(self.trainer, LOGPS_METHOD, self._saved)
        elif LOGPS_METHOD in vars(self.trainer):
            delattr(self.trainer, LOGPS_METHOD)

    def _matches(self, input_ids: torch.Tensor, logits_to_keep: int, extra: dict[str, Any]) -> bool:
        if torch.is_grad_enabled() or any(v is not None for v in extra.values()):
            return False
        n = len(self.completion_ids)
        if input_ids.dim() != 2 or input_ids.shape[0] != n or logits_to_keep > input_ids.shape[1]:
            return False
        if any(len(c) > logits_to_keep for c in self.completion_ids):
            return False
        tail = input_ids[:, input_ids.shape[1] - logits_to_keep :].cpu()  # [N, C]
        return all(tail[i, : len(c)].tolist() == list(c) for i, c in enumerate(self.completion_ids))

    def __call__(
        self,
        model: Any,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        logits_to_keep: int,
        batch_size: int | None = None,
        compute_entropy: bool = False,
        compute_aux_loss: bool = False,
        **extra: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        kwargs = {"batch_size": batch_size, "compute_entropy": compute_entropy, "compute_aux_loss": compute_aux_loss}
        if not bool(self.skip.any()) or not self._matches(input_ids, logits_to_keep, extra):
            return self._original(model, input_ids, attention_mask, logits_to_keep, **kwargs, **extra)
        if bool(self.skip.all()) and compute_aux_loss:
            return self._original(model, input_ids, attention_mask, logits_to_keep, **kwargs, **extra)
        kept = torch.nonzero(~self.skip).flatten().to(input_ids.device)  # [K]
        if kept.numel() == 0:  # every row skipped: no forward at all
            logps, entropies, aux = torch.zeros(0, logits_to_keep, device=input_ids.device), None, None
        elif compute_aux_loss:  # one aux value per call: keep the kept rows in one call
            logps, entropies, aux = self._original(
                model, input_ids[kept], attention_mask[kept], logits_to_keep, **kwargs, **extra
            )  # [K, C]
        else:
            logps, entropies = self._packed(model, input_ids[kept], attention_mask[kept], logits_to_keep, kwargs)
            aux = None
        n = input_ids.shape[0]
        full = torch.zeros(n, logits_to_keep, dtype=logps.dtype)  # [N, C]
        for i in torch.nonzero(self.skip).flatten().tolist():
            row = self.fill_logps[i][:logits_to_keep]
            full[i, : len(row)] = torch.tensor(row, dtype=logps.dtype)
        full = full.to(logps.device)
        full[kept] = logps
        full_entropies = None
        if entropies is not None or (compute_entropy and kept.numel() == 0):
            like = entropies if entropies is not None else full
            full_entropies = torch.zeros(n, logits_to_keep, dtype=like.dtype, device=like.device)
            if entropies is not None:
                full_entropies[kept] = entropies
        self.calls += 1
        return full, full_entropies, aux

    def _packed(
        self,
        model: Any,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        logits_to_keep: int,
        kwargs: dict[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The original pass over rows sorted by length in chunks of ``batch_size``, each without its trailing
        all-padding completion columns (exact for any causal model); ``[K, C]`` results in the rows' order, 0 at the
        trimmed (masked) positions, which TRL reads only under the completion mask."""
        k, width = input_ids.shape
        P = width - logits_to_keep
        order = torch.sort(attention_mask.sum(dim=1).cpu(), stable=True).indices  # [K] shortest first
        size = kwargs.get("batch_size") or k
        logps = entropies = None
        for start in range(0, k, size):
            rows = order[start : start + size].to(input_ids.device)
            mask = attention_mask[rows]  # [b, P + C]
            used = mask[:, P:].bool().any(dim=0)  # [C]
            last = int(used.nonzero()[-1]) + 1 if bool(used.any()) else 1
            chunk_logps, chunk_entropies, _ = self._original(
                model, input_ids[rows, : P + last], mask[:, : P + last], last, **{**kwargs, "batch_size": size}
            )  # [b, last]
            if logps is None:
                logps = chunk_logps.new_zeros(k, logits_to_keep)
                if chunk_entropies is not None:
                    entropies = chunk_entropies.new_zeros(k, logits_to_keep)
            logps[rows, :last] = chunk_logps
            if entropies is not None and chunk_entropies is not None:
                entropies[rows, :last] = chunk_entropies
        return logps, entropies
