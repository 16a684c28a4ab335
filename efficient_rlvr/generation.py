"""vLLM colocate generation that works on vLLM's CPU backend as well as on GPU.

TRL 1.16's `VLLMGeneration` is kept for everything (server mode, sleep mode, tensor parallelism, PEFT merging,
DeepSpeed/FSDP gathering); two things change in colocate mode:

1. Weight sync. TRL pushes each parameter through `model.load_weights(...)`. On vLLM-CPU this fails
   (`'Parameter' object has no attribute 'weight_loader'`: the CPU backend repacks Linear weights into its own GEMM
   kernels and drops the loader attributes). vLLM's in-place `model_runner.reload_weights(weights_iterator=...,
   is_checkpoint_format=True)` re-runs the checkpoint loader and the post-load processing (repacking included), so
   it is correct on both backends. With tied embeddings the CPU backend keeps a packed copy of `lm_head` that the
   reload does not refresh; it is re-packed here.
2. dtype. TRL builds `vllm.LLM` without a dtype, so vLLM-CPU samples in bfloat16 under a float32 trainer. The
   engine is built with the trainer's dtype (`EfficientGRPOConfig.vllm_dtype`).

What the colocate sync sends is what TRL 1.16 sends (`VLLMGeneration._iter_named_params`):

- Plain model: each parameter under its own name, gathered one at a time under DeepSpeed ZeRO-3
  (`deepspeed.zero.GatheredParameters` through TRL's `DistributedBackend.gather_params`) or FSDP.
- PEFT model (`peft_config`): every parameter gathered at once (ZeRO-3), the adapter merged into the base weights
  (`merge_adapter`), the base names restored (`base_model.model.` prefix and `.base_layer` removed; adapter
  tensors such as `lora_A`/`lora_B` skipped; `modules_to_save` copies sent under the original name, the frozen
  `original_module` skipped), then `unmerge_adapter`. One difference from TRL: the adapter stays merged until
  vLLM's reload has finished (TRL unmerges when its generator is exhausted, but vLLM finishes some layers after the
  last weight, e.g. vocabulary-padded embeddings, and would then read unmerged values), and it is unmerged in a
  `finally`, so an error during the reload cannot leave the merged delta in the trained weights.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from accelerate.utils import is_peft_model
from trl.generation import vllm_generation as _trl_vllm_generation
from trl.generation.vllm_generation import VLLMGeneration, empty_cache


@contextlib.contextmanager
def patched_attribute(owner: Any, name: str, value: Any) -> Iterator[None]:
    """Temporarily replace `owner.name` with `value` (restored on exit, also on error)."""
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def use_efficient_vllm_generation(vllm_dtype: str = "auto") -> contextlib.AbstractContextManager[None]:
    """Within this context, `trl.GRPOTrainer(...)` builds its vLLM backend as `EfficientVLLMGeneration`.

    `EfficientGRPOTrainer` always does this; the benchmark also builds vanilla `trl.GRPOTrainer` under it, so that
    its colocated vLLM can sync weights on the CPU backend (TRL's own sync fails there) and the comparison measures
    the methods, not the sync.
    """
    from trl.trainer import grpo_trainer

    factory = functools.partial(EfficientVLLMGeneration, vllm_dtype=vllm_dtype)
    return patched_attribute(grpo_trainer, "VLLMGeneration", factory)


def colocated_model_runner(llm: Any) -> Any:
    """The in-process model runner of a colocated `vllm.LLM` (v1 engine, `VLLM_ENABLE_V1_MULTIPROCESSING=0`)."""
    worker = llm.llm_engine.model_executor.driver_worker
    worker = getattr(worker, "worker", worker)  # WorkerWrapperBase wraps the real worker in some vLLM versions
    return worker.model_runner


class EfficientVLLMGeneration(VLLMGeneration):
    """`trl.generation.vllm_generation.VLLMGeneration` with a CPU-safe colocate weight sync and an explicit dtype.

    Written against TRL 1.16.0. Server mode and every other code path are inherited unchanged.
    """

    def __init__(self, *args: Any, vllm_dtype: str = "auto", **kwargs: Any):
        self.vllm_dtype = vllm_dtype
        super().__init__(*args, **kwargs)

    def _init_vllm(self) -> None:
        # Overrides TRL 1.16.0 `VLLMGeneration._init_vllm` only to pass `dtype` to the `LLM(...)` it builds.
        if self.mode != "colocate" or self.vllm_dtype == "auto":
            return super()._init_vllm()
        llm_with_dtype = functools.partial(_trl_vllm_generation.LLM, dtype=self.vllm_dtype)
        with patched_attribute(_trl_vllm_generation, "LLM", llm_with_dtype):
            super()._init_vllm()

    def sync_weights(self) -> None:
        # Overrides TRL 1.16.0 `VLLMGeneration.sync_weights`; the colocate branch reloads in place instead of
        # calling `model.load_weights` per parameter (see the module docstring).
        if self.mode != "colocate":
            return super().sync_weights()
        if self.enable_sleep_mode:
            empty_cache()
            self.llm.wake_up(tags=["weights"])
            self._llm_weights_sleeping = False
        runner = colocated_model_runner(self.llm)
        with self.vllm_weights() as weights:
            runner.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
        _repack_tied_cpu_lm_head(runner.get_model())
        self.llm.reset_prefix_cache()

    @contextlib.contextmanager
    def vllm_weights(self) -> Iterator[Iterable[tuple[str, torch.Tensor]]]:
        """`(vLLM name, full tensor)` of the policy's weights, valid until the context exits (module docstring).

        Every process must enter it and exhaust the iterator: under ZeRO-3/FSDP gathering is a collective. For a
        PEFT model the adapter is merged into the base weights for the whole context and unmerged on exit.
        """
        model = self.model
        if not is_peft_model(model):
            yield self._iter_named_params()  # TRL's own walk: per-parameter gathering, FSDP, name fixing
            return
        # Merging a sharded adapter is not supported: gather the whole model first (a no-op without ZeRO-3).
        with self._dist.gather_params(list(model.parameters())):
            model.merge_adapter()
            try:
                if self._dist.is_fsdp:
                    yield self._iter_fsdp_params(model)  # TRL's FSDP walk (fixes the PEFT names itself)
                else:
                    yield self._iter_merged_peft_params(model)
            finally:
                model.unmerge_adapter()

    def _iter_merged_peft_params(self, model: Any) -> Iterator[tuple[str, torch.Tensor]]:
        """The base-model parameters of a PEFT model whose adapter is merged, under the names vLLM loads."""
        adapter_prefix = model.prefix  # e.g. "lora_": the adapter's own tensors, already merged
        for name, param in model.named_parameters():
            if adapter_prefix in name or "original_module" in name:
                continue
            yield peft_name_to_vllm(name, self._fix_param_name_to_vllm), param.data


def peft_name_to_vllm(name: str, fix: Callable[[str], str] | None = None) -> str:
    """Name of a (merged) PEFT model parameter in the base checkpoint, as vLLM loads it.

    `base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight` -> `model.layers.0.self_attn.q_proj.weight`;
    `base_model.model.lm_head.modules_to_save.default.weight` -> `lm_head.weight`. `fix` (TRL's
    `_fix_param_name_to_vllm`) then removes wrapper prefixes such as activation checkpointing's.
    """
    name = name.removeprefix("base_model.model.").replace(".base_layer", "")
    if ".modules_to_save." in name:  # `<module>.modules_to_save.<adapter name>.<param>` -> `<module>.<param>`
        head, _, tail = name.partition(".modules_to_save.")
        name = f"{head}.{tail.partition('.')[2]}"
    return fix(name) if fix is not None else name


def _repack_tied_cpu_lm_head(model: torch.nn.Module) -> None:
    """Refresh vLLM-CPU's packed copy of a tied `lm_head` after its (shared) weight was reloaded in place."""
    config = getattr(model, "config", None)
    lm_head = getattr(model, "lm_head", None)
    if config is None or lm_head is None or not getattr(config, "tie_word_embeddings", False):
        return
    if not hasattr(lm_head, "cpu_linear") or lm_head.weight.device.type != "cpu":
        return
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    dispatch_cpu_unquantized_gemm(lm_head, remove_weight=False)
