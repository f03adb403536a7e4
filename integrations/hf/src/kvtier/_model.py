"""What kvtier needs to know about a transformers model: its attention layers and their shape.

kvtier serves the attention of Llama-style decoders: rotary positions applied to q and k before
the cache update, grouped-query attention with a 1/sqrt(head_dim) scale, and a module that calls
the attention function from ``config._attn_implementation`` with the cache's k and v. Llama,
Mistral and Qwen2 have exactly that module; other architectures are refused up front rather than
decoded wrongly.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch

#: Attention modules whose forward kvtier has been checked against (class name -> family).
SUPPORTED_ATTENTION = {
    "LlamaAttention": "Llama",
    "MistralAttention": "Mistral",
    "Qwen2Attention": "Qwen2",
}


@dataclass
class ModelSpec:
    """The attention layers of a model, in layer order."""

    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    max_positions: int | None
    #: Smallest sliding window of any layer (None: every layer attends the whole context).
    sliding_window: int | None
    modules: list  # weakref.ref to each layer's attention module, indexed by layer_idx

    def layer_devices(self) -> list[torch.device]:
        """The device each layer computes on now (so a model moved after enable() is followed)."""
        devices = []
        for idx, ref in enumerate(self.modules):
            module = ref()
            if module is None:
                raise RuntimeError("kvtier: the model this cache was made for no longer exists")
            devices.append(_module_device(module, idx))
        return devices

    def weight_dtype(self) -> torch.dtype:
        module = self.modules[0]()
        if module is None:
            raise RuntimeError("kvtier: the model this cache was made for no longer exists")
        return module.k_proj.weight.dtype


def _module_device(module: torch.nn.Module, idx: int) -> torch.device:
    # accelerate's hooks run a module whose weights are offloaded (meta) on an execution device.
    hook = getattr(module, "_hf_hook", None)
    if hook is not None and getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    weight = module.k_proj.weight
    if weight.device.type == "meta":
        raise ValueError(f"kvtier: layer {idx}'s weights are on the meta device (not loaded)")
    return weight.device


def inspect_model(model: torch.nn.Module) -> ModelSpec:
    """Finds the attention layers of `model` and checks that kvtier can serve them.

    Raises ValueError naming what is not supported.
    """
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise ValueError(
            f"kvtier: expected a transformers model (a torch.nn.Module with a config), "
            f"got {type(model).__name__}"
        )
    config = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    model_type = getattr(config, "model_type", "?")

    layers: dict[int, torch.nn.Module] = {}
    for module in model.modules():
        name = type(module).__name__
        if not name.endswith("Attention") or not hasattr(module, "layer_idx"):
            continue
        if name not in SUPPORTED_ATTENTION:
            raise ValueError(
                f"kvtier: unsupported architecture: model type '{model_type}' uses {name}; kvtier "
                f"supports the attention of {', '.join(sorted(set(SUPPORTED_ATTENTION.values())))} "
                f"models"
            )
        layers[int(module.layer_idx)] = module
    if not layers:
        raise ValueError(
            f"kvtier: unsupported architecture: no attention layers found in "
            f"{type(model).__name__} (model type '{model_type}'); kvtier supports "
            f"{', '.join(sorted(set(SUPPORTED_ATTENTION.values())))} models"
        )
    num_layers = len(layers)
    if sorted(layers) != list(range(num_layers)):
        raise ValueError(
            f"kvtier: attention layer indices {sorted(layers)} are not 0..{num_layers - 1}"
        )

    first = layers[0]
    head_dim = int(first.head_dim)
    num_q_heads = int(config.num_attention_heads)
    num_kv_heads = int(getattr(config, "num_key_value_heads", None) or num_q_heads)
    if num_q_heads % num_kv_heads:
        raise ValueError(
            f"kvtier: {num_q_heads} query heads are not a multiple of {num_kv_heads} KV heads"
        )
    windows = []
    for idx, module in layers.items():
        if int(module.head_dim) != head_dim:
            raise ValueError(
                f"kvtier: layer {idx} has head_dim {module.head_dim}, layer 0 {head_dim}"
            )
        scaling = float(getattr(module, "scaling", head_dim**-0.5))
        if not math.isclose(scaling, head_dim**-0.5, rel_tol=1e-6):
            raise ValueError(
                f"kvtier: layer {idx} scales attention logits by {scaling}; the engine applies "
                f"1/sqrt(head_dim) = {head_dim**-0.5}"
            )
        # Qwen2 sets a per-layer window (None for full layers); Mistral's is in the config.
        if hasattr(module, "sliding_window"):
            window = module.sliding_window
        else:
            window = getattr(module.config, "sliding_window", None)
        if window is not None:
            windows.append(int(window))

    return ModelSpec(
        num_layers=num_layers,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        max_positions=getattr(config, "max_position_embeddings", None),
        sliding_window=min(windows) if windows else None,
        modules=[weakref.ref(layers[i]) for i in range(num_layers)],
    )
