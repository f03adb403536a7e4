"""The CUDA backend: models in fp16/bf16 on a GPU, and models spread over GPUs by a device_map
(one engine per device, each holding its device's layers). Skipped without a CUDA device or a
CUDA build; KVTIER_REQUIRE_GPU=1 turns those skips into failures, as in the C++ suite."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import DynamicCache

import kvtier

from conftest import forced_logits, generate, make_model, prompts

RECALL = dict(window=32, tokens_per_cluster=32)


def _need_gpus(count: int) -> None:
    why = None
    if not kvtier.built_with_cuda():
        why = "this kvtier build has no CUDA backend"
    elif torch.cuda.device_count() < count:
        why = f"needs {count} CUDA device(s), found {torch.cuda.device_count()}"
    if why:
        if os.environ.get("KVTIER_REQUIRE_GPU") == "1":
            pytest.fail(why)
        pytest.skip(why)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("mode", ["full", "clusterkv"])
def test_gpu_logits_follow_dynamic_cache(dtype, mode):
    # As on the CPU (test_generate.py): the same tokens through both caches, logits within a
    # few units of the dtype; attending the wrong rows moves them by several whole units.
    _need_gpus(1)
    model = make_model(dtype=dtype).cuda()
    ids, mask = prompts([200])
    ids, mask = ids.cuda(), mask.cuda()
    tokens = generate(model, ids, mask, 32)[0]
    ref = forced_logits(model, ids, tokens, DynamicCache(config=model.config))
    cache = kvtier.enable(model, mode=mode, budget=256, **RECALL)
    got = forced_logits(model, ids, tokens, cache)
    assert (got - ref).abs().max().item() <= 0.25
    assert list(cache.engines()) == ["cuda:0"]
    assert cache.engine_stats()["cuda:0"].steps == 31


@pytest.mark.parametrize("mode", kvtier.MODES)
def test_gpu_left_padded_batch_in_every_mode(mode):
    _need_gpus(1)
    model = make_model(dtype=torch.bfloat16).cuda()
    ids, mask = prompts([260, 120, 40])
    out = generate(
        model, ids.cuda(), mask.cuda(), 16, kvtier.enable(model, mode=mode, budget=64, **RECALL)
    )
    assert out.shape == (3, 16)
    assert ((out >= 0) & (out < model.config.vocab_size)).all()


def test_device_map_puts_each_layers_cache_on_its_device():
    _need_gpus(2)
    accelerate = pytest.importorskip("accelerate")
    model = make_model(dtype=torch.bfloat16)
    device_map = {
        "model.embed_tokens": 0,
        "model.rotary_emb": 0,
        "model.layers.0": 0,
        "model.layers.1": 0,
        "model.layers.2": 1,
        "model.layers.3": 1,
        "model.norm": 1,
        "lm_head": 1,
    }
    model = accelerate.dispatch_model(model, device_map=device_map)
    ids, mask = prompts([200])
    ids = ids.to("cuda:0")
    tokens = generate(model, ids, mask.to("cuda:0"), 24)[0]
    ref = forced_logits(model, ids, tokens, DynamicCache(config=model.config))
    cache = kvtier.enable(model, mode="clusterkv", budget=256, **RECALL)
    got = forced_logits(model, ids, tokens, cache)
    assert (got - ref.to(got.device)).abs().max().item() <= 0.25
    engines = cache.engines()
    assert sorted(engines) == ["cuda:0", "cuda:1"]
    # Each engine holds two layers; the model's two dense layers are both on cuda:0.
    assert engines["cuda:0"].config.num_layers == engines["cuda:1"].config.num_layers == 2
    assert engines["cuda:0"].config.num_dense_layers == 2
    assert engines["cuda:1"].config.num_dense_layers == 0
    for engine in engines.values():
        assert engine.stats().steps == 23
