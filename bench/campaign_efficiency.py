"""Campaign efficiency on a ground-truth table: Top% per batch and acceleration over random search.

Runs :class:`protocols.campaign.Campaign` (the code the daemon runs) pool-based on the table: each
planned sample is answered with the table's value for its composition. Metric (Liang et al., npj
Comput. Mater. 7, 188, 2021; see ../shared/benchmarks/README.md): the top set is the best
``ceil(0.05 N)`` rows; ``Top%(i)`` is the fraction of it found after ``i`` samples; random search
finds ``Top%(i) = i / N`` on average, so ``AF(t) = t N / i_campaign(t)``.

    python bench/campaign_efficiency.py --ground-truth ../shared/benchmarks/oer_plate_3496.csv \
        --goal minimize --budget 400 --batch 4 --seeds 5 [--optimizer gp|random|grid] [--json]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from protocols.campaign import Campaign, CampaignSpec

THRESHOLDS = (0.2, 0.5)


def load_table(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    with path.open(newline="") as fh:
        rows = [r for r in csv.reader(fh) if r]
    data = np.array([[float(c) for c in r] for r in rows[1:]])
    return [h.strip() for h in rows[0][:-1]], data[:, :-1], data[:, -1]


def run_one(
    path: Path,
    goal: str,
    budget: int,
    batch: int,
    seed: int,
    optimizer: str,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One campaign on the table; Top% after each batch and the sample counts at the thresholds."""
    elements, comps, values = load_table(path)
    n = len(values)
    n_top = math.ceil(0.05 * n)
    order = np.argsort(values if goal == "minimize" else -values, kind="stable")
    top = set(order[:n_top].tolist())
    lookup = {tuple(round(float(v), 6) for v in c / c.sum()): i for i, c in enumerate(comps)}
    spec = CampaignSpec.model_validate(
        {
            "name": f"bench-{optimizer}-{seed}",
            "elements": {el: {"min": 0, "max": 1} for el in elements},
            "pool": str(path),
            "objective": {"goal": goal},
            "batch_size": batch,
            "budget": {"samples": budget},
            "optimizer": {"kind": optimizer, "seed": seed, "options": options or {}},
        }
    )
    camp = Campaign(spec)
    found, made = 0, 0
    reached: dict[float, int | None] = dict.fromkeys(THRESHOLDS)
    curve: list[float] = []
    t0 = time.perf_counter()
    while True:
        planned = camp.next_batch()
        if not planned:
            break
        for p in planned:
            i = lookup[tuple(round(p["composition"][el], 6) for el in elements)]
            camp.record(p["sample_id"], float(values[i]))
            made += 1
            found += i in top
            for t in THRESHOLDS:
                if reached[t] is None and found >= t * n_top:
                    reached[t] = made
        curve.append(found / n_top)
    af = {t: (t * n / reached[t] if reached[t] else None) for t in THRESHOLDS}
    return {
        "seed": seed,
        "optimizer": optimizer,
        "samples": made,
        "top_percent_per_batch": curve,
        "i_at": {str(t): reached[t] for t in THRESHOLDS},
        "af": {str(t): af[t] for t in THRESHOLDS},
        "seconds": time.perf_counter() - t0,
        "pool_size": n,
        "n_top": n_top,
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for t in THRESHOLDS:
        vals = [r["af"][str(t)] for r in runs]
        ok = [v for v in vals if v is not None]
        out[str(t)] = {
            "mean": float(np.mean(ok)) if len(ok) == len(vals) else None,
            "per_seed": vals,
            "not_reached": len(vals) - len(ok),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--ground-truth", type=Path, required=True)
    ap.add_argument("--goal", choices=["minimize", "maximize"], required=True)
    ap.add_argument("--budget", type=int, required=True, help="samples per campaign")
    ap.add_argument("--batch", type=int, required=True, help="samples per batch")
    ap.add_argument("--seeds", type=int, required=True, help="campaigns (seeds 0..S-1)")
    ap.add_argument("--optimizer", choices=["gp", "random", "grid"], default="gp")
    ap.add_argument("--json", action="store_true", help="one JSON document on stdout")
    args = ap.parse_args(argv)

    runs = []
    for seed in range(args.seeds):
        r = run_one(args.ground_truth, args.goal, args.budget, args.batch, seed, args.optimizer)
        runs.append(r)
        if not args.json:
            print(f"seed {seed} ({args.optimizer}): Top% after each batch of {args.batch}:")
            curve = r["top_percent_per_batch"]
            for b in range(0, len(curve), 10):
                chunk = " ".join(f"{v:.2f}" for v in curve[b : b + 10])
                print(f"  batches {b + 1:3d}-{min(b + 10, len(curve)):3d}: {chunk}")
            print(
                "  samples to Top% 0.2: {} (random: {:.0f}), to 0.5: {} (random: {:.0f}); "
                "AF(0.2) {}  AF(0.5) {}  [{:.1f} s]".format(
                    r["i_at"]["0.2"],
                    0.2 * r["pool_size"],
                    r["i_at"]["0.5"],
                    0.5 * r["pool_size"],
                    _fmt(r["af"]["0.2"]),
                    _fmt(r["af"]["0.5"]),
                    r["seconds"],
                ),
                flush=True,
            )
    summary = summarise(runs)
    if args.json:
        print(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "summary": summary,
                    "runs": runs,
                }
            )
        )
    else:
        for t in THRESHOLDS:
            s = summary[str(t)]
            per = " ".join(_fmt(v) for v in s["per_seed"])
            print(
                f"AF({t}) {args.optimizer}: mean {_fmt(s['mean'])} over {args.seeds} seeds "
                f"[{per}]" + (f", not reached in {s['not_reached']}" if s["not_reached"] else "")
            )
    return 0


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


if __name__ == "__main__":
    raise SystemExit(main())
