"""model.generate with a KvtierCache on the CPU, against transformers' own DynamicCache.

Mode full attends every row, and so does clusterkv when its budget covers the context: both must
give the tokens of DynamicCache (SDPA) under greedy decoding. In fp32 they do, token for token.
In bf16 the engine computes attention in fp32 and rounds the output once, while SDPA's CPU
kernel also rounds the softmax weights to bf16 before multiplying them with V; the logits then
differ by a few bf16 units, and a random model's greedy choice is often within that of a tie
(bf16 logits have 8 significant bits), so bf16 token equality is a matter of luck. The bf16 test
feeds both caches the same tokens and bounds the logit difference instead: an attention that
read wrong rows moves logits by several units, a rounding difference by a few hundredths.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import kvtier

from conftest import forced_logits, generate, make_model, needs_dtype, prompts

#: clusterkv options that make the tiny test contexts exercise recall: prompt rows past the sink
#: are clustered in windows of 32 (the default 256 would leave them all in the window ring).
RECALL = dict(window=32, tokens_per_cluster=32)


def test_the_test_model_depends_on_its_context():
    # Otherwise an attention that read the wrong rows could pass the tests below.
    model = make_model()
    ids, mask = prompts([200])
    full = generate(model, ids, mask, 24)
    recent = generate(model, ids[:, 100:], mask[:, 100:], 24)
    assert len(set(full[0].tolist())) >= 12
    assert not torch.equal(full, recent)


@pytest.mark.parametrize(
    "shape",
    [
        {},  # GQA 8:2, head_dim 64
        {"num_key_value_heads": 8},  # MHA
        {"head_dim": 128, "num_attention_heads": 4, "num_key_value_heads": 1},  # MQA, head_dim 128
    ],
    ids=["gqa", "mha", "mqa-d128"],
)
def test_full_mode_generates_the_tokens_of_dynamic_cache(shape):
    needs_dtype(torch.float32)
    model = make_model(**shape)
    ids, mask = prompts([200])
    ref = generate(model, ids, mask, 32)
    assert len(set(ref[0].tolist())) >= 8
    cache = kvtier.enable(model, mode="full", budget=2048)
    out = generate(model, ids, mask, 32, cache)
    assert out.tolist() == ref.tolist()
    # The first new token comes from the prompt's forward; each later one is an engine step.
    stats = cache.engine_stats()["cpu"]
    assert stats.steps == 31
    assert stats.decode_layer_calls == 31 * 4
    assert cache.get_seq_length() == 200 + 31


def test_clusterkv_with_a_budget_covering_the_context_equals_dynamic_cache():
    needs_dtype(torch.float32)
    model = make_model()
    ids, mask = prompts([200])
    ref = generate(model, ids, mask, 32)
    cache = kvtier.enable(model, mode="clusterkv", budget=256, **RECALL)
    out = generate(model, ids, mask, 32, cache)
    assert out.tolist() == ref.tolist()
    stats = cache.engine_stats()["cpu"]
    # Recall really ran: clusters were selected and read, and decoded rows were clustered.
    assert stats.recall_hits + stats.recall_misses > 0
    assert stats.window_clusterings > 0


@pytest.mark.parametrize("mode", ["full", "clusterkv"])
def test_bf16_logits_follow_dynamic_cache_within_rounding(mode):
    model = make_model(dtype=torch.bfloat16)
    ids, mask = prompts([200])
    tokens = generate(model, ids, mask, 32)[0]
    ref = forced_logits(model, ids, tokens, DynamicCache(config=model.config))
    cache = kvtier.enable(model, mode=mode, budget=256, **RECALL)
    got = forced_logits(model, ids, tokens, cache)
    # Logits here reach about 7 (bf16 unit 1/32): seen differences are up to 0.15; attending
    # without the prompt's first half moves them by about 8.
    tol = 0.25
    assert (got - ref).abs().max().item() <= tol
    # Hence the greedy token is the same wherever DynamicCache's choice is not within 2 tol of
    # a tie; say so directly as well.
    top = ref.topk(2, dim=-1).values
    clear = top[:, 0] - top[:, 1] > 2 * tol
    assert clear.sum() >= 8
    assert torch.equal(got.argmax(-1)[clear], ref.argmax(-1)[clear])
    assert cache.engine_stats()["cpu"].steps == 31


@pytest.mark.parametrize("mode", ["full", "clusterkv"])
def test_left_padded_batch_equals_dynamic_cache(mode):
    needs_dtype(torch.float32)
    model = make_model()
    ids, mask = prompts([300, 180, 40])
    ref = generate(model, ids, mask, 24)
    cache = kvtier.enable(model, mode=mode, budget=1024, **RECALL)
    out = generate(model, ids, mask, 24, cache)
    assert out.tolist() == ref.tolist()
    # Padding is skipped: each row's engine rows are its own tokens only.
    engine = cache.engines()["cpu"]
    for row, n in enumerate([300, 180, 40]):
        assert engine.sequence_length(row, 3) == n + 23


@pytest.mark.parametrize("mode", ["full", "clusterkv"])
def test_prefill_one_sequence_at_a_time_then_generate_equals_dynamic_cache(mode):
    # cache.prefill() runs each prompt alone (no padding); generate then continues the batch.
    needs_dtype(torch.float32)
    model = make_model()
    lengths = [300, 180, 40]
    ids, mask = prompts(lengths)
    ref = generate(model, ids, mask, 24)
    cache = kvtier.enable(model, mode=mode, budget=1024, **RECALL)
    cache.prefill(model, ids, mask)
    assert cache.get_seq_length() == ids.shape[1] - 1
    engine = cache.engines()["cpu"]
    for row, n in enumerate(lengths):
        assert engine.sequence_length(row, 3) == n - 1
    out = generate(model, ids, mask, 24, cache)
    assert out.tolist() == ref.tolist()
    for row, n in enumerate(lengths):
        assert engine.sequence_length(row, 3) == n + 23
    # Every token after the prefill, the prompts' last included, was one engine step.
    assert cache.engine_stats()["cpu"].steps == 24


@pytest.mark.parametrize("mode", ["clusterattn", "hybrid"])
def test_prefill_one_sequence_at_a_time_in_the_prefill_modes(mode):
    needs_dtype(torch.float32)
    model = make_model()
    ids, mask = prompts([300, 120])
    cache = kvtier.enable(model, mode=mode, budget=64, **RECALL)
    cache.prefill(model, ids, mask)
    out = generate(model, ids, mask, 12, cache)
    assert out.shape == (2, 12)
    assert cache.engine_stats()["cpu"].steps == 12


def test_prefill_refuses_bad_prompts_and_a_used_cache():
    needs_dtype(torch.float32)
    model = make_model()
    cache = kvtier.enable(model, mode="full", budget=64)
    ids, mask = prompts([20, 10])
    with pytest.raises(ValueError, match="left-padded"):
        cache.prefill(model, ids, mask.flip(-1))
    with pytest.raises(ValueError, match="at least 2 real tokens"):
        cache.prefill(model, *prompts([20, 1]))
    cache.prefill(model, ids, mask)
    with pytest.raises(ValueError, match="empty cache"):
        cache.prefill(model, ids, mask)
    cache.reset()
    kvtier.disable(model)
    with pytest.raises(RuntimeError, match="kvtier.enable"):
        cache.prefill(model, ids, mask)
    assert cache.get_seq_length() == 0


def test_a_row_of_the_batch_decodes_as_it_would_alone():
    needs_dtype(torch.float32)
    model = make_model()
    lengths = [150, 60]
    ids, mask = prompts(lengths)
    batch = generate(
        model, ids, mask, 16, kvtier.enable(model, mode="clusterkv", budget=512, **RECALL)
    )
    width = ids.shape[1]
    for row, n in enumerate(lengths):
        alone_ids, alone_mask = ids[row : row + 1, width - n :], mask[row : row + 1, width - n :]
        alone = generate(
            model,
            alone_ids,
            alone_mask,
            16,
            kvtier.enable(model, mode="clusterkv", budget=512, **RECALL),
        )
        assert alone[0].tolist() == batch[row].tolist()


@pytest.mark.parametrize("mode", kvtier.MODES)
@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampling"])
def test_generate_with_every_mode(mode, sampling):
    # A small budget: clusterkv recalls part of the context, clusterattn and hybrid drop or
    # offload most of the prompt. The tokens may differ from dense attention but every step
    # must run through the engine.
    needs_dtype(torch.float32)
    model = make_model()
    ids, mask = prompts([260, 120])
    cache = kvtier.enable(model, mode=mode, budget=64, **RECALL)
    kwargs = dict(do_sample=True, top_k=50, temperature=0.8) if sampling else {}
    torch.manual_seed(5)
    out = generate(model, ids, mask, 20, cache, **kwargs)
    assert out.shape == (2, 20)
    assert ((out >= 0) & (out < model.config.vocab_size)).all()
    stats = cache.engine_stats()["cpu"]
    assert stats.steps == 19
    assert stats.decode_layer_calls == 19 * 4
    # Rows read by attention: all of them in mode full (4 layers x 2 KV heads, each sequence's
    # rows after the step's append); fewer in the other modes, which keep or recall a budget.
    dense_rows = 4 * 2 * sum(n + step + 1 for n in (260, 120) for step in range(19))
    if mode == "full":
        assert stats.rows_attended == dense_rows
    else:
        assert stats.rows_attended < dense_rows
    assert cache.get_seq_length() == 260 + 19


def test_sampling_in_full_mode_matches_dynamic_cache():
    needs_dtype(torch.float32)
    model = make_model()
    ids, mask = prompts([200, 90])
    kwargs = dict(do_sample=True, top_k=0, top_p=1.0, temperature=1.0)
    torch.manual_seed(11)
    ref = generate(model, ids, mask, 24, **kwargs)
    cache = kvtier.enable(model, mode="full", budget=2048)
    torch.manual_seed(11)
    out = generate(model, ids, mask, 24, cache, **kwargs)
    assert out.tolist() == ref.tolist()


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_mistral_and_qwen2_full_mode_equal_dynamic_cache(arch):
    needs_dtype(torch.float32)
    model = make_model(arch)
    ids, mask = prompts([180, 70])
    ref = generate(model, ids, mask, 24)
    out = generate(model, ids, mask, 24, kvtier.enable(model, mode="full", budget=2048))
    assert out.tolist() == ref.tolist()


def test_bf16_batch_in_every_mode_runs():
    model = make_model(dtype=torch.bfloat16)
    ids, mask = prompts([220, 100, 33])
    for mode in kvtier.MODES:
        cache = kvtier.enable(model, mode=mode, budget=64, **RECALL)
        out = generate(model, ids, mask, 12, cache)
        assert out.shape == (3, 12)
        assert cache.engine_stats()["cpu"].steps == 11


def test_kvtier_attention_without_a_kvtier_cache_is_sdpa():
    # enable() switches the attention function; a generate without the cache (DynamicCache)
    # or without any cache still decodes exactly as before.
    needs_dtype(torch.float32)
    model = make_model()
    ids, mask = prompts([120, 64])
    ref = generate(model, ids, mask, 16)
    kvtier.enable(model, mode="clusterkv", budget=64)
    assert model.config._attn_implementation == kvtier.ATTN_IMPLEMENTATION
    assert generate(model, ids, mask, 16).tolist() == ref.tolist()
    assert generate(model, ids, mask, 16, use_cache=False).tolist() == ref.tolist()
    kvtier.disable(model)
    assert model.config._attn_implementation == "sdpa"


def test_reset_lets_a_cache_serve_a_new_prompt():
    needs_dtype(torch.float32)
    model = make_model()
    ids_a, mask_a = prompts([150], seed=3)
    ids_b, mask_b = prompts([90, 40], seed=4)
    ref_b = generate(model, ids_b, mask_b, 12)
    cache = kvtier.enable(model, mode="full", budget=2048)
    generate(model, ids_a, mask_a, 12, cache)
    cache.reset()
    assert cache.get_seq_length() == 0 and not cache.engines()
    assert generate(model, ids_b, mask_b, 12, cache).tolist() == ref_b.tolist()


def test_a_kvtier_cache_with_another_attention_is_refused():
    # Without the kvtier attention function the engine never sees K/V: the next update says so
    # instead of decoding from an empty cache.
    needs_dtype(torch.float32)
    model = make_model()
    ids, mask = prompts([50])
    cache = kvtier.KvtierCache(model, mode="full", budget=2048)
    with pytest.raises(RuntimeError, match="did not run through kvtier"):
        generate(model, ids, mask, 4, cache)


def test_right_padding_is_refused():
    needs_dtype(torch.float32)
    model = make_model()
    ids, mask = prompts([40, 20])
    ids, mask = ids.flip(1), mask.flip(1)  # right-padded
    with pytest.raises(ValueError, match="left-padded"):
        model(input_ids=ids, attention_mask=mask, past_key_values=kvtier.enable(model, mode="full"))


def test_each_device_engine_counts_its_own_dense_layers():
    # With a device_map, an engine holds a device's share of the layers; the model's first
    # num_dense_layers layers stay dense whichever engines they fall in.
    model = make_model()
    cache = kvtier.KvtierCache(model, mode="clusterkv", budget=256, num_dense_layers=3)
    cpu = torch.device("cpu")
    first = cache._engine_config(cpu, [0, 1], torch.float32, batch=2)
    second = cache._engine_config(cpu, [2, 3], torch.float32, batch=2)
    assert (first.num_layers, first.num_dense_layers) == (2, 2)
    assert (second.num_layers, second.num_dense_layers) == (2, 1)
    assert first.max_batch == first.max_sequences == 2


def test_a_second_prompt_needs_a_new_cache():
    # A used cache holds its sequences' rows; more than one token per step is refused with
    # what to do instead.
    model = make_model()
    cache = kvtier.enable(model, mode="full")
    generate(model, *prompts([60]), 4, cache)
    with pytest.raises(ValueError, match="one token per sequence and step.*reset"):
        generate(model, *prompts([80], seed=9), 4, cache)


def test_a_model_made_with_kvtier_attention_and_back_to_eager():
    # "kvtier" is a registered attention implementation: a model can be made with it, and
    # disable() restores what enable() replaced.
    needs_dtype(torch.float32)
    ids, mask = prompts([100, 30])
    ref = generate(make_model(), ids, mask, 12)
    model = make_model(attn_implementation="kvtier")
    assert model.config._attn_implementation == "kvtier"
    out = generate(model, ids, mask, 12, kvtier.KvtierCache(model, mode="full", budget=2048))
    assert out.tolist() == ref.tolist()

    eager = make_model(attn_implementation="eager")
    kvtier.enable(eager, mode="full")
    kvtier.disable(eager)
    assert eager.config._attn_implementation == "eager"
