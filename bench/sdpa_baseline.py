#!/usr/bin/env python3
"""Dense decode attention with torch's scaled_dot_product_attention (enable_gqa=True): what most
users run today. kvtier-bench runs this in the same call (--torch-script) and adds its figure to
the table. Times one decode step (one query token per sequence, every layer) with CUDA events
after warm-up, and prints one JSON line."""
import argparse
import json

import torch
import torch.nn.functional as F


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=3)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"mode": "torch-sdpa", "error": "no CUDA device"}))
        return
    dt = torch.bfloat16 if a.dtype == "bf16" else torch.float16
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    kv = [(torch.randn(a.batch, a.kv_heads, a.context, a.head_dim, device=dev, dtype=dt, generator=g),
           torch.randn(a.batch, a.kv_heads, a.context, a.head_dim, device=dev, dtype=dt, generator=g))
          for _ in range(a.layers)]
    q = torch.randn(a.batch, a.q_heads, 1, a.head_dim, device=dev, dtype=dt, generator=g)

    def step():
        for k, v in kv:
            F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    for _ in range(a.warmup):
        step()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(a.steps):
        step()
    stop.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(stop) / a.steps
    kv_bytes = sum(k.numel() * k.element_size() * 2 for k, _ in kv)
    print(json.dumps({"mode": "torch-sdpa", "ms_per_step": ms, "batch": a.batch,
                      "gpu_kv_gib": kv_bytes / 2**30, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
