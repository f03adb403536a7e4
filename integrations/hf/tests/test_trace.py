"""kvtier-trace on a real recorded run of the CPU backend: the summary adds up to the raw events
and to the engine's own counters, the Perfetto trace follows the Trace Event Format, the plots
render, and the command line (the package's and tools/kvtier-trace) reports errors plainly."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from kvtier import _core, trace

REPO = Path(__file__).resolve().parents[3]
L, HQ, HKV, D = 4, 8, 2, 64


def _record(path: Path, steps: int = 24) -> dict:
    """Two sequences through a clusterkv engine with telemetry on: prefill, then `steps` decode
    steps whose queries drift slowly (so the cache sees hits), one sequence leaving midway."""
    c = _core.EngineConfig()
    c.num_layers, c.num_q_heads, c.num_kv_heads, c.head_dim = L, HQ, HKV, D
    c.dtype, c.backend, c.mode = "float32", "cpu", "clusterkv"
    c.budget, c.sink, c.window, c.num_dense_layers = 96, 4, 32, 1
    c.max_sequences = c.max_batch = 2
    c.max_context = 1024
    c.host_bytes_limit = 1 << 28
    c.telemetry_path = str(path)
    e = _core.Engine(c)
    assert e.tracing
    g = torch.Generator().manual_seed(7)
    centers = torch.randn(16, D, generator=g) * 3
    for seq, n in ((0, 600), (1, 420)):
        e.add_sequence(seq)
        for layer in range(L):
            idx = torch.randint(0, 16, (HKV, n), generator=g)
            k = (centers[idx] + 0.3 * torch.randn(HKV, n, D, generator=g)).contiguous()
            v = torch.randn(HKV, n, D, generator=g)
            e.prefill_layer(seq, layer, k, v)
    q0 = centers[torch.randint(0, 16, (2, HQ), generator=g)]
    live = [0, 1]
    for step in range(steps):
        if step == steps // 2:
            e.remove_sequence(1)
            live = [0]
        b = len(live)
        for layer in range(L):
            q = (q0[:b] + 0.05 * torch.randn(b, HQ, D, generator=g)).contiguous()
            k = torch.randn(b, HKV, D, generator=g)
            v = torch.randn(b, HKV, D, generator=g)
            e.decode_layer(layer, live, q, k, v, torch.empty(b, HQ, D))
        e.end_step()
    e.stop_trace()
    assert not e.tracing
    s = e.stats()
    stats = {
        "steps": s.steps,
        "recall_hits": s.recall_hits,
        "recall_misses": s.recall_misses,
        "host_read_bytes": s.host_read_bytes,
        "fill_bytes": s.fill_bytes,
    }
    e.close()
    return stats


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    path = tmp_path_factory.mktemp("trace") / "run.jsonl"
    stats = _record(path)
    return path, stats


def _raw(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_summary_adds_up_to_the_raw_events_and_the_engine(recorded):
    path, stats = recorded
    raw = _raw(path)
    assert raw[0]["kind"] == "begin" and raw[-1]["kind"] == "end"
    assert raw[-1]["dropped"] == 0 and raw[-1]["events"] == len(raw) - 2
    s = trace.summarize(trace.load(str(path)))
    assert s["complete"] and s["dropped"] == 0 and s["events"] == len(raw) - 2

    # Independent sums over the raw lines (fields left out are at their defaults).
    def total(kind, field, op=None, **match):
        return sum(
            e.get(field, 0)
            for e in raw
            if e["kind"] == kind
            and (op is None or e.get("op") == op)
            and all(e.get(k) == v for k, v in match.items())
        )

    hits, misses = total("lookup", "hits"), total("lookup", "misses")
    assert s["cache"]["hits"] == hits == stats["recall_hits"] > 0
    assert s["cache"]["misses"] == misses == stats["recall_misses"] > 0
    assert s["traffic"]["h2d_read"] == total("lookup", "bytes") == stats["host_read_bytes"]
    assert s["traffic"]["h2d_fill"] == total("fetch", "bytes", "fill") == stats["fill_bytes"]
    assert s["bytes_by_direction"]["h2d"] == stats["host_read_bytes"] + stats["fill_bytes"]
    assert s["traffic"]["d2h_prefill"] == total("offload", "bytes", "prefill_store") > 0
    row = 2 * HKV * D * 4  # K and V of one token, fp32
    assert s["traffic"]["d2h_append"] == total("offload", "bytes", "append")
    # Every decoded token reaches the host tier: 12 steps of two sequences, 12 of one.
    assert s["traffic"]["d2h_append"] == (12 * 2 + 12) * L * row
    assert s["cache"]["evictions"] == total("evict", "misses")
    assert s["stall"]["total_ms"] == pytest.approx(total("stall", "dur_ns") / 1e6)

    # Steps: one per end_step, in order, with the step's numbers.
    assert s["steps"]["count"] == stats["steps"] == 24
    assert [p["step"] for p in s["per_step"]] == list(range(24))
    assert sum(p["h2d_read"] for p in s["per_step"]) == s["traffic"]["h2d_read"]
    assert sum(p["hits"] for p in s["per_step"]) == hits
    assert sum(p["d2h_append"] for p in s["per_step"]) == s["traffic"]["d2h_append"]
    assert s["steps"]["total_ms"] == pytest.approx(total("step", "dur_ns") / 1e6)

    # Per layer and per head partition the totals; only recall layers look anything up.
    per_layer = {r["layer"]: r for r in s["per_layer"]}
    assert set(per_layer) == set(range(L))
    for key in ("h2d_read", "h2d_fill", "d2h_prefill", "d2h_append", "hits", "misses"):
        assert (
            sum(r[key] for r in s["per_layer"])
            == {
                "h2d_read": s["traffic"]["h2d_read"],
                "h2d_fill": s["traffic"]["h2d_fill"],
                "d2h_prefill": s["traffic"]["d2h_prefill"],
                "d2h_append": s["traffic"]["d2h_append"],
                "hits": hits,
                "misses": misses,
            }[key]
        ), key
    assert per_layer[0]["hits"] + per_layer[0]["misses"] == 0  # the dense layer
    assert sum(r["misses"] for r in s["per_head"]) == misses
    assert sum(r["h2d_read"] for r in s["per_head"]) == s["traffic"]["h2d_read"]
    assert {(r["layer"], r["kv_head"]) for r in s["per_head"]} == {
        (layer, h) for layer in range(1, L) for h in range(HKV)
    }
    top = s["top"]["heads_by_misses"]
    assert top and top[0]["misses"] == max(r["misses"] for r in s["per_head"])

    # The link was measured when the trace began (a host copy on the CPU backend), and the
    # cache's occupancy was reported for every recall layer and step.
    assert s["link_is_host_copy"] and s["link_peak_gbps"]["h2d"] > 0
    assert len([e for e in raw if e["kind"] == "occupancy"]) == 24 * (L - 1)
    assert 0 < s["cache"]["occupancy_max"] <= 1
    assert s["achieved"]["fill"]["bytes"] == s["traffic"]["h2d_fill"]
    assert s["policy_job"]["steps"] == 24 and 0 < s["policy_job"]["mean_ms"]
    assert s["policy_job"]["p50_ms"] <= s["policy_job"]["max_ms"]

    text = trace.format_summary(s)
    assert f"{hits} hits, {misses} misses" in text
    assert "per layer" in text and "per step" in text and "top offenders" in text


def _check_trace_event_format(doc: dict) -> dict:
    """Checks `doc` against the Trace Event Format (the JSON Object Format of Chrome's trace
    viewer, which Perfetto reads): what each phase needs, with the right types. Returns the
    events by phase."""
    assert isinstance(doc, dict) and isinstance(doc["traceEvents"], list)
    assert doc.get("displayTimeUnit", "ms") in ("ms", "ns")
    phases = defaultdict(list)
    for ev in doc["traceEvents"]:
        ph = ev["ph"]
        assert ph in ("X", "i", "C", "M"), ev
        assert isinstance(ev["name"], str) and ev["name"], ev
        assert isinstance(ev["pid"], int) and isinstance(ev["tid"], int), ev
        if ph != "M":
            assert isinstance(ev["ts"], (int, float)) and ev["ts"] >= 0, ev
        if ph == "X":
            assert isinstance(ev["dur"], (int, float)) and ev["dur"] >= 0, ev
        if ph == "i":
            assert ev["s"] in ("g", "p", "t"), ev
        if ph == "C":
            assert ev["args"] and all(isinstance(v, (int, float)) for v in ev["args"].values()), ev
        if ph == "M":
            assert ev["name"] in ("process_name", "thread_name", "thread_sort_index"), ev
            key = "sort_index" if ev["name"].endswith("sort_index") else "name"
            assert key in ev["args"], ev
        if "args" in ev:
            assert isinstance(ev["args"], dict)
        phases[ph].append(ev)
    return phases


def test_perfetto_trace_is_valid_and_has_every_track(recorded, tmp_path):
    path, stats = recorded
    run = trace.load(str(path))
    doc = json.loads(json.dumps(trace.chrome_trace(run)))  # what a file round-trip gives
    ph = _check_trace_event_format(doc)
    named = {ev["tid"] for ev in ph["M"] if ev["name"] == "thread_name"}
    used = {ev["tid"] for p in ("X", "i") for ev in ph[p]}
    assert used <= named, "every track a slice or instant is on has a name"
    # One track per recording host thread: the caller's (steps) and the workers'.
    host_threads = {e["thread"] for e in run.events if e["track"] == "host"}
    assert {trace.HOST_TID0 + t for t in host_threads} <= named
    assert any("caller" in ev["args"]["name"] for ev in ph["M"] if ev["name"] == "thread_name")
    steps = [ev for ev in ph["X"] if ev["name"].startswith("step ")]
    assert len(steps) == stats["steps"]
    fills = [ev for ev in ph["X"] if ev["name"] == "fill"]
    assert fills and all(ev["args"]["bytes"] > 0 and ev["args"]["GB/s"] >= 0 for ev in fills)
    assert any(ev["name"] == "policy" for ev in ph["X"])
    lookups = [ev for ev in ph["i"] if ev["name"].startswith("lookup")]
    assert sum(ev["args"]["hits"] for ev in lookups) == stats["recall_hits"]
    counters = {ev["name"] for ev in ph["C"]}
    assert "cluster cache occupancy %" in counters and "link h2d GB/s" in counters
    # The link counter returns to zero after the last transfer and is never negative.
    h2d = [ev["args"]["GB/s"] for ev in ph["C"] if ev["name"] == "link h2d GB/s"]
    assert min(h2d) >= 0 and h2d[-1] == 0


def test_plots_render(recorded, tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image as mpimg

    path, _ = recorded
    s = trace.profile(str(path), str(tmp_path / "out"), stream=io.StringIO())
    pngs = [p for p in s["outputs"] if p.endswith(".png")]
    assert sorted(os.path.basename(p) for p in pngs) == [
        "bytes_per_layer.png",
        "hit_rate.png",
        "link_throughput.png",
    ]
    for p in pngs:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        img = mpimg.imread(p)
        assert img.shape[0] > 200 and img.shape[1] > 400
        assert img.std() > 0.01, f"{p} is blank"
    for name in ("summary.txt", "summary.json", "trace.json"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    _check_trace_event_format(json.loads((tmp_path / "out" / "trace.json").read_text()))


def test_command_lines_and_errors(recorded, tmp_path, capsys):
    path, _ = recorded
    assert trace.main([str(path), "--out", str(tmp_path / "a"), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "kvtier-trace" in out and "bytes moved" in out and "trace.json" in out
    # From a checkout, without the package: tools/kvtier-trace loads the module by path.
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "kvtier-trace"),
            str(path),
            "--out",
            str(tmp_path / "b"),
            "--no-plots",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert "hit rate" in r.stdout and (tmp_path / "b" / "trace.json").exists()

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"t_ns":1,"kind":"fetch"}\nnot json\n')
    assert trace.main([str(bad), "--no-plots"]) == 1
    assert "bad.jsonl:2: not a JSON object" in capsys.readouterr().err
    bad.write_text('{"t_ns":0,"kind":"begin","format":"kvtier-telemetry","version":1}\n')
    assert trace.main([str(bad), "--no-plots"]) == 1
    assert "format version 1; this tool reads 2" in capsys.readouterr().err
    bad.write_text('{"t_ns":0,"kind":"teleport"}\n')
    assert trace.main([str(bad), "--no-plots"]) == 1
    assert "unknown event kind 'teleport'" in capsys.readouterr().err
    assert trace.main([str(tmp_path / "missing.jsonl")]) == 1
    assert "No such file" in capsys.readouterr().err


def test_a_file_cut_short_still_profiles(recorded, tmp_path):
    # A run that crashed or is still going has no footer; what is there is still summarized.
    path, _ = recorded
    lines = path.read_text().splitlines()
    cut = tmp_path / "cut.jsonl"
    cut.write_text("\n".join(lines[: len(lines) // 2]) + "\n")
    s = trace.summarize(trace.load(str(cut)))
    assert not s["complete"] and s["dropped"] is None
    assert 0 < s["events"] < len(lines)
    assert "no footer" in trace.format_summary(s)


def test_engine_trace_start_stop_errors(tmp_path):
    c = _core.EngineConfig()
    c.num_layers, c.num_q_heads, c.num_kv_heads, c.head_dim = 2, 8, 2, 64
    c.dtype, c.backend, c.mode = "float32", "cpu", "full"
    c.max_context = 256
    c.host_bytes_limit = 1 << 26
    e = _core.Engine(c)
    assert not e.tracing
    e.start_trace(str(tmp_path / "t.jsonl"))
    with pytest.raises(ValueError, match="being written already"):
        e.start_trace(str(tmp_path / "u.jsonl"))
    e.stop_trace()
    e.stop_trace()  # nothing to stop
    with pytest.raises(RuntimeError, match="cannot open telemetry file"):
        e.start_trace(str(tmp_path / "no" / "such" / "dir.jsonl"))
    e.close()
    raw = _raw(tmp_path / "t.jsonl")
    assert [r["kind"] for r in raw] == ["begin", "link", "end"]
