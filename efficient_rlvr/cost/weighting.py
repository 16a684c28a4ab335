"""Importance-weighted GRPO loss for cost-aware minibatches (SPEC section 3), for every TRL 1.16 `loss_type`.

What must be weighted. The full-batch objective of one generation batch of N rollouts is, for every TRL loss type, a
sum of per-sequence terms with a normaliser that does not depend on which rollouts are in a minibatch (once chosen as
below):

    J = sum_i R_i / Z,      R_i = row reduction of rollout i's per-token loss (policy term + beta * KL term),

and the entropy bonus is a separate token mean of the same form. A minibatch drawn from p (with replacement) estimates J
without bias iff **every** per-sample term is multiplied by w_i = 1 / (N p_i) (`CostAwareSampler`):
E_p[w_i R_i] = (1/N) sum_i R_i. So the weight goes on the policy term, on the KL term (TRL adds beta * KL into the
per-token loss; an unweighted KL would estimate KL under p, i.e. over short, high-|A| rollouts) and on the entropy
bonus. `weighted_policy_loss` multiplies the per-sequence weight into the per-token loss before TRL's normalisation,
which does exactly that for all three when it is applied to TRL's final `per_token_loss` (after `+ beta * per_token_kl`)
and to the entropies.

Per loss type (read from `trl/trainer/grpo_trainer.py`, `GRPOTrainer._compute_loss`, TRL 1.16.0):

| loss_type            | TRL row reduction / normaliser (train)               | under sampling                            |
|----------------------|------------------------------------------------------|-------------------------------------------|
| grpo, sapo           | token-mean per row, mean over B rows, / GA           | unchanged (B x GA is fixed)               |
| luspo                | token-sum per row, mean over B rows, / GA            | unchanged                                 |
| dr_grpo              | token-sum / (B * max_completion_length), / GA        | unchanged                                 |
| dapo, cispo, vespo   | token-sum / (num_items_in_batch / P * GA / spg)      | unchanged, but num_items_in_batch must    |
|                      |                                                      | count the FULL generation batch's tokens  |
| bnpo                 | token-sum / tokens of this micro-batch, / GA         | micro-batch token count is sample-        |
|                      |                                                      | dependent: use the dapo normaliser        |

(GA = gradient accumulation steps, P = processes, spg = steps_per_generation, B = rows in the micro-batch.)
`num_items_in_batch` is computed by TRL from the whole generation batch in `_generate_and_score_completions`; keep that
value when the rows are replaced by a sample (recounting the sampled rows' tokens would make the denominator depend on
the draw: sampled minibatches are shorter on purpose, so the loss would be inflated by a draw-dependent factor, a
ratio estimator that is biased). With the usual shape (M = N draws split like TRL's batch) the dapo normaliser then
gives exactly the unbiased estimator (N / M_window) * sum_window w R / T_total of the full-batch token mean. For bnpo,
TRL divides by the micro-batch's own token count; under sampling that is biased the same way, so
`policy_loss_normalizer("bnpo", ..., sampled=True)` uses the expected count, i.e. the dapo normaliser, whose target is
the full batch's token mean. The entropy bonus is a bnpo-style token mean in TRL and is treated the same way.

Scaling the advantage instead (A_i -> w_i A_i, leaving TRL's `_compute_loss` alone) is exact for the *policy* term of
all eight types in TRL 1.16, because w_i > 0: the PPO clip (grpo/bnpo/dr_grpo/dapo/luspo) uses
-min(r * wA, clip(r) * wA) = -w * min(r * A, clip(r) * A) and its region depends only on sign(A); the optional
two-sided `delta` clamp does not involve A; cispo and vespo are linear in A (vespo's gamma weights and sapo's
temperatures depend only on sign(A)); the off-policy mask depends only on sign(A). (luspo shares the PPO branch in
1.16; a note written for 1.10 said otherwise, and `tests/test_cost.py` checks it against TRL's own code.) But that
route leaves the KL term and the entropy bonus unweighted and keeps bnpo's draw-dependent denominator, so
`check_objective(route="advantage")` refuses beta != 0, an entropy bonus, and bnpo.

Compatible as they are (each is a per-sequence or per-token factor that involves no other rollout): the off-policy
sequence mask, the vLLM importance-sampling correction, `delta`, and either `importance_sampling_level`.
Not weightable exactly: `top_entropy_quantile < 1` (TRL masks tokens below a quantile of the *micro-batch's* entropies,
so a rollout's term depends on which other rollouts were drawn). Caveat: rollouts with p_i = 0 (A_i = 0 when
alpha = 0) are never drawn, so their KL / entropy terms are missing from the estimate; their policy term is exactly
zero, so only the regularisers are affected; use alpha > 0 if beta != 0 or an entropy bonus matters.

How the trainer uses this module (`efficient_rlvr/cost/stage.py`, `CostAwareStage`). An earlier plan here was to
copy TRL's `_compute_loss` and swap its normalisation block for `weighted_policy_loss`; the stage instead takes the
advantage route above and calls TRL's own `_compute_loss` unchanged (no copy of TRL's code to keep in step with TRL):
each row's advantage is multiplied by its loss multiplier, and every normaliser difference is folded into that
multiplier, because each is one scalar per micro-batch: for bnpo, the micro-batch's own token count is swapped for
the sampled dapo normaliser (`policy_loss_normalizer('bnpo', ..., sampled=True)`). `num_items_in_batch` stays TRL's
count of the full batch. Two corrections to the earlier plan: with M != N draws the dapo normaliser must be scaled by
M / N (the stage puts N_+ / M into the multiplier, N_+ = rows with any loss token and p > 0, because its weights
are 1 / (N_+ p): re-centred by the constant N_+ / N, never by the draws' own mean, which would rescale the step by
~N / N_+ whenever A = 0 rows are pooled; SPEC 3 "Correction"), otherwise the objective shrinks by M / N; and the row-mean types (grpo, sapo, luspo, dr_grpo) divide by the micro-batch's row count, which
is unbiased for equal micro-batches and corrected by the multiplier otherwise. Consequently the stage refuses what
this route cannot weight (`check_objective(route="advantage")` minus the bnpo case it handles): beta != 0, an
entropy bonus, and top_entropy_quantile < 1. `weighted_policy_loss` / `policy_loss_normalizer` remain the reference
implementation (tests/test_cost.py checks unbiasedness with them) and the building blocks for a per-token-loss
route if KL or entropy terms must be weighted one day (with all weights 1 and `sampled=False` they reproduce TRL's
loss exactly, tested on TRL's own code).
"""

from __future__ import annotations

import torch

__all__ = [
    "SUPPORTED_LOSS_TYPES",
    "check_loss_type",
    "check_objective",
    "policy_loss_normalizer",
    "weighted_policy_loss",
]

SUPPORTED_LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
_ROW_MEAN_TYPES = ("grpo", "sapo")  # token-mean per sequence, then mean over sequences
_ROW_SUM_MEAN_TYPES = ("luspo",)  # token-sum per sequence, then mean over sequences
_GLOBAL_TOKEN_TYPES = ("dapo", "cispo", "vespo")  # token-sum over the micro-batch / generation-batch token count
_ADVANTAGE_ROUTES = ("loss", "advantage")


def check_loss_type(loss_type: str) -> str:
    """Return `loss_type` if cost-aware importance weights can be applied to it exactly, else raise ValueError."""
    if loss_type not in SUPPORTED_LOSS_TYPES:
        raise ValueError(
            f"loss_type {loss_type!r} is not supported by cost-aware sampling; supported (TRL 1.16 loss types whose "
            f"objective is a per-sequence sum that importance weights can reweight exactly): {SUPPORTED_LOSS_TYPES}."
        )
    return loss_type


def check_objective(
    loss_type: str,
    *,
    beta: float = 0.0,
    entropy_coef: float = 0.0,
    use_adaptive_entropy: bool = False,
    top_entropy_quantile: float = 1.0,
    alpha: float = 0.0,
    route: str = "loss",
) -> list[str]:
    """Check a GRPO configuration for cost-aware weighting; raise ValueError if it cannot be exact.

    Args:
        loss_type, beta, entropy_coef, use_adaptive_entropy, top_entropy_quantile: the `GRPOConfig` fields.
        alpha: the sampler's smoothing.
        route: "loss" (weights multiplied into the per-token loss, `weighted_policy_loss`) or "advantage" (advantages
            scaled by the weights, TRL's `_compute_loss` unchanged).

    Returns:
        Human-readable caveats (empty if none) for the caller to log.
    """
    check_loss_type(loss_type)
    if route not in _ADVANTAGE_ROUTES:
        raise ValueError(f"route must be one of {_ADVANTAGE_ROUTES}, got {route!r}.")
    if top_entropy_quantile < 1.0:
        raise ValueError(
            f"top_entropy_quantile={top_entropy_quantile} < 1 masks tokens by a quantile of the micro-batch's "
            "entropies, so a rollout's loss term depends on which other rollouts were drawn and importance weights "
            "cannot reweight it exactly; use top_entropy_quantile=1.0 with cost-aware sampling."
        )
    entropy_bonus = entropy_coef != 0.0 or use_adaptive_entropy
    if route == "advantage":
        if beta != 0.0:
            raise ValueError(
                f"route='advantage' scales only the policy term; with beta={beta} the KL term stays unweighted. "
                "Use route='loss' (weighted_policy_loss) or beta=0."
            )
        if entropy_bonus:
            raise ValueError(
                "route='advantage' leaves the entropy bonus unweighted; use route='loss' or entropy_coef=0 and "
                "use_adaptive_entropy=False."
            )
        if loss_type == "bnpo":
            raise ValueError(
                "route='advantage' keeps bnpo's per-micro-batch token count, which depends on the draw; use "
                "route='loss' with policy_loss_normalizer('bnpo', ..., sampled=True) or loss_type='dapo'."
            )
    caveats: list[str] = []
    if alpha == 0.0 and (beta != 0.0 or entropy_bonus):
        caveats.append(
            "alpha=0: zero-advantage rollouts are never drawn, so their KL/entropy terms are left out of the "
            "estimate (their policy term is zero anyway); set alpha > 0 for an unbiased regulariser."
        )
    if use_adaptive_entropy:
        caveats.append(
            "use_adaptive_entropy: the controller measures the mean entropy of the drawn (unweighted) tokens, "
            "which favours short, high-|A| rollouts."
        )
    return caveats


def policy_loss_normalizer(
    loss_type: str,
    mask: torch.Tensor,
    *,
    grad_accum_steps: int = 1,
    training: bool = True,
    num_items_in_batch: torch.Tensor | float | None = None,
    num_processes: int = 1,
    steps_per_generation: int = 1,
    max_completion_length: int | None = None,
    sampled: bool = False,
) -> torch.Tensor:
    """The denominator Z of `weighted_policy_loss` for `loss_type`, as TRL 1.16's `_compute_loss` computes it.

    Args:
        loss_type: one of `SUPPORTED_LOSS_TYPES`.
        mask: `[B, T]` loss mask of the micro-batch (B = its number of rows).
        grad_accum_steps: TRL's `current_gradient_accumulation_steps` (ignored when `training=False`).
        training: TRL's train mode (eval neither accumulates nor splits the generation batch).
        num_items_in_batch: loss tokens of the whole generation batch over all processes (TRL's input of that name);
            required for dapo/cispo/vespo and for bnpo with `sampled=True`. Under sampling it must count the full,
            unsampled batch.
        num_processes, steps_per_generation: as in TRL (dapo-style rescaling to one accumulation window).
        max_completion_length: required for dr_grpo.
        sampled: the micro-batch is a cost-aware sample; only changes bnpo (see the module docstring).

    Returns:
        0-dim float32 tensor on `mask`'s device.
    """
    check_loss_type(loss_type)
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, T], got shape {tuple(mask.shape)}.")
    device = mask.device
    rows = float(mask.size(0))
    accum = float(grad_accum_steps) if training else 1.0

    def _global_tokens() -> torch.Tensor:
        if num_items_in_batch is None:
            raise ValueError(
                f"loss_type {loss_type!r}{' (sampled)' if loss_type == 'bnpo' else ''} needs num_items_in_batch "
                "(tokens of the full generation batch over all processes)."
            )
        items = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=device).clamp(min=1.0)
        z = items / num_processes
        if training:
            z = z * grad_accum_steps / steps_per_generation
        return z

    if loss_type in _ROW_MEAN_TYPES or loss_type in _ROW_SUM_MEAN_TYPES:
        return torch.tensor(rows * accum, dtype=torch.float32, device=device)
    if loss_type == "dr_grpo":
        if max_completion_length is None or max_completion_length < 1:
            raise ValueError(f"dr_grpo needs max_completion_length >= 1, got {max_completion_length!r}.")
        return torch.tensor(rows * max_completion_length * accum, dtype=torch.float32, device=device)
    if loss_type in _GLOBAL_TOKEN_TYPES or (loss_type == "bnpo" and sampled):
        return _global_tokens()
    # bnpo, unsampled: TRL's own per-micro-batch token count
    return mask.float().sum().clamp(min=1.0) * accum


def weighted_policy_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor | None,
    loss_type: str,
    normalizer: torch.Tensor | float,
) -> torch.Tensor:
    """Scalar loss sum_b w_b R_b / Z with TRL's row reduction R_b for `loss_type`.

    R_b is the masked token mean of row b for grpo/sapo and the masked token sum otherwise; Z comes from
    `policy_loss_normalizer`. With all weights 1 this equals TRL 1.16's loss for `loss_type` (train or eval, as Z).

    Args:
        per_token_loss: `[B, T]` (or `[B, 1]`, broadcast over the mask like TRL) final per-token loss, i.e. after
            TRL adds `beta * per_token_kl`; or per-token entropies for the entropy bonus (use loss_type "bnpo").
        mask: `[B, T]` loss mask (0/1; bool/int/float).
        weights: `[B]` per-sequence importance weights (>= 0), or None for all ones.
        loss_type: one of `SUPPORTED_LOSS_TYPES`.
        normalizer: Z > 0 (python number or 0-dim tensor).

    Returns:
        0-dim float32 tensor (differentiable w.r.t. `per_token_loss`).
    """
    check_loss_type(loss_type)
    if mask.dim() != 2 or per_token_loss.dim() != 2 or per_token_loss.size(0) != mask.size(0):
        raise ValueError(
            f"per_token_loss and mask must be [B, T] (per_token_loss may be [B, 1]) with the same B, got "
            f"{tuple(per_token_loss.shape)} and {tuple(mask.shape)}."
        )
    if per_token_loss.size(1) not in (1, mask.size(1)):
        raise ValueError(f"per_token_loss has {per_token_loss.size(1)} columns, mask has {mask.size(1)}.")
    rows = mask.size(0)
    mask_f = mask.to(dtype=torch.float32)  # [B, T]
    masked = per_token_loss.to(torch.float32) * mask_f  # [B, T]
    if loss_type in _ROW_MEAN_TYPES:
        row_terms = masked.sum(dim=-1) / mask_f.sum(dim=-1).clamp(min=1.0)  # [B]
    else:
        row_terms = masked.sum(dim=-1)  # [B]
    if weights is not None:
        if weights.dim() != 1 or weights.numel() != rows:
            raise ValueError(f"weights must be [B] with B={rows}, got shape {tuple(weights.shape)}.")
        w = weights.detach().to(device=row_terms.device, dtype=torch.float32)  # [B]
        if not torch.isfinite(w).all() or (w < 0).any():
            raise ValueError("weights must be finite and >= 0.")
        row_terms = row_terms * w
    z = torch.as_tensor(normalizer, dtype=torch.float32, device=row_terms.device)
    if z.dim() != 0:
        raise ValueError(f"normalizer must be a scalar, got shape {tuple(z.shape)}.")
    if z.device.type == "cpu" and not (torch.isfinite(z) and z > 0):  # no host sync on accelerators
        raise ValueError(f"normalizer must be a positive finite scalar, got {normalizer!r}.")
    return row_terms.sum() / z
