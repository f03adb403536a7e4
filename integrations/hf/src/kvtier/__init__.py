"""kvtier for transformers: the KV cache of a Llama, Mistral or Qwen2 model kept by kvtier's
CPU-GPU engine.

    cache = kvtier.enable(model, mode="clusterkv", budget=2048)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=256)

``enable`` switches the model's attention to kvtier's attention function and returns a
KvtierCache; pass a new one (``kvtier.KvtierCache(model, ...)`` or another ``enable``) to each
generate() call. Importing kvtier registers the "kvtier" attention implementation, so
``from_pretrained(..., attn_implementation="kvtier")`` works too.
"""

from __future__ import annotations

import os
import sys

# On the CPU backend the engine's oneTBB workers and torch's OpenMP threads take turns on the same
# cores, and OpenMP's threads spin after each parallel region by default: on a busy 2-core machine
# a CPU decode step of SmolLM2-135M took 1 to 7 s instead of 0.15 s. Imported before torch,
# kvtier asks OpenMP to sleep instead (unless OMP_WAIT_POLICY is set); imported after, it cannot.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from ._core import Engine, EngineConfig, EngineStats, built_with_cuda
from .attention import kvtier_attention_forward, register
from .cache import ATTN_IMPLEMENTATION, ENGINE_OPTIONS, MODES, KvtierCache, KvtierLayer

__version__ = "0.1.0"

__all__ = [
    "ATTN_IMPLEMENTATION",
    "ENGINE_OPTIONS",
    "MODES",
    "Engine",
    "EngineConfig",
    "EngineStats",
    "KvtierCache",
    "KvtierLayer",
    "built_with_cuda",
    "disable",
    "enable",
    "kvtier_attention_forward",
    "register",
]

register()


def enable(
    model: torch.nn.Module, mode: str = "clusterkv", budget: int = 2048, **options
) -> KvtierCache:
    """Switches `model` to kvtier attention and returns a KvtierCache for its next generate().

    Args:
        model: a Llama, Mistral or Qwen2 transformers model.
        mode: "full", "clusterkv", "clusterattn" or "hybrid".
        budget: tokens per KV head: recalled per step (clusterkv, hybrid) or kept at prefill
            (clusterattn, hybrid).
        **options: max_context, host_bytes_limit and the engine options in ENGINE_OPTIONS.

    Raises ValueError for an unknown mode, a budget <= 0 or an unsupported model, before
    anything about the model is changed.
    """
    cache = KvtierCache(model, mode=mode, budget=budget, **options)
    previous = model.config._attn_implementation
    if previous != ATTN_IMPLEMENTATION:
        model._kvtier_previous_attn_implementation = previous
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return cache


def disable(model: torch.nn.Module, attn_implementation: str | None = None) -> None:
    """Switches `model` back to a transformers attention implementation: `attn_implementation`,
    or the one it had before enable() (SDPA if it had none)."""
    if attn_implementation is None:
        attn_implementation = getattr(model, "_kvtier_previous_attn_implementation", None) or "sdpa"
    model.set_attn_implementation(attn_implementation)
