"""Tiny randomly initialised models (no download) for the kvtier transformers tests.

The models are small enough for CPU CI (4 layers, hidden 256, GQA 8:2, head_dim 64) and are
initialised with a larger weight scale than transformers' default (initializer_range 0.02 makes
a random model repeat one token, whatever its attention reads), so the generated tokens vary
and depend on the context: an attention that read the wrong rows would change them.
"""

from __future__ import annotations

import os

# As kvtier does when imported first (kvtier/__init__.py): torch's OpenMP threads sleep between
# parallel regions instead of spinning, so the engine's CPU threads get the cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from kvtier import _core

VOCAB = 512
PAD = 0

_SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=1024,
    # No token ends a sequence early: every run generates the tokens asked for.
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=PAD,
)

_ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}


def make_model(
    arch: str = "llama", dtype=torch.float32, seed: int = 0, init: float = 0.1, **overrides
):
    config_cls, model_cls = _ARCHS[arch]
    torch.manual_seed(seed)
    config = config_cls(**{**_SHAPE, "initializer_range": init, **overrides})
    return model_cls(config).to(dtype).eval()


def make_gpt2():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=256, n_embd=128, n_layer=2, n_head=2)
    return GPT2LMHeadModel(config).eval()


def prompts(lengths, seed: int = 1):
    """Left-padded random prompts: input_ids and attention_mask of shape [len(lengths), max]."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(1, VOCAB, (n,), generator=gen)
        mask[row, width - n :] = 1
    return ids, mask


def generate(model, ids, mask, new_tokens, cache=None, **kwargs):
    """New tokens only, [batch, new_tokens]."""
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            past_key_values=cache,
            **({"do_sample": False} | kwargs),
        )
    return out[:, ids.shape[1] :]


def forced_logits(model, ids, tokens, cache):
    """Last-position logits of the prompt's forward and of each step fed `tokens` (teacher
    forcing: both caches see the same inputs whatever they would have picked)."""
    with torch.no_grad():
        logits = [model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0, -1]]
        for token in tokens[:-1]:
            step = model(input_ids=token.view(1, 1), past_key_values=cache, use_cache=True)
            logits.append(step.logits[0, -1])
    return torch.stack(logits).float()


def engine_takes(dtype: str) -> bool:
    """Whether the engine's CPU backend accepts K/V of `dtype` ("fp32", "bf16", ...)."""
    c = _core.EngineConfig()
    c.num_layers, c.num_q_heads, c.num_kv_heads, c.head_dim = 1, 8, 2, 64
    c.dtype, c.backend, c.host_bytes_limit = dtype, "cpu", 1 << 28
    try:
        c.validate()
    except ValueError as e:
        if "dtype" in str(e):
            return False
        raise
    return True


def needs_dtype(dtype: torch.dtype) -> None:
    """fp32 K/V on the CPU backend is new in the engine; until a build has it, the fp32 tests
    are expected failures rather than errors."""
    if dtype == torch.float32 and not engine_takes("fp32"):
        pytest.xfail("fp32 engine support pending")
