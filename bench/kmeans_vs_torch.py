"""Spherical k-means of keys: kvtier's GPU kernel against a batched PyTorch k-means (bmm, argmax,
scatter_add, as ClusterKV does), in one process, on the same bf16 keys, timed with CUDA events
after a warm-up run of each.

Shape: `--problems` independent problems (default 256 = 32 layers x 8 KV heads), dim 128,
k = ctx / 64, 20 iterations with no early stop, keys drawn around 4096 random directions per
problem with noise (clustered, as real keys are). Both start from random rows. The PyTorch
version runs problems in chunks so its n x k similarity matrix stays under --torch-gib.

    python3 bench/kmeans_vs_torch.py --lib build/bench/libkvtier_bench_capi.so --ctx 32768 131072
"""
import argparse
import ctypes
import json
import math

import torch
import torch.nn.functional as F


def make_keys(problems, n, d, seed):
    """bf16 keys [problems, n, d] around 4096 directions per problem, generated in chunks."""
    out = torch.empty(problems, n, d, device="cuda", dtype=torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(seed)
    step = max(1, (1 << 28) // (n * d))
    for p0 in range(0, problems, step):
        p1 = min(problems, p0 + step)
        dirs = torch.randn(p1 - p0, 4096, d, device="cuda", generator=g)
        idx = torch.randint(0, 4096, (p1 - p0, n), device="cuda", generator=g)
        x = torch.gather(dirs, 1, idx[..., None].expand(-1, -1, d))
        x += 0.5 * torch.randn(p1 - p0, n, d, device="cuda", generator=g)
        out[p0:p1] = x.to(torch.bfloat16)
    return out


def torch_kmeans(x, k, iters, chunk, seed):
    """Batched spherical k-means in PyTorch; returns labels [P, n] and centroids [P, k, d]."""
    problems, n, d = x.shape
    labels = torch.empty(problems, n, device="cuda", dtype=torch.int64)
    cents = torch.empty(problems, k, d, device="cuda", dtype=torch.float32)
    g = torch.Generator(device="cuda").manual_seed(seed)
    for p0 in range(0, problems, chunk):
        p1 = min(problems, p0 + chunk)
        xs = F.normalize(x[p0:p1].float(), dim=-1).to(torch.bfloat16)
        idx = torch.randperm(n, device="cuda", generator=g)[:k]
        c = xs[:, idx, :]
        lab = None
        for it in range(iters + 1):
            sim = torch.bmm(xs, c.transpose(1, 2))
            lab = sim.argmax(dim=-1)
            del sim
            if it == iters:
                break
            sums = torch.zeros(p1 - p0, k, d, device="cuda", dtype=torch.float32)
            sums.scatter_add_(1, lab[..., None].expand(-1, -1, d), xs.float())
            c = F.normalize(sums, dim=-1).to(torch.bfloat16)
        labels[p0:p1] = lab
        cents[p0:p1] = c.float()
    return labels, cents


def objective(x, labels, cents):
    """Sum over problems and rows of (1 - cos(row, its centroid)), in float64, chunked."""
    total = 0.0
    for p in range(x.shape[0]):
        xn = F.normalize(x[p].float(), dim=-1)
        c = F.normalize(cents[p].float(), dim=-1)[labels[p].long()]
        total += float((1.0 - (xn * c).sum(-1)).double().sum())
    return total


def timed(fn):
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    out = fn()
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop) / 1000.0, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lib", required=True, help="path to libkvtier_bench_capi.so")
    ap.add_argument("--ctx", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--problems", type=int, default=256)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--torch-gib", type=float, default=8.0)
    ap.add_argument("--out", default="")
    a = ap.parse_args()

    lib = ctypes.CDLL(a.lib)
    lib.kvtier_bench_kmeans_workspace.restype = ctypes.c_size_t
    lib.kvtier_bench_kmeans_workspace.argtypes = [ctypes.c_int32, ctypes.c_int64, ctypes.c_int32,
                                                  ctypes.c_int32, ctypes.c_int32, ctypes.c_float,
                                                  ctypes.c_int32, ctypes.c_uint64]
    lib.kvtier_bench_kmeans.restype = ctypes.c_int
    lib.kvtier_bench_kmeans.argtypes = lib.kvtier_bench_kmeans_workspace.argtypes + [ctypes.c_void_p] * 8
    results = []
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    for n in a.ctx:
        P, d, k, iters = a.problems, a.dim, n // 64, a.iters
        x = make_keys(P, n, d, seed=n)
        ws_bytes = lib.kvtier_bench_kmeans_workspace(P, n, d, k, iters, 0.0, 1, 7)
        ws = torch.empty(ws_bytes, device="cuda", dtype=torch.uint8)
        cents = torch.empty(P, k, d, device="cuda", dtype=torch.float32)
        labels = torch.empty(P, n, device="cuda", dtype=torch.int32)
        sizes = torch.empty(P, k, device="cuda", dtype=torch.int32)
        obj = torch.empty(P, device="cuda", dtype=torch.float64)
        its = torch.empty(P, device="cuda", dtype=torch.int32)

        def ours():
            rc = lib.kvtier_bench_kmeans(P, n, d, k, iters, 0.0, 1, 7, x.data_ptr(), cents.data_ptr(),
                                         labels.data_ptr(), sizes.data_ptr(), ws.data_ptr(),
                                         obj.data_ptr(), its.data_ptr(),
                                         torch.cuda.current_stream().cuda_stream)
            assert rc == 0, "kvtier_bench_kmeans failed"

        chunk = max(1, int(a.torch_gib * (1 << 30)) // (n * k * 2))
        timed(ours)  # warm-up
        t_ours, _ = timed(ours)
        obj_ours = objective(x, labels, cents)
        timed(lambda: torch_kmeans(x, k, iters, chunk, seed=3))  # warm-up
        t_torch, (tl, tc) = timed(lambda: torch_kmeans(x, k, iters, chunk, seed=3))
        obj_torch = objective(x, tl, tc)
        tflop = 2.0 * P * n * k * d * (iters + 1) / 1e12
        r = dict(ctx=n, problems=P, k=k, iters=iters, kvtier_s=t_ours, torch_s=t_torch,
                 speedup=t_torch / t_ours, kvtier_objective=obj_ours, torch_objective=obj_torch,
                 assign_tflop=tflop, torch_chunk=chunk)
        results.append(r)
        print(json.dumps(r), flush=True)
        del x, ws, cents, labels, sizes
        torch.cuda.empty_cache()
    print(f"\n{'ctx':>7} {'problems':>8} {'k':>5} {'kvtier s':>9} {'torch s':>9} {'speedup':>8} "
          f"{'obj kvtier/torch':>17}")
    for r in results:
        print(f"{r['ctx']:>7} {r['problems']:>8} {r['k']:>5} {r['kvtier_s']:>9.3f} {r['torch_s']:>9.3f} "
              f"{r['speedup']:>7.2f}x {r['kvtier_objective'] / r['torch_objective']:>17.4f}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
