"""python -m kvtier.profile: hyper-parameters searched on a calibration split.

ClusterAttn's density clustering (DBAC, docs/dbac.md) has parameters its paper profiles per model
rather than fixes: the neighbourhood ``eps`` (dbac_eps), the density threshold
(dbac_min_density_ratio) and the observation window (observation_window), and how much of the
budget clusterattn keeps for the most recent prompt rows (dbac_recent_share); ClusterKV's cluster
size (tokens_per_cluster: prompt rows per k-means cluster) and how clusters are scored
(mean_key_scores: by their mean key or their unit centroid) are too. This command scores every
combination of the given values on the calibration split of kvtier.eval's needle cases (about 20%
of them, spread over lengths and depths, see ``calibration``; the config lists them, and eval
--config with the same --seed leaves them out), in one mode at a budget, and writes the best to a
JSON config. clusterattn searches DBAC's options, clusterkv the recall options, hybrid both:

    python -m kvtier.profile --device cuda --budget 512 --out kvtier-dbac.json
    python -m kvtier.profile --device cuda --mode clusterkv --tokens-per-cluster 16 32 64 \
        --out kvtier-clusterkv.json
    python -m kvtier.eval --config kvtier-dbac.json kvtier-clusterkv.json ...  # the other 80%
    python -m kvtier.generate --config kvtier-dbac.json --mode clusterattn ...

The score is needle accuracy on the calibration cases; ties go to the lower perplexity of
--ppl-tokens tokens after --ppl-context (0 skips it), pooled over --ppl-spans spans taken from the
end of the text (kvtier.eval scores its spans from the start, so the two read different text), then
to the earlier combination in the grid.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

from . import eval as kv_eval
from . import generate as g

#: Engine options a profile config may set: DBAC's (clusterattn, hybrid) and recall's
#: (clusterkv, hybrid).
DBAC_KEYS = ("dbac_eps", "dbac_min_density_ratio", "observation_window", "dbac_recent_share")
RECALL_KEYS = ("tokens_per_cluster", "mean_key_scores")
CONFIG_KEYS = DBAC_KEYS + RECALL_KEYS


def options_for(mode: str, options: dict | None) -> dict:
    """The profiled options that apply to `mode`."""
    keys = {"clusterattn": DBAC_KEYS, "clusterkv": RECALL_KEYS, "hybrid": CONFIG_KEYS}.get(mode, ())
    return {k: v for k, v in (options or {}).items() if k in keys}


def calibration(cases: list) -> list:
    """The calibration split, about 20% of `cases` ((length, depth, case) tuples): a case is in
    when its length's, depth's and case's indices sum to a multiple of 5, so the split takes
    every depth and every length in turn rather than the same few."""
    lengths = sorted({n for n, _, _ in cases})
    depths = sorted({d for _, d, _ in cases})
    return [(n, d, c) for n, d, c in cases if (lengths.index(n) + depths.index(d) + c) % 5 == 0]


def held_out(cases: list, config=None, seed: int | None = None) -> list:
    """The cases a profile did not see: those not in `config`'s calibration cases (when the
    config was made with the same seed, hence the same passkeys), else those calibration()
    leaves out of `cases`. `config`: a path or a list of paths (the cases none of them saw)."""
    if config is None:
        return [c for c in cases if c not in set(calibration(cases))]
    seen: set = set()
    for path in [config] if isinstance(config, (str, Path)) else config:
        with open(path) as f:
            data = json.load(f)
        if "calibration" in data and data.get("seed") == seed:
            seen |= {tuple(c) for c in data["calibration"]}
        elif "calibration" not in data:
            seen |= set(calibration(cases))
        # else: other passkeys, so none of these cases was seen
    return [c for c in cases if c not in seen]


def load_configs(paths) -> list[dict]:
    """Each config of `paths` as {"budget": the budget it was profiled at (None if unknown),
    "options": its engine options}."""
    out = []
    for p in [paths] if isinstance(paths, (str, Path)) else paths:
        data = _read(p)
        out.append(dict(budget=data.get("budget"), options=_options(p, data)))
    return out


def pick(configs: list[dict], budget: int) -> dict:
    """The options for a run at `budget`: each option from the config profiled nearest to
    `budget` that sets it (profiles at several budgets: each budget gets its own)."""
    chosen: dict = {}
    for key in CONFIG_KEYS:
        having = [c for c in configs if key in c["options"]]
        if having:
            # A config that does not say its budget serves only where no other sets the key.
            near = min(
                having,
                key=lambda c: (
                    math.inf if c["budget"] is None else abs(c["budget"] - budget),
                    c["budget"] or 0,
                ),
            )
            chosen[key] = near["options"][key]
    return chosen


def _read(path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"kvtier.profile: cannot read the config {path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"kvtier.profile: {path} holds no options object")
    return data


def _options(path, data: dict) -> dict:
    options = data.get("options", data)
    if not isinstance(options, dict):
        raise ValueError(f"kvtier.profile: {path} holds no options object")
    unknown = sorted(set(options) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"kvtier.profile: {path}: unknown option(s) {', '.join(unknown)}")
    return {k: options[k] for k in CONFIG_KEYS if k in options}


def load_config(path) -> dict:
    """The engine options of a profile config (CONFIG_KEYS only); of several (a list of paths),
    all their options, a later config's winning. (kvtier.eval picks per budget instead, with
    load_configs and pick.)"""
    if isinstance(path, (list, tuple)):
        merged: dict = {}
        for p in path:
            merged.update(load_config(p))
        return merged
    return _options(path, _read(path))


def search(grid: list[dict], score) -> tuple[dict, list[dict]]:
    """score(options) -> (needle accuracy, perplexity or nan). Returns the best options (highest
    accuracy, then lowest perplexity, then first in the grid) and every result."""
    results = []
    for options in grid:
        acc, ppl = score(options)
        results.append(dict(options=options, needle=acc, perplexity=ppl))

    def rank(item):
        i, r = item
        ppl = r["perplexity"]
        # NaN (not measured, or a broken setting) ranks last; when none was measured all tie.
        return (r["needle"], -math.inf if math.isnan(ppl) else -ppl, -i)

    best = max(enumerate(results), key=rank)[1]
    return best["options"], results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m kvtier.profile",
        description="Search DBAC's eps, density threshold and observation window on a "
        "calibration split of the needle cases.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=None)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="auto", choices=g.DTYPES)
    p.add_argument("--mode", default="clusterattn", choices=("clusterattn", "clusterkv", "hybrid"))
    p.add_argument("--budget", type=int, default=512)
    p.add_argument("--lengths", nargs="+", type=int, default=[2048, 4096, 8192])
    p.add_argument("--depths", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--cases", type=int, default=2)
    p.add_argument("--eps", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--density", nargs="+", type=float, default=[0.5, 1.0, 2.0])
    p.add_argument("--windows", nargs="+", type=int, default=[16, 32, 64])
    p.add_argument(
        "--recent-shares",
        nargs="+",
        type=float,
        default=[0.0],
        help="clusterattn: share of the budget kept for the most recent prompt rows",
    )
    p.add_argument(
        "--tokens-per-cluster",
        nargs="+",
        type=int,
        default=[64],
        help="prompt rows per k-means cluster (clusterkv, hybrid)",
    )
    p.add_argument(
        "--mean-key-scores",
        nargs="+",
        type=int,
        choices=(0, 1),
        default=[0],
        help="1: score clusters by their mean key, 0: by their unit centroid (clusterkv, hybrid)",
    )
    p.add_argument("--ppl-context", type=int, default=4096, help="0: no perplexity tie-break")
    p.add_argument("--ppl-tokens", type=int, default=128)
    p.add_argument(
        "--ppl-spans",
        type=int,
        default=1,
        help="spans of the text from its end (kvtier.eval's come from its start), pooled",
    )
    p.add_argument("--new-tokens", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="kvtier-dbac.json")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    progress = g.Progress(not args.quiet)
    try:
        device, _, source, model, tokenizer = kv_eval.load(args, progress)
    except g.SetupError as e:
        print(f"kvtier.profile: {e}", file=sys.stderr)
        return 2
    encode = g.chat_encoder(tokenizer)
    haystack = g.haystack_text()
    cases = calibration(kv_eval.needle_cases(args.lengths, args.depths, args.cases))
    prompts = [
        g.fit_prompt(haystack, kv_eval.passkey_for(args.seed, n, d, c), d, n, encode)
        for n, d, c in cases
    ]
    spans = []
    if args.ppl_context > 0 and args.ppl_tokens > 0 and args.ppl_spans > 0:
        try:
            spans = kv_eval.text_spans(
                tokenizer,
                haystack,
                args.ppl_context + args.ppl_tokens,
                args.ppl_spans,
                device,
                from_end=True,
            )
        except ValueError as e:
            print(f"kvtier.profile: {e}", file=sys.stderr)
            return 2

    def score(options: dict) -> tuple[float, float]:
        t0 = time.perf_counter()
        hits = 0
        for prompt in prompts:
            ok, _, _ = kv_eval.needle_case(
                model, tokenizer, prompt, args.mode, args.budget, args.new_tokens, options
            )
            hits += ok
        ppl = kv_eval.pooled_perplexity(
            kv_eval.perplexity(model, ids, args.ppl_context, args.mode, args.budget, options)[0]
            for ids in spans
        )
        progress.update(
            f"{options}: needle {hits}/{len(prompts)}, perplexity {ppl:.3f} "
            f"({time.perf_counter() - t0:.1f} s)"
        )
        return hits / len(prompts), ppl

    dbac = [
        dict(dbac_eps=e, dbac_min_density_ratio=r, observation_window=w)
        for e, r, w in itertools.product(args.eps, args.density, args.windows)
    ]
    if args.mode == "clusterattn":
        dbac = [{**d, "dbac_recent_share": s} for d in dbac for s in args.recent_shares]
    recall = [
        dict(tokens_per_cluster=t, mean_key_scores=bool(m))
        for t, m in itertools.product(args.tokens_per_cluster, args.mean_key_scores)
    ]
    if args.mode == "clusterattn":
        grid = dbac
    elif args.mode == "clusterkv":
        grid = recall
    else:
        grid = [{**d, **r} for d, r in itertools.product(dbac, recall)]
    best, results = search(grid, score)
    progress.update("done", final=True)
    Path(args.out).write_text(
        json.dumps(
            dict(
                options=best,
                model=source.name,
                mode=args.mode,
                budget=args.budget,
                calibration_cases=len(prompts),
                calibration=[list(c) for c in cases],
                seed=args.seed,
                lengths=args.lengths,
                depths=args.depths,
                cases=args.cases,
                perplexity={
                    "context": args.ppl_context,
                    "tokens": args.ppl_tokens,
                    "spans": len(spans),
                    "from_end": True,
                },
                results=results,
            ),
            indent=1,
        )
        + "\n"
    )
    keys = list(grid[0])
    print("  ".join(f"{k:>22}" for k in keys) + f"  {'needle':>7} {'perplexity':>10}")
    for r in results:
        o = r["options"]
        mark = "  <- best" if o == best else ""
        print(
            "  ".join(f"{o[k]:>22}" for k in keys)
            + f"  {r['needle']:>7.1%} {r['perplexity']:>10.3f}{mark}"
        )
    print(f"wrote {args.out} ({len(prompts)} calibration cases, {args.mode}, budget {args.budget})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
