"""The kvtier attention function, registered with transformers' AttentionInterface.

A model whose ``config._attn_implementation`` is "kvtier" calls ``kvtier_attention_forward``
from every attention layer. With a KvtierCache the function hands the layer's query, keys and
values to the engine (see cache.py for who does what); without one (``use_cache=False``, or a
DynamicCache) it is plain SDPA, so switching a model to kvtier changes nothing else it does.

The same name is registered with AttentionMaskInterface as SDPA's mask builder: the masks are
boolean (True = attend) or None when no padding needs masking, which is what SDPA takes at
prefill and what the cache reads the left padding from.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .cache import ATTN_IMPLEMENTATION, KvtierLayer


def kvtier_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query [B, Hq, T, D]; key, value [B, Hkv, T, D] as the cache's update returned them.
    Returns the attention output as [B, T, Hq, D] (and no weights)."""
    layer: KvtierLayer | None = getattr(key, "_kvtier_layer", None)
    if layer is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    layer.pending = False
    if dropout:
        raise ValueError("kvtier: attention dropout is not supported (call model.eval())")
    if not layer.prefilled:
        # The prompt: dense attention here, its rows to the engine for the steps to come.
        out, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=0.0, scaling=scaling, **kwargs
        )
        layer.cache._prefill_layer(layer, query, key, value, attention_mask)
        # KvtierCache.prefill() runs one sequence at a time and marks the layers itself.
        layer.prefilled = layer.cache._row_prefill is None
        return out, None
    if query.shape[2] != 1:
        raise ValueError(
            f"kvtier: after the prompt the engine takes one token per sequence and step, got "
            f"{query.shape[2]}: use a new KvtierCache (or cache.reset()) for a new prompt; "
            f"assisted and speculative decoding are not supported"
        )
    return layer.cache._decode_layer(layer, query, key, value), None


def register() -> None:
    """Registers "kvtier" with AttentionInterface and AttentionMaskInterface (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, kvtier_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
