"""Bad arguments get a clear error before anything runs: at enable() for the model and the
settings, at the module boundary for tensors handed to the engine."""

from __future__ import annotations

import pytest
import torch

import kvtier
from kvtier import _core

from conftest import make_gpt2, make_model


@pytest.mark.parametrize("mode", ["dense", "ClusterKV", "", None])
def test_unknown_mode(mode):
    model = make_model()
    with pytest.raises(ValueError, match="unknown mode"):
        kvtier.enable(model, mode=mode)
    # Nothing was switched.
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("budget", [0, -1, 1.5, "2048", True])
def test_budget_must_be_a_positive_token_count(budget):
    with pytest.raises(ValueError, match="budget must be a positive number of tokens"):
        kvtier.enable(make_model(), mode="clusterkv", budget=budget)


def test_unsupported_architecture():
    model = make_gpt2()
    with pytest.raises(
        ValueError, match="unsupported architecture.*GPT2Attention.*Llama, Mistral, Qwen2"
    ):
        kvtier.enable(model, mode="full")


def test_not_a_model():
    with pytest.raises(ValueError, match="expected a transformers model"):
        kvtier.enable(torch.nn.Linear(4, 4))


def test_unknown_option_is_a_type_error():
    with pytest.raises(TypeError, match="unknown option.*windw"):
        kvtier.enable(make_model(), windw=64)


def test_engine_options_are_validated_by_the_engine():
    # The engine's own validation runs at enable(), naming the field.
    with pytest.raises(ValueError, match="window_clusters"):
        kvtier.enable(make_model(), mode="clusterkv", window=8, window_clusters=16)


def test_head_dim_the_kernels_lack():
    with pytest.raises(ValueError, match="head_dim"):
        kvtier.enable(make_model(head_dim=32), mode="full")


def test_sliding_window_longer_context_is_refused():
    # Mistral attends a 4096-token window; kvtier attends everything, equal up to the window.
    model = make_model("mistral", sliding_window=256)
    with pytest.raises(ValueError, match="sliding window of 256"):
        kvtier.enable(model, mode="full", max_context=512)
    cache = kvtier.enable(model, mode="full")
    assert cache.settings.max_context == 256


# ---- the module boundary (kvtier._core) ----


def _engine(dtype="fp32", batch=2):
    c = _core.EngineConfig()
    c.num_layers, c.num_q_heads, c.num_kv_heads, c.head_dim = 2, 8, 2, 64
    c.dtype, c.backend, c.mode = dtype, "cpu", "full"
    c.host_bytes_limit = 1 << 28
    c.max_sequences = c.max_batch = batch
    c.max_context = 256
    e = _core.Engine(c)
    for seq in range(batch):
        e.add_sequence(seq)
    return e


def _decode_args(batch=2, dtype=torch.float32):
    q = torch.randn(batch, 8, 64, dtype=dtype)
    k = torch.randn(batch, 2, 64, dtype=dtype)
    v = torch.randn(batch, 2, 64, dtype=dtype)
    return q, k, v, torch.empty_like(q)


def test_decode_checks_shapes():
    e = _engine()
    q, k, v, out = _decode_args()
    with pytest.raises(ValueError, match=r"q: shape \[2, 4, 64\] does not match \[2, 8, 64\]"):
        e.decode_layer(0, [0, 1], q[:, :4].contiguous(), k, v, out)
    with pytest.raises(ValueError, match="k_new: expected 3 dimensions"):
        e.decode_layer(0, [0, 1], q, k[:, None], v, out)
    with pytest.raises(ValueError, match=r"out: shape \[2, 8, 64\] does not match \[1, 8, 64\]"):
        e.decode_layer(0, [0], q[:1], k[:1], v[:1], out)


def test_decode_checks_dtype():
    e = _engine()
    q, k, v, out = _decode_args(dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="q: dtype bfloat16 does not match the engine's fp32"):
        e.decode_layer(0, [0, 1], q, k, v, out)
    q, k, v, out = _decode_args()
    with pytest.raises(ValueError, match="v_new: dtype float64"):
        e.decode_layer(0, [0, 1], q, k, v.double(), out)


def test_decode_checks_layout():
    e = _engine()
    _, k, v, out = _decode_args()
    strided = torch.randn(8, 2, 64).transpose(0, 1)  # [2, 8, 64], not row-major
    with pytest.raises(ValueError, match="q: must be contiguous"):
        e.decode_layer(0, [0, 1], strided, k, v, out)


def test_decode_checks_the_device():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device to hold a tensor elsewhere than the engine")
    e = _engine()
    q, k, v, out = _decode_args()
    with pytest.raises(ValueError, match="not in host memory"):
        e.decode_layer(0, [0, 1], q.cuda(), k, v, out)


def test_prefill_checks_k_and_v():
    e = _engine()
    k = torch.randn(2, 10, 64)
    with pytest.raises(ValueError, match=r"k: shape \[3, 10, 64\] does not match \[2, \*, 64\]"):
        e.prefill_layer(0, 0, torch.randn(3, 10, 64), k)
    with pytest.raises(ValueError, match="k has 10 rows and v 9"):
        e.prefill_layer(0, 0, k, torch.randn(2, 9, 64))
    with pytest.raises(ValueError, match="same strides"):
        e.prefill_layer(0, 0, k, torch.randn(10, 2, 64).transpose(0, 1))
    with pytest.raises(
        ValueError, match=r"q_window: shape \[2, 4, 64\] does not match \[8, \*, 64\]"
    ):
        e.prefill_layer(0, 0, k, k.clone(), torch.randn(2, 4, 64))


def test_engine_errors_map_to_python_exceptions():
    e = _engine()
    with pytest.raises(KeyError, match="sequence 7"):
        e.remove_sequence(7)
    with pytest.raises(ValueError, match="already exists"):
        e.add_sequence(0)
    with pytest.raises(MemoryError, match="max_sequences"):
        e.add_sequence(9)
    k = torch.randn(2, 300, 64)
    with pytest.raises(MemoryError, match="max_context"):
        e.prefill_layer(0, 0, k, k.clone())
    e.close()
    assert e.closed
    for use in (e.end_step, e.stats, lambda: e.config, lambda: e.contains(0)):
        with pytest.raises(RuntimeError, match="closed"):
            use()


def test_strided_prefill_rows_are_read_in_place():
    # K/V of one sequence sliced out of HF's [B, H, T, D] layout (head stride T*D, row stride D)
    # and out of a token-major one: the engine stores the same rows either way.
    e = _engine(batch=2)
    kv = torch.randn(2, 2, 40, 64)  # [B, Hkv, T, D]
    token_major = (
        kv.transpose(1, 2).contiguous().transpose(1, 2)
    )  # same values, [B, T, H, D] memory
    e.prefill_layer(0, 0, kv[1, :, 5:], kv[1, :, 5:])
    e.prefill_layer(1, 0, token_major[1, :, 5:], token_major[1, :, 5:])
    assert e.sequence_length(0, 0) == e.sequence_length(1, 0) == 35
    # Attention of one query over the rows must agree between the two sequences.
    q = torch.randn(1, 8, 64).expand(2, 8, 64).contiguous()
    k_new = torch.randn(1, 2, 64).expand(2, 2, 64).contiguous()
    out = torch.empty_like(q)
    e.decode_layer(0, [0, 1], q, k_new, k_new, out)
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)
    # And equal dense attention over the 36 rows.
    keys = torch.cat([kv[1, :, 5:], k_new[0][:, None]], dim=1).repeat_interleave(4, dim=0)
    ref = torch.nn.functional.scaled_dot_product_attention(q[0][:, None], keys, keys)[:, 0]
    torch.testing.assert_close(out[0], ref, rtol=1e-5, atol=1e-5)
