#!/usr/bin/env python3
"""End-to-end model.generate with kvtier against transformers' own caches, in one process.

An 8B-shaped Llama (Llama-3.1-8B: 32 layers, hidden 4096, 32 query and 8 KV heads, head_dim
128, MLP 14336, vocabulary 128256) with random weights in bf16 on one GPU, no download. For
each prompt length it runs model.generate on random token prompts with:

  dynamic     transformers' DynamicCache, all KV on the GPU (the default cache)
  offloaded   DynamicCache(offloading=True): each layer's KV on the host, fetched per step
  kvtier      kvtier.enable(model, mode, budget) (default clusterkv, budget 2048)

at batch 1 and at growing batches until a cache no longer fits (a CUDA out-of-memory error,
or host memory for kvtier). kvtier's batches above 1 are prefilled one sequence at a time
(KvtierCache.prefill), so prefill activations do not limit the batch: the KV lives in pinned
host memory and only the recalled rows on the GPU. DynamicCache is run as users run it, one
generate over the batch; --dynamic-row-prefill gives it the same one-at-a-time prefill (each
row prefilled alone, the caches concatenated) so that only KV memory limits its batch.

Timing: a LogitsProcessor records a CUDA event each time generate asks for the next token's
scores (event i: token i's logits are ready). Prefill is the wall time until the GPU has run
the prompt's forward (synchronized at the first scores). The first
step (event 0 to 1) is reported apart: it also waits for prefill work a cache still has in
flight (kvtier offloads and clusters each layer behind the prompt's forward). Decode tokens/s
= batch x (new_tokens - 2) / (event new_tokens-1 - event 1). Before the runs, every cache
generates a few tokens at a short context (warm-up). Peak GPU memory is torch's peak
allocation plus, for kvtier, the engine's own peak (allocated outside torch's allocator).

    python3 bench/hf_generate.py --contexts 32768 131072 --json results.json
    python3 bench/hf_generate.py --tiny --contexts 512   # a small model: checks the script
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

# kvtier is imported first so that it can set OpenMP's wait policy before torch starts its
# threads.
import kvtier  # isort: skip
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, LogitsProcessor

LLAMA_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    rope_theta=500000.0,
    max_position_embeddings=131072 + 1024,
    tie_word_embeddings=False,
)
TINY = dict(
    vocab_size=512,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=8192,
)


class StepClock(LogitsProcessor):
    """Records an event (CUDA) or a wall time (CPU) at each scoring call of generate."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []
        self.first_wall: float | None = None

    def __call__(self, input_ids, scores):
        if self.first_wall is None:
            # generate queues the prompt's forward without waiting for it: the prefill ends when
            # the GPU has run it, not when the first scores are handed over.
            if self.cuda:
                torch.cuda.synchronize()
            self.first_wall = time.perf_counter()
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())
        return scores

    def seconds(self, first: int, last: int) -> float:
        """Time from the scoring call `first` to the call `last`."""
        if len(self.marks) <= max(first, last):
            return float("nan")
        if self.cuda:
            self.marks[last].synchronize()
            return self.marks[first].elapsed_time(self.marks[last]) / 1e3
        return self.marks[last] - self.marks[first]


def make_model(shape: dict, device: torch.device, dtype: torch.dtype, seed: int):
    torch.manual_seed(seed)
    config = LlamaConfig(**shape, initializer_range=0.02)
    config._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        # torch keeps freed pinned host blocks (the offloaded cache's) for reuse; give them back,
        # or kvtier's host tier finds that memory taken.
        if hasattr(torch._C, "_host_emptyCache"):
            torch._C._host_emptyCache()


def row_prefilled_dynamic_cache(model, ids: torch.Tensor) -> DynamicCache:
    """A DynamicCache holding ids[:, :-1], prefilled one row at a time."""
    rows = []
    for b in range(ids.shape[0]):
        cache = DynamicCache(config=model.config)
        model(
            input_ids=ids[b : b + 1, :-1], past_key_values=cache, use_cache=True, logits_to_keep=1
        )
        rows.append(cache)
    merged = DynamicCache(config=model.config)
    for layer in range(len(rows[0].layers)):
        k = torch.cat([r.layers[layer].keys for r in rows])
        v = torch.cat([r.layers[layer].values for r in rows])
        for r in rows:
            r.layers[layer].keys = r.layers[layer].values = None
        merged.update(k, v, layer)
    return merged


def kv_bytes_per_token(model) -> int:
    c = model.config
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * model.dtype.itemsize


def host_tier_bytes(model, tokens: int, batch: int) -> int:
    """kvtier's host tier for `batch` sequences of `tokens`: their KV, 3% for partly filled
    pages and 512 MiB (the cache's default sizing adds 25%, more than 128K batches can spare)."""
    return int(batch * tokens * kv_bytes_per_token(model) * 1.03) + (512 << 20)


def run_one(model, args, cache_kind: str, context: int, batch: int, new_tokens: int) -> dict:
    device = model.device
    gen = torch.Generator().manual_seed(args.seed + batch)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=gen).to(device)
    mask = torch.ones_like(ids)
    free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    clock = StepClock(device)
    cache = None
    row_prefill = False
    engine_peak = 0
    start = time.perf_counter()
    try:
        if cache_kind == "dynamic":
            kvtier.disable(model, "sdpa")
            if batch > 1 and args.dynamic_row_prefill:
                cache, row_prefill = row_prefilled_dynamic_cache(model, ids), True
            else:
                cache = DynamicCache(config=model.config)
        elif cache_kind == "offloaded":
            kvtier.disable(model, "sdpa")
            cache = DynamicCache(config=model.config, offloading=True)
        else:
            cache = kvtier.enable(
                model,
                mode=args.mode,
                budget=args.budget,
                max_context=context + new_tokens + 16,
                host_bytes_limit=host_tier_bytes(model, context + new_tokens, batch),
            )
            if batch > 1:
                cache.prefill(model, ids, mask)
                row_prefill = True
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                past_key_values=cache,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                logits_processor=[clock],
                pad_token_id=0,
            )
        sync(device)
        # The first step also waits for whatever prefill work a cache still has in flight
        # (kvtier's offload and clustering run behind the prompt's forward); it is reported
        # apart, and decode speed is measured over the steps after it.
        first_step_s = clock.seconds(0, 1)
        decode_s = clock.seconds(1, new_tokens - 1)
        if cache_kind == "kvtier":
            stats = cache.engine_stats()
            engine_peak = sum(s.gpu_peak_bytes for s in stats.values())
            hits = sum(s.recall_hits for s in stats.values())
            misses = sum(s.recall_misses for s in stats.values())
            host_peak = sum(s.host_bytes_peak for s in stats.values())
        assert out.shape == (batch, context + new_tokens)
    except torch.OutOfMemoryError as e:
        return dict(
            cache=cache_kind, context=context, batch=batch, status="oom", error=str(e)[:200]
        )
    except MemoryError as e:  # the engine ran out of host (or device) memory
        return dict(
            cache=cache_kind, context=context, batch=batch, status="engine-oom", error=str(e)[:200]
        )
    finally:
        if cache_kind == "kvtier" and isinstance(cache, kvtier.KvtierCache):
            cache.reset()
        del cache
        free(device)
    prefill_s = clock.first_wall - start
    torch_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    result = dict(
        cache=cache_kind,
        context=context,
        batch=batch,
        status="ok",
        row_prefill=row_prefill,
        new_tokens=new_tokens,
        prefill_s=prefill_s,
        first_step_s=first_step_s,
        decode_s=decode_s,
        decode_tok_s=batch * (new_tokens - 2) / decode_s,
        ms_per_step=1e3 * decode_s / (new_tokens - 2),
        gpu_peak_gib=(torch_peak + engine_peak) / 2**30,
    )
    if cache_kind == "kvtier":
        result.update(
            mode=args.mode,
            budget=args.budget,
            engine_gpu_peak_gib=engine_peak / 2**30,
            host_peak_gib=host_peak / 2**30,
            hit_rate=hits / (hits + misses) if hits + misses else float("nan"),
        )
    return result


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def describe(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['cache']:<10} ctx {r['context']:>6} b{r['batch']:<2} {r['status']}"
    return (
        f"{r['cache']:<10} ctx {r['context']:>6} b{r['batch']:<2} prefill {r['prefill_s']:7.1f} s  "
        f"{r['ms_per_step']:8.1f} ms/step  {r['decode_tok_s']:8.1f} tok/s  "
        f"GPU {r['gpu_peak_gib']:5.1f} GiB  first step {1e3 * r['first_step_s']:.0f} ms"
        + (
            f"  host {r['host_peak_gib']:.1f} GiB  hits {r['hit_rate']:.1%}"
            if "hit_rate" in r
            else ""
        )
    )


def sweep(model, args, kind, context, batches, new_tokens, results: list) -> None:
    """Runs batches in order, stopping at the first that does not fit; each result is appended
    to `results` and written out at once (a run killed for host memory loses only itself)."""
    for batch in batches:
        log(f"[hf_generate] {kind} ctx {context} batch {batch} ...")
        r = run_one(model, args, kind, context, batch, new_tokens)
        log("[hf_generate]   " + describe(r))
        results.append(r)
        write_json(args, results)
        if r["status"] != "ok":
            break


def write_json(args, results: list) -> None:
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=args.gpu_name, argv=sys.argv[1:], results=results), f, indent=1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--mode", default="clusterkv", choices=kvtier.MODES)
    p.add_argument("--budget", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=32, help="per run (dynamic and kvtier)")
    p.add_argument("--offload-new-tokens", type=int, default=5, help="per offloaded run")
    p.add_argument("--dynamic-batches", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8, 12, 16])
    p.add_argument("--kvtier-batches", type=int, nargs="+", default=[1, 2, 4, 6, 8, 12, 16, 24])
    p.add_argument(
        "--dynamic-row-prefill",
        action="store_true",
        help="prefill DynamicCache's batches one row at a time too",
    )
    p.add_argument(
        "--host-fraction",
        type=float,
        default=0.85,
        help="kvtier batches whose KV exceeds this share of physical memory are not tried",
    )
    p.add_argument("--skip", nargs="*", default=[], choices=["dynamic", "offloaded", "kvtier"])
    p.add_argument("--tiny", action="store_true", help="a small model, to check the script")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write every result here")
    args = p.parse_args(argv)
    if args.new_tokens < 3 or args.offload_new_tokens < 3:
        p.error(
            "--new-tokens and --offload-new-tokens must be at least 3 (decode is timed from "
            "the second generated token to the last)"
        )

    device = torch.device(args.device)
    if device.type != "cuda" and "offloaded" not in args.skip:
        log("[hf_generate] no GPU: DynamicCache(offloading=True) needs one, skipped")
        args.skip.append("offloaded")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = TINY if args.tiny else LLAMA_8B
    model = make_model(shape, device, dtype, args.seed)
    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    args.gpu_name = gpu_name
    log(
        f"[hf_generate] {gpu_name}: {'tiny' if args.tiny else '8B-shaped'} Llama, {dtype}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters"
    )

    # Warm-up: every cache at a short context, so kernels and the allocator are ready.
    warm = min(1024, min(args.contexts))
    for kind in ("dynamic", "offloaded", "kvtier"):
        if kind not in args.skip:
            run_one(model, args, kind, warm, 1, 4)
            if kind == "kvtier":
                run_one(model, args, kind, warm, 2, 4)

    row_bytes = kv_bytes_per_token(model)
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    results: list = []
    for context in args.contexts:
        if "dynamic" not in args.skip:
            sweep(model, args, "dynamic", context, args.dynamic_batches, args.new_tokens, results)
        if "kvtier" not in args.skip:
            seq_bytes = (context + args.new_tokens) * row_bytes
            fits = [
                b for b in args.kvtier_batches if b * seq_bytes <= args.host_fraction * physical
            ]
            log(
                f"[hf_generate] kvtier: {seq_bytes / 2**30:.1f} GiB of KV per sequence; "
                f"batches {fits} fit {args.host_fraction:.0%} of {physical / 2**30:.0f} GiB"
            )
            sweep(model, args, "kvtier", context, fits, args.new_tokens, results)
        if "offloaded" not in args.skip:
            sweep(model, args, "offloaded", context, [1], args.offload_new_tokens, results)

    # The table: per context, each cache at batch 1 and at its best throughput.
    print(
        f"\nmodel.generate on {gpu_name}, {'tiny' if args.tiny else '8B-shaped'} Llama, "
        f"{dtype}; kvtier {args.mode} budget {args.budget}"
    )
    print(
        f"{'context':>8} {'cache':<10} {'batch':>5} {'prefill s':>9} {'1st step':>8} "
        f"{'ms/step':>8} {'tok/s':>8} {'GPU GiB':>7} {'vs dyn b1':>9} {'vs offl':>8}"
    )
    for context in args.contexts:
        ok = [r for r in results if r["context"] == context and r["status"] == "ok"]
        base = {r["cache"]: r for r in ok if r["batch"] == 1}
        for r in ok:
            dyn = base.get("dynamic")
            off = base.get("offloaded")
            vs_dyn = r["decode_tok_s"] / dyn["decode_tok_s"] if dyn else float("nan")
            vs_off = r["decode_tok_s"] / off["decode_tok_s"] if off else float("nan")
            print(
                f"{context:>8} {r['cache']:<10} {r['batch']:>5} {r['prefill_s']:>9.1f} "
                f"{1e3 * r['first_step_s']:>6.0f}ms {r['ms_per_step']:>8.1f} {r['decode_tok_s']:>8.1f} {r['gpu_peak_gib']:>7.1f} "
                f"{vs_dyn:>8.2f}x {vs_off:>7.2f}x"
            )
        for kind in ("dynamic", "kvtier"):
            runs = [r for r in ok if r["cache"] == kind]
            if runs:
                best = max(runs, key=lambda r: r["decode_tok_s"])
                failed = [
                    r
                    for r in results
                    if r["context"] == context and r["cache"] == kind and r["status"] != "ok"
                ]
                why = f"; batch {failed[0]['batch']}: {failed[0]['status']}" if failed else ""
                print(
                    f"{context:>8} best {kind}: batch {best['batch']}, "
                    f"{best['decode_tok_s']:.1f} tok/s{why}"
                )
    write_json(args, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
