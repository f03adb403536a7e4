"""kvtier-trace: where every byte and microsecond of a kvtier run went.

Reads a telemetry file (JSON Lines written by the engine while tracing: ``EngineConfig
.telemetry_path``, ``Engine.start_trace``, ``kvtier-bench --trace``, ``python -m kvtier.generate
--trace``; format in docs/telemetry.md) and

- prints a summary: bytes host -> device, device -> host and disk per layer, per KV head and per
  step; the GB/s each kind of transfer achieved against the link peak measured when the trace
  started; cache hits, misses and evictions; stall time and its share of step time; the layers
  and heads that cost the most;
- writes a Chrome / Perfetto trace (``trace.json``: one track per CUDA stream and per host
  thread, transfers as slices with their bytes and GB/s, cache decisions as instant events,
  counters for link throughput and cache occupancy) that opens in ui.perfetto.dev and
  chrome://tracing;
- writes PNG plots (matplotlib): link throughput over time, hit rate per step, bytes per layer.

    kvtier-trace run.jsonl --out run_profile/

Standard library only, except matplotlib for the plots (``--no-plots`` without it). It imports
nothing else from kvtier, so tools/kvtier-trace runs it from a checkout without torch or the
engine built.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

FORMAT = "kvtier-telemetry"
VERSION = 2

# Fields left out of a line are at these values (docs/telemetry.md).
DEFAULTS = {
    "dur_ns": 0,
    "seq": -1,
    "layer": -1,
    "kv_head": -1,
    "bytes": 0,
    "total": 0,
    "dir": "none",
    "hits": 0,
    "misses": 0,
    "op": "none",
    "track": "host",
    "thread": 0,
    "step": -1,
}
KINDS = {
    "fetch",
    "offload",
    "lookup",
    "evict",
    "cluster",
    "stall",
    "span",
    "step",
    "link",
    "occupancy",
}
TRANSFER_KINDS = ("fetch", "lookup", "offload", "cluster")  # the kinds whose bytes count as moved
DIRECTIONS = ("h2d", "d2h", "h2disk", "disk2h", "none")
GPU_TRACKS = {
    "compute": (1, "GPU: caller's stream (decode, fills)"),
    "copy": (2, "GPU: copy stream (offloads)"),
    "side": (3, "GPU: side stream (prefill clustering)"),
}
HOST_TID0 = 10


class TraceError(Exception):
    """The telemetry file cannot be read as kvtier telemetry."""


class Run:
    """The events of one telemetry file, with every field present."""

    def __init__(self, path: str, header: dict | None, footer: dict | None, events: list):
        self.path = path
        self.header = header
        self.footer = footer
        self.events = events
        self.by_kind: dict[str, list] = defaultdict(list)
        for e in events:
            self.by_kind[e["kind"]].append(e)

    def kind(self, kind: str, op: str | None = None) -> list:
        evs = self.by_kind.get(kind, [])
        return evs if op is None else [e for e in evs if e["op"] == op]


def load(path: str) -> Run:
    """Parses a telemetry file. Raises TraceError naming the line of anything malformed."""
    header = footer = None
    events = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                e = json.loads(line)
            except json.JSONDecodeError as err:
                raise TraceError(f"{path}:{n}: not a JSON object ({err.msg})") from None
            if not isinstance(e, dict) or "kind" not in e or "t_ns" not in e:
                raise TraceError(f"{path}:{n}: an event needs 'kind' and 't_ns'")
            kind = e["kind"]
            if kind == "begin":
                if e.get("format") != FORMAT:
                    raise TraceError(f"{path}:{n}: not a {FORMAT} file")
                if e.get("version") != VERSION:
                    raise TraceError(
                        f"{path}:{n}: format version {e.get('version')}; this tool reads {VERSION}"
                    )
                header = e
                continue
            if kind == "end":
                footer = e
                continue
            if kind not in KINDS:
                raise TraceError(f"{path}:{n}: unknown event kind {kind!r}")
            for k, v in DEFAULTS.items():
                e.setdefault(k, v)
            events.append(e)
    if header is None and not events:
        raise TraceError(f"{path}: no events")
    events.sort(key=lambda e: e["t_ns"])
    return Run(path, header, footer, events)


# ---- summary ----


def _gbps(nbytes: float, ns: float) -> float:
    return nbytes / ns if ns > 0 else 0.0


def _pct(part: float, whole: float) -> float:
    return 100.0 * part / whole if whole > 0 else 0.0


def _quantile(xs: list, q: float) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def sum_by(events, key: str, field: str) -> dict:
    """{event[key]: sum of event[field]} over `events`."""
    out: dict = defaultdict(int)
    for e in events:
        out[e[key]] += e[field]
    return out


def reads_by_step(run: Run) -> dict:
    """Bytes attention read from host memory (its misses) per decode step."""
    return sum_by(run.kind("lookup"), "step", "bytes")


def link_peaks(run: Run) -> dict[str, float]:
    """GB/s per direction measured when the trace started (a host copy counts as h2d)."""
    peak: dict[str, float] = {}
    for e in run.kind("link"):
        d = "h2d" if e["dir"] == "none" else e["dir"]
        peak[d] = max(peak.get(d, 0.0), _gbps(e["bytes"], e["dur_ns"]))
    return peak


def summarize(run: Run, top: int = 5) -> dict:
    """Every figure the summary prints, as plain data (also written as summary.json)."""
    s: dict = {"file": run.path, "events": len(run.events)}
    s["dropped"] = run.footer.get("dropped", 0) if run.footer else None
    s["complete"] = run.footer is not None
    if run.events:
        s["duration_s"] = (
            max(e["t_ns"] + e["dur_ns"] for e in run.events) - run.events[0]["t_ns"]
        ) / 1e9
    else:
        s["duration_s"] = 0.0

    # The link peak measured when the trace started.
    link = link_peaks(run)
    s["link_peak_gbps"] = link
    s["link_is_host_copy"] = any(e["dir"] == "none" for e in run.kind("link"))

    # Bytes by direction, exactly as the engine's totals count them (transfer kinds).
    by_dir = {d: 0 for d in DIRECTIONS}
    for k in TRANSFER_KINDS:
        for e in run.kind(k):
            by_dir[e["dir"]] = by_dir.get(e["dir"], 0) + e["bytes"]
    s["bytes_by_direction"] = by_dir
    traffic = {
        "h2d_read": sum(e["bytes"] for e in run.kind("lookup")),
        "h2d_fill": sum(e["bytes"] for e in run.kind("fetch", "fill")),
        "d2h_prefill": sum(e["bytes"] for e in run.kind("offload", "prefill_store")),
        "d2h_append": sum(e["bytes"] for e in run.kind("offload", "append")),
        "disk": by_dir.get("h2disk", 0) + by_dir.get("disk2h", 0),
    }
    s["traffic"] = traffic

    # Steps and the decode kernels' GPU time.
    steps = {}
    for e in run.kind("step"):
        steps[e["step"]] = {"step": e["step"], "t_ns": e["t_ns"], "ms": e["dur_ns"] / 1e6}
    decode_ns = {e["step"]: e["dur_ns"] for e in run.kind("span", "decode")}
    read_by_step = reads_by_step(run)
    hits_by_step = sum_by(run.kind("lookup"), "step", "hits")
    misses_by_step = sum_by(run.kind("lookup"), "step", "misses")
    fill_by_step = sum_by(run.kind("fetch", "fill"), "step", "bytes")  # the step that planned it
    stall_by_step = sum_by(run.kind("stall"), "step", "dur_ns")
    append_by_step = sum_by(run.kind("offload", "append"), "step", "bytes")
    per_step = []
    for st in sorted(steps):
        h, m = hits_by_step[st], misses_by_step[st]
        per_step.append(
            {
                "step": st,
                "ms": steps[st]["ms"],
                "t_s": steps[st]["t_ns"] / 1e9,
                "decode_gpu_ms": decode_ns.get(st, 0) / 1e6,
                "h2d_read": read_by_step[st],
                "h2d_fill": fill_by_step[st],
                "d2h_append": append_by_step[st],
                "hits": h,
                "misses": m,
                "hit_rate": h / (h + m) if h + m else None,
                "stall_ms": stall_by_step[st] / 1e6,
            }
        )
    s["per_step"] = per_step
    step_ms = [p["ms"] for p in per_step]
    s["steps"] = {
        "count": len(per_step),
        "total_ms": sum(step_ms),
        "mean_ms": sum(step_ms) / len(step_ms) if step_ms else 0.0,
        "p50_ms": _quantile(step_ms, 0.5),
        "p99_ms": _quantile(step_ms, 0.99),
        "max_ms": max(step_ms) if step_ms else 0.0,
    }

    # Achieved GB/s of each timed transfer, against the peak of its direction.
    achieved = {}
    for op, d in (("fill", "h2d"), ("prefill_copy", "d2h"), ("append_copy", "d2h")):
        spans = [e for e in run.kind("span", op) if e["dur_ns"] > 0]
        b = sum(e["bytes"] for e in spans)
        ns = sum(e["dur_ns"] for e in spans)
        if spans:
            achieved[op] = {
                "spans": len(spans),
                "bytes": b,
                "busy_ms": ns / 1e6,
                "gbps": _gbps(b, ns),
                "of_peak_pct": _pct(_gbps(b, ns), link.get(d, 0.0)),
            }
    # Attention's reads of missed rows happen inside the decode kernels: bytes over the kernels'
    # time is a lower bound on the rate the reads ran at.
    rb = sum(read_by_step[st] for st in decode_ns)
    rns = sum(decode_ns.values())
    if decode_ns:
        achieved["attention_reads"] = {
            "spans": len(decode_ns),
            "bytes": rb,
            "busy_ms": rns / 1e6,
            "gbps": _gbps(rb, rns),
            "of_peak_pct": _pct(_gbps(rb, rns), link.get("h2d", 0.0)),
        }
    s["achieved"] = achieved
    if per_step:
        wall = sum(step_ms) * 1e6
        dec_h2d = sum(p["h2d_read"] + p["h2d_fill"] for p in per_step)
        s["decode_link_gbps"] = _gbps(dec_h2d, wall)
        s["decode_link_of_peak_pct"] = _pct(s["decode_link_gbps"], link.get("h2d", 0.0))

    # The cache.
    hits = sum(e["hits"] for e in run.kind("lookup"))
    misses = sum(e["misses"] for e in run.kind("lookup"))
    evictions = sum(e["misses"] for e in run.kind("evict"))
    occ = [e["bytes"] / e["total"] for e in run.kind("occupancy") if e["total"] > 0]
    s["cache"] = {
        "lookups": len(run.kind("lookup")),
        "hits": hits,
        "misses": misses,
        "hit_rate": hits / (hits + misses) if hits + misses else None,
        "evictions": evictions,
        "occupancy_mean": sum(occ) / len(occ) if occ else None,
        "occupancy_max": max(occ) if occ else None,
    }

    # Stalls: the critical path waiting for background work.
    stalls = run.kind("stall")
    stall_ns = sum(e["dur_ns"] for e in stalls)
    in_steps = sum(stall_by_step[st] for st in steps)
    s["stall"] = {
        "count": len(stalls),
        "total_ms": stall_ns / 1e6,
        "in_steps_ms": in_steps / 1e6,
        "share_of_step_time_pct": _pct(in_steps / 1e6, sum(step_ms)),
        "on_policy_ms": sum(e["dur_ns"] for e in stalls if e["seq"] < 0) / 1e6,
        "on_sequence_jobs_ms": sum(e["dur_ns"] for e in stalls if e["seq"] >= 0) / 1e6,
    }

    # The cache-policy job of each step: from its first layer's start to its last layer's end
    # (the caller's stalls on the policy wait for this).
    spans_by_step: dict[int, list] = defaultdict(list)
    for e in run.kind("span", "policy"):
        spans_by_step[e["step"]].append(e)
    job_ms = [
        (max(e["t_ns"] + e["dur_ns"] for e in v) - min(e["t_ns"] for e in v)) / 1e6
        for v in spans_by_step.values()
    ]
    s["policy_job"] = {
        "steps": len(job_ms),
        "mean_ms": sum(job_ms) / len(job_ms) if job_ms else 0.0,
        "p50_ms": _quantile(job_ms, 0.5),
        "max_ms": max(job_ms) if job_ms else 0.0,
    }

    # Prefill and clustering.
    pc = run.kind("cluster", "prefill_cluster")
    s["prefill"] = {
        "layers": len(run.kind("offload", "prefill_store")),
        "bytes_offloaded": traffic["d2h_prefill"],
        "cluster_gpu_ms": sum(e["dur_ns"] for e in run.kind("span", "prefill_cluster")) / 1e6,
        "cluster_gpu_layer_ms": sorted(
            e["dur_ns"] / 1e6 for e in run.kind("span", "prefill_cluster")
        ),
        "store_ms": sum(e["dur_ns"] for e in run.kind("span", "prefill_store")) / 1e6,
        "clustered_bytes": sum(e["bytes"] for e in pc),
    }
    win = run.kind("cluster", "window")
    s["window_clusterings"] = {"count": len(win), "ms": sum(e["dur_ns"] for e in win) / 1e6}

    # Per layer.
    layers: dict[int, dict] = defaultdict(
        lambda: {
            "h2d_read": 0,
            "h2d_fill": 0,
            "d2h_prefill": 0,
            "d2h_append": 0,
            "hits": 0,
            "misses": 0,
            "evictions": 0,
            "stall_ms": 0.0,
            "policy_ms": 0.0,
        }
    )
    for e in run.kind("lookup"):
        layers[e["layer"]]["h2d_read"] += e["bytes"]
    for e in run.kind("fetch", "fill"):
        layers[e["layer"]]["h2d_fill"] += e["bytes"]
    for e in run.kind("offload", "prefill_store"):
        layers[e["layer"]]["d2h_prefill"] += e["bytes"]
    for e in run.kind("offload", "append"):
        layers[e["layer"]]["d2h_append"] += e["bytes"]
    for e in run.kind("lookup"):
        layers[e["layer"]]["hits"] += e["hits"]
        layers[e["layer"]]["misses"] += e["misses"]
    for e in run.kind("evict"):
        layers[e["layer"]]["evictions"] += e["misses"]
    for e in stalls:
        if e["layer"] >= 0:
            layers[e["layer"]]["stall_ms"] += e["dur_ns"] / 1e6
    for e in run.kind("span", "policy"):
        layers[e["layer"]]["policy_ms"] += e["dur_ns"] / 1e6
    per_layer = []
    for layer in sorted(k for k in layers if k >= 0):
        r = dict(layers[layer], layer=layer)
        t = r["hits"] + r["misses"]
        r["hit_rate"] = r["hits"] / t if t else None
        per_layer.append(r)
    s["per_layer"] = per_layer

    # Per (layer, KV head).
    heads: dict[tuple, dict] = defaultdict(lambda: {"h2d_read": 0, "hits": 0, "misses": 0})
    for e in run.kind("lookup"):
        heads[(e["layer"], e["kv_head"])]["h2d_read"] += e["bytes"]
    for e in run.kind("lookup"):
        h = heads[(e["layer"], e["kv_head"])]
        h["hits"] += e["hits"]
        h["misses"] += e["misses"]
    per_head = []
    for (layer, head), r in sorted(heads.items()):
        t = r["hits"] + r["misses"]
        per_head.append(dict(r, layer=layer, kv_head=head, hit_rate=r["hits"] / t if t else None))
    s["per_head"] = per_head

    # The worst offenders.
    s["top"] = {
        "layers_by_h2d_read": [
            {"layer": r["layer"], "h2d_read": r["h2d_read"], "misses": r["misses"]}
            for r in sorted(per_layer, key=lambda r: -r["h2d_read"])[:top]
            if r["h2d_read"] > 0
        ],
        "heads_by_misses": [
            {
                "layer": r["layer"],
                "kv_head": r["kv_head"],
                "misses": r["misses"],
                "h2d_read": r["h2d_read"],
                "hit_rate": r["hit_rate"],
            }
            for r in sorted(per_head, key=lambda r: (-r["misses"], -r["h2d_read"]))[:top]
            if r["misses"] > 0
        ],
        "layers_by_stall": [
            {"layer": r["layer"], "stall_ms": r["stall_ms"]}
            for r in sorted(per_layer, key=lambda r: -r["stall_ms"])[:top]
            if r["stall_ms"] > 0
        ],
    }
    return s


def _mib(b: float) -> str:
    return f"{b / 2**20:,.1f} MiB" if b < 2**30 else f"{b / 2**30:,.2f} GiB"


def _rate(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def format_summary(s: dict, top: int = 5, steps_shown: int = 6) -> str:
    out = []
    w = out.append
    dropped = s["dropped"]
    w(
        f"kvtier-trace  {s['file']}: {s['events']} events"
        + (f", {dropped} dropped" if dropped else "")
        + ("" if s["complete"] else " (no footer: the run did not stop its trace)")
        + f", {s['duration_s']:.3f} s, {s['steps']['count']} decode steps"
    )
    link = s["link_peak_gbps"]
    if link:
        what = "host memcpy (CPU backend)" if s["link_is_host_copy"] else "pinned copies"
        w(
            "link peak     "
            + ", ".join(f"{d} {g:.1f} GB/s" for d, g in sorted(link.items()))
            + f"  (measured when the trace started: {what})"
        )
    else:
        w("link peak     not measured (no link event)")
    t = s["traffic"]
    w("")
    w("bytes moved")
    w(
        f"  h2d  {_mib(t['h2d_read'] + t['h2d_fill']):>14}   attention's reads of missed clusters "
        f"{_mib(t['h2d_read'])}, gathers into the cache {_mib(t['h2d_fill'])}"
    )
    w(
        f"  d2h  {_mib(t['d2h_prefill'] + t['d2h_append']):>14}   prompts to the host tier "
        f"{_mib(t['d2h_prefill'])}, decoded rows {_mib(t['d2h_append'])}"
    )
    w(f"  disk {_mib(t['disk']):>14}" + ("   (nothing went to disk)" if not t["disk"] else ""))
    if s["achieved"]:
        w("")
        w("achieved      GB/s   of peak    busy ms   bytes")
        names = {
            "fill": "fills (gathers into cache pages)",
            "attention_reads": "attention's reads (over the decode kernels' time)",
            "prefill_copy": "prefill downloads",
            "append_copy": "decoded rows' downloads",
        }
        for op, a in s["achieved"].items():
            w(
                f"  {a['gbps']:7.2f}  {a['of_peak_pct']:6.1f}%  {a['busy_ms']:9.2f}   "
                f"{_mib(a['bytes'])}  {names.get(op, op)}"
            )
        if "decode_link_gbps" in s:
            w(
                f"  {s['decode_link_gbps']:7.2f}  {s['decode_link_of_peak_pct']:6.1f}%  "
                "           all decode-time h2d bytes over the steps' wall time"
            )
    st = s["steps"]
    if st["count"]:
        w("")
        w(
            f"steps         {st['count']}: mean {st['mean_ms']:.3f} ms, p50 {st['p50_ms']:.3f}, "
            f"p99 {st['p99_ms']:.3f}, max {st['max_ms']:.3f} (caller's thread, first "
            "decode_layer to end_step)"
        )
    c = s["cache"]
    occ = (
        ""
        if c["occupancy_mean"] is None
        else f"; occupancy mean {_rate(c['occupancy_mean'])}, max {_rate(c['occupancy_max'])}"
    )
    w(
        f"cache         {c['lookups']} lookups: {c['hits']} hits, {c['misses']} misses, hit "
        f"rate {_rate(c['hit_rate'])}; {c['evictions']} clusters evicted{occ}"
    )
    sl = s["stall"]
    w(
        f"stall         {sl['total_ms']:.3f} ms in {sl['count']} waits; within steps "
        f"{sl['in_steps_ms']:.3f} ms = {sl['share_of_step_time_pct']:.2f}% of step time "
        f"(on the cache policy {sl['on_policy_ms']:.3f} ms, on prefill/window jobs "
        f"{sl['on_sequence_jobs_ms']:.3f} ms)"
    )
    pj = s["policy_job"]
    if pj["steps"]:
        w(
            f"policy job    {pj['steps']} steps: mean {pj['mean_ms']:.3f} ms, p50 "
            f"{pj['p50_ms']:.3f}, max {pj['max_ms']:.3f} (workers, every recall layer's cache "
            "decisions for a step)"
        )
    p = s["prefill"]
    if p["layers"]:
        per = p["cluster_gpu_layer_ms"]
        gpu = (
            f"clustering {p['cluster_gpu_ms']:.1f} ms on the GPU side stream ({len(per)} layers: "
            f"median {_quantile(per, 0.5):.1f} ms, max {per[-1]:.1f}), "
            if per
            else ""
        )
        w(
            f"prefill       {p['layers']} (sequence, layer) prompts, {_mib(p['bytes_offloaded'])} "
            f"to the host tier; {gpu}storing {p['store_ms']:.1f} ms on workers"
        )
    wc = s["window_clusterings"]
    if wc["count"]:
        w(f"windows       {wc['count']} re-clusterings, {wc['ms']:.1f} ms on workers")

    if s["per_layer"]:
        w("")
        w(
            "per layer  h2d read     h2d fill     d2h          hits     misses   hit rate  "
            "evicted  stall ms  policy ms"
        )
        for r in s["per_layer"]:
            w(
                f"  {r['layer']:>5}  {_mib(r['h2d_read']):>11}  {_mib(r['h2d_fill']):>11}  "
                f"{_mib(r['d2h_prefill'] + r['d2h_append']):>11}  {r['hits']:>7}  "
                f"{r['misses']:>7}  {_rate(r['hit_rate']):>8}  {r['evictions']:>7}  "
                f"{r['stall_ms']:>8.2f}  {r['policy_ms']:>9.2f}"
            )
    if s["per_step"]:
        ps = s["per_step"]
        shown = ps if len(ps) <= 2 * steps_shown else ps[:steps_shown] + [None] + ps[-steps_shown:]
        w("")
        w(
            "per step   ms        decode ms      h2d read     h2d fill     d2h         hit rate  "
            "stall ms   (decode ms: the step's kernels on the GPU; the caller's work on the CPU "
            "backend)"
        )
        for r in shown:
            if r is None:
                w(f"  ... {len(ps) - 2 * steps_shown} more")
                continue
            w(
                f"  {r['step']:>5}  {r['ms']:>8.3f}  {r['decode_gpu_ms']:>13.3f}  "
                f"{_mib(r['h2d_read']):>11}  {_mib(r['h2d_fill']):>11}  "
                f"{_mib(r['d2h_append']):>10}  {_rate(r['hit_rate']):>8}  {r['stall_ms']:>8.3f}"
            )
    tp = s["top"]
    if tp["layers_by_h2d_read"] or tp["heads_by_misses"] or tp["layers_by_stall"]:
        w("")
        w(f"top offenders (up to {top})")
        if tp["layers_by_h2d_read"]:
            w(
                "  layers by bytes read from the host: "
                + ", ".join(
                    f"{r['layer']} ({_mib(r['h2d_read'])})" for r in tp["layers_by_h2d_read"]
                )
            )
        if tp["heads_by_misses"]:
            w(
                "  (layer, KV head) by misses: "
                + ", ".join(
                    f"({r['layer']}, {r['kv_head']}) {r['misses']} misses, hit rate "
                    f"{_rate(r['hit_rate'])}"
                    for r in tp["heads_by_misses"]
                )
            )
        if tp["layers_by_stall"]:
            w(
                "  layers by stall: "
                + ", ".join(f"{r['layer']} ({r['stall_ms']:.2f} ms)" for r in tp["layers_by_stall"])
            )
    return "\n".join(out)


# ---- Chrome / Perfetto trace ----


def _tid(e: dict) -> int:
    if e["track"] in GPU_TRACKS:
        return GPU_TRACKS[e["track"]][0]
    return HOST_TID0 + e["thread"]


def link_series(run: Run) -> dict[str, list]:
    """Link throughput over time per direction: [(t_ns, GB/s), ...], piecewise constant, from
    the timed transfers (fills, downloads) and attention's reads spread over each step's decode
    kernels."""
    edges: dict[str, list] = {"h2d": [], "d2h": []}

    def add(direction, t0, dur, nbytes):
        if dur <= 0 or nbytes <= 0 or direction not in edges:
            return
        r = nbytes / dur
        edges[direction].append((t0, r))
        edges[direction].append((t0 + dur, -r))

    for e in run.kind("span"):
        if e["op"] in ("fill", "prefill_copy", "append_copy"):
            add(e["dir"], e["t_ns"], e["dur_ns"], e["bytes"])
    reads = reads_by_step(run)
    for e in run.kind("span", "decode"):
        add("h2d", e["t_ns"], e["dur_ns"], reads.get(e["step"], 0))
    series = {}
    for d, ev in edges.items():
        ev.sort()
        level, pts = 0.0, []
        for t, delta in ev:
            level += delta
            if abs(level) < 1e-9:
                level = 0.0
            if pts and pts[-1][0] == t:
                pts[-1] = (t, level)
            else:
                pts.append((t, level))
        series[d] = pts
    return series


def chrome_trace(run: Run) -> dict:
    """The run as Trace Event Format JSON (what Perfetto and chrome://tracing open)."""
    pid = 1
    tev = [
        {"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": "kvtier engine"}}
    ]
    roles: dict[int, set] = defaultdict(set)
    for e in run.events:
        if e["track"] == "host":
            roles[e["thread"]].add(e["op"] if e["kind"] == "span" else e["kind"])

    def name_track(tid: int, name: str) -> None:
        tev.append(
            {"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": name}}
        )
        tev.append(
            {
                "ph": "M",
                "name": "thread_sort_index",
                "pid": pid,
                "tid": tid,
                "args": {"sort_index": tid},
            }
        )

    for track in sorted({e["track"] for e in run.events if e["track"] in GPU_TRACKS}):
        name_track(*GPU_TRACKS[track])
    for thread, what in sorted(roles.items()):
        if "step" in what:
            label = "caller (decode_layer, end_step)"
        else:
            label = ", ".join(sorted(w for w in what if w not in ("none",))) or "events"
        name_track(HOST_TID0 + thread, f"host thread {thread}: {label}")

    def us(ns):
        return ns / 1000.0

    reads = reads_by_step(run)
    for e in run.events:
        k = e["kind"]
        if e["dur_ns"] <= 0 or k not in ("span", "step", "stall", "cluster"):
            continue
        args = {"step": e["step"]}
        for f in ("seq", "layer"):
            if e[f] >= 0:
                args[f] = e[f]
        nbytes = e["bytes"]
        if k == "span" and e["op"] == "decode":
            nbytes = reads.get(e["step"], 0)
            args["h2d_read_bytes"] = nbytes
        elif nbytes:
            args["bytes"] = nbytes
        if nbytes:
            args["GB/s"] = round(nbytes / e["dur_ns"], 3)
        if e["dir"] != "none":
            args["dir"] = e["dir"]
        name = {
            "span": e["op"],
            "step": f"step {e['step']}",
            "stall": "stall",
            "cluster": f"cluster ({e['op']})",
        }[k]
        tev.append(
            {
                "ph": "X",
                "name": name,
                "cat": "gpu" if e["track"] in GPU_TRACKS else k,
                "pid": pid,
                "tid": _tid(e),
                "ts": us(e["t_ns"]),
                "dur": us(e["dur_ns"]),
                "args": args,
            }
        )
    # Cache decisions: one instant per (step, layer) with its lookups, and each eviction.
    groups: dict[tuple, dict] = {}
    for e in run.kind("lookup"):
        g = groups.setdefault(
            (e["step"], e["layer"]),
            {"t": e["t_ns"], "tid": _tid(e), "hits": 0, "misses": 0, "heads": 0},
        )
        g["t"] = min(g["t"], e["t_ns"])
        g["hits"] += e["hits"]
        g["misses"] += e["misses"]
        g["heads"] += 1
    for (step, layer), g in sorted(groups.items()):
        t = g["hits"] + g["misses"]
        tev.append(
            {
                "ph": "i",
                "s": "t",
                "name": f"lookup layer {layer}",
                "cat": "cache",
                "pid": pid,
                "tid": g["tid"],
                "ts": us(g["t"]),
                "args": {
                    "step": step,
                    "layer": layer,
                    "hits": g["hits"],
                    "misses": g["misses"],
                    "hit_rate": round(g["hits"] / t, 4) if t else None,
                    "problems": g["heads"],
                },
            }
        )
    for e in run.kind("evict"):
        tev.append(
            {
                "ph": "i",
                "s": "t",
                "name": f"evict layer {e['layer']}",
                "cat": "cache",
                "pid": pid,
                "tid": _tid(e),
                "ts": us(e["t_ns"]),
                "args": {"step": e["step"], "layer": e["layer"], "clusters": e["misses"]},
            }
        )
    # Counters: link throughput (and its share of the peak measured at the start) and cache
    # occupancy.
    peak = link_peaks(run)
    for d, pts in link_series(run).items():
        for t, gbps in pts:
            args = {"GB/s": round(gbps, 3)}
            if peak.get(d):
                args["% of peak"] = round(_pct(gbps, peak[d]), 2)
            tev.append(
                {
                    "ph": "C",
                    "name": f"link {d} GB/s",
                    "pid": pid,
                    "tid": 0,
                    "ts": us(t),
                    "args": args,
                }
            )
    occ: dict[int, list] = defaultdict(list)
    for e in run.kind("occupancy"):
        occ[e["step"]].append(e)
    for step, evs in sorted(occ.items()):
        used = sum(e["bytes"] for e in evs)
        total = sum(e["total"] for e in evs)
        tev.append(
            {
                "ph": "C",
                "name": "cluster cache occupancy %",
                "pid": pid,
                "tid": 0,
                "ts": us(max(e["t_ns"] for e in evs)),
                "args": {"used": round(_pct(used, total), 2)},
            }
        )
    meta = {"source": os.path.basename(run.path), "format": f"{FORMAT} {VERSION}"}
    return {"traceEvents": tev, "displayTimeUnit": "ns", "otherData": meta}


# ---- plots ----


def write_plots(run: Run, s: dict, out_dir: str) -> list:
    """link_throughput.png, hit_rate.png and bytes_per_layer.png in out_dir; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    paths = []
    peak = s["link_peak_gbps"]

    def save(fig, name: str) -> None:
        path = os.path.join(out_dir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    # Link throughput over time (the decode phase alone too, when there was a prefill before).
    series = link_series(run)
    fig, axes = plt.subplots(2, 1, figsize=(10, 6.5))
    steps = s["per_step"]
    decode_t0 = steps[0]["t_s"] if steps else None
    colors = {"h2d": "tab:blue", "d2h": "tab:orange"}
    for ax, zoom in zip(axes, (False, True)):
        for d, pts in series.items():
            if not pts:
                continue
            xs = [t / 1e9 for t, _ in pts]
            ys = [g for _, g in pts]
            if zoom and decode_t0 is not None:
                keep = [i for i, x in enumerate(xs) if x >= decode_t0]
                xs, ys = [xs[i] for i in keep], [ys[i] for i in keep]
            if xs:
                ax.step(xs, ys, where="post", color=colors[d], label=f"{d}")
            if d in peak:
                ax.axhline(
                    peak[d], color=colors[d], ls="--", lw=0.8, label=f"{d} peak {peak[d]:.1f}"
                )
        ax.set_ylabel("GB/s")
        ax.set_ylim(bottom=0)
        if not zoom:
            ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
        ax.set_title("decode steps only" if zoom else "whole run (prefill, then decode)")
    axes[1].set_xlabel("seconds since the trace began")
    axes[0].legend(loc="upper right", fontsize=8)
    fig.suptitle("Link throughput (timed transfers; attention's reads over each step's kernels)")
    save(fig, "link_throughput.png")

    # Hit rate per step, misses beside it.
    fig, ax = plt.subplots(figsize=(10, 4))
    xs = [r["step"] for r in steps]
    ax.bar(xs, [r["misses"] for r in steps], color="tab:red", alpha=0.35, label="misses")
    ax.set_ylabel("cluster misses")
    ax.set_xlabel("decode step")
    ax2 = ax.twinx()
    hr = [float("nan") if r["hit_rate"] is None else 100 * r["hit_rate"] for r in steps]
    ax2.plot(xs, hr, color="tab:green", marker=".")
    ax2.set_ylabel("hit rate %")
    ax2.set_ylim(0, 100)
    ax.set_title("GPU cluster cache: hit rate and misses per step")
    save(fig, "hit_rate.png")

    # Bytes per layer: host -> device above, device -> host below (prompts dwarf the rest).
    fig, axes = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    rows = s["per_layer"]
    xs = [r["layer"] for r in rows]
    for ax, parts, title in (
        (
            axes[0],
            (
                ("h2d_read", "attention's reads", "tab:blue"),
                ("h2d_fill", "gathers into the cache", "tab:cyan"),
            ),
            "host -> device",
        ),
        (
            axes[1],
            (("d2h_prefill", "prompt", "tab:orange"), ("d2h_append", "decoded rows", "tab:brown")),
            "device -> host",
        ),
    ):
        bottom = [0.0] * len(rows)
        for key, label, color in parts:
            ys = [r[key] / 2**20 for r in rows]
            ax.bar(xs, ys, bottom=bottom, color=color, label=label)
            bottom = [b + y for b, y in zip(bottom, ys)]
        ax.set_ylabel("MiB")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[1].set_xlabel("layer")
    axes[1].xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.suptitle("Bytes moved per layer")
    save(fig, "bytes_per_layer.png")
    return paths


# ---- command line ----


def profile(
    path: str, out_dir: str | None = None, plots: bool = True, top: int = 5, stream=None
) -> dict:
    """Reads `path`, prints the summary to `stream` (stdout), and writes summary.txt,
    summary.json, trace.json and the plots into `out_dir` (default: next to the file, named
    after it with _profile). Returns the summary with an "outputs" list."""
    stream = stream or sys.stdout
    run = load(path)
    s = summarize(run, top=top)
    text = format_summary(s, top=top)
    if out_dir is None:
        out_dir = path.removesuffix(".jsonl") + "_profile"
    os.makedirs(out_dir, exist_ok=True)
    outputs = []
    with open(os.path.join(out_dir, "summary.txt"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    outputs.append(os.path.join(out_dir, "summary.txt"))
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(s, f, indent=1)
    outputs.append(os.path.join(out_dir, "summary.json"))
    trace_path = os.path.join(out_dir, "trace.json")
    with open(trace_path, "w", encoding="utf-8") as f:
        json.dump(chrome_trace(run), f)
    outputs.append(trace_path)
    if plots:
        try:
            outputs += write_plots(run, s, out_dir)
        except ImportError:
            text += "\n(plots skipped: matplotlib is not installed; --no-plots silences this)"
    print(text, file=stream)
    print(
        f"wrote         {out_dir}{os.sep}: "
        + ", ".join(os.path.basename(p) for p in outputs)
        + "\n              (open trace.json in ui.perfetto.dev or chrome://tracing)",
        file=stream,
    )
    s["outputs"] = outputs
    return s


def main(argv: list | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="kvtier-trace",
        description="Summarize a kvtier telemetry file; write a Perfetto trace and PNG plots.",
    )
    ap.add_argument("telemetry", help="JSON Lines telemetry file (docs/telemetry.md)")
    ap.add_argument("--out", help="output folder (default: <file>_profile next to it)")
    ap.add_argument("--top", type=int, default=5, help="offenders listed (default 5)")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    args = ap.parse_args(argv)
    try:
        profile(args.telemetry, args.out, plots=not args.no_plots, top=args.top)
    except (TraceError, OSError) as err:
        print(f"kvtier-trace: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
