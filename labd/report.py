"""A campaign's report: best so far, samples made, budgets left (JSON), a plot (PNG) and the
samples (CSV), from the campaign's stored state (:meth:`protocols.campaign.Campaign.to_dict`).

The plot has two panels: the best value against the number of samples made (each sample's value
as a dot), and where in composition space the samples fell. With three elements that is a ternary
diagram; otherwise the compositions are projected on their first two principal components (PCA of
the fractions), coloured by value. Drawn with matplotlib's Agg backend (no display), off the event
loop (the API calls these functions in a thread).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping
from typing import Any

import numpy as np


def _better(goal: str) -> Any:
    return min if goal == "minimize" else max


def best_curve(state: Mapping[str, Any]) -> list[float]:
    """Best value after each sample made, in the order they were recorded."""
    obs = state["observations"]
    out: list[float] = []
    best_u = -math.inf
    best_v = math.nan
    for o in obs:
        if o["utility"] > best_u:
            best_u, best_v = o["utility"], o["value"]
        out.append(best_v)
    return out


def report(state: Mapping[str, Any], status: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON report: what ``labctl campaign report --json`` prints."""
    spec = state["spec"]
    obs = state["observations"]
    best = max(obs, key=lambda o: o["utility"]) if obs else None
    budget = spec["budget"]
    return {
        "id": status.get("id", spec["name"]),
        "status": status.get("status"),
        "reason": status.get("reason"),
        "objective": spec["objective"],
        "elements": list(spec["elements"]),
        "samples_made": len(obs),
        "samples_interrupted": len(state["interrupted"]),
        "samples_pending": len(state["pending"]),
        "budget": {
            "samples": budget.get("samples"),
            "samples_left": None if budget.get("samples") is None
            else budget["samples"] - len(obs) - len(state["pending"]),
            "hours": budget.get("hours"),
            "hours_used": state["seconds_used"] / 3600,
            "grams": budget.get("grams"),
            "grams_used": state["grams_used"],
        },
        "best": None if best is None else {
            k: best.get(k) for k in ("sample_id", "composition", "process", "value",
                                     "measured_composition")},
        "best_after_sample": best_curve(state),
        "best_after_batch": state["best_after_batch"],
        "interrupted": [{"sample_id": o["sample_id"], "reason": o.get("reason")}
                        for o in state["interrupted"]],
    }


def samples_csv(state: Mapping[str, Any]) -> str:
    """One row per sample (made, then interrupted): id, target and measured composition,
    process, value, status."""
    els = list(state["spec"]["elements"])
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["sample_id", "status", *(f"target_{e}" for e in els),
                *(f"measured_{e}" for e in els), "anneal_c", "anneal_h", "value", "reason"])

    def row(o: Mapping[str, Any], status: str) -> list[Any]:
        comp, meas = o["composition"], o.get("measured_composition") or {}
        proc = o.get("process") or {}
        return [o["sample_id"], status, *(comp.get(e, 0.0) for e in els),
                *(meas.get(e, "") for e in els), proc.get("anneal_c", ""),
                proc.get("anneal_h", ""), o.get("value", ""), o.get("reason", "")]

    for o in state["observations"]:
        w.writerow(row(o, "made"))
    for o in state["interrupted"]:
        w.writerow(row(o, "interrupted"))
    return buf.getvalue()


def _ternary(comps: np.ndarray) -> np.ndarray:
    """Barycentric (a, b, c) to 2-D: a at (0, 0), b at (1, 0), c at (1/2, sqrt(3)/2)."""
    b, c = comps[:, 1], comps[:, 2]
    return np.column_stack([b + c / 2, c * math.sqrt(3) / 2])


def plot_png(state: Mapping[str, Any], title: str | None = None) -> bytes:
    """The progress plot as PNG bytes (see the module docstring)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    spec = state["spec"]
    els = list(spec["elements"])
    goal = spec["objective"]["goal"]
    prop = spec["objective"].get("property", "property")
    obs = state["observations"]
    fig = Figure(figsize=(11, 4.8), dpi=100)
    ax1, ax2 = fig.subplots(1, 2)
    n = np.arange(1, len(obs) + 1)
    values = np.array([o["value"] for o in obs], dtype=float)
    if len(obs):
        ax1.scatter(n, values, s=14, color="0.6", label="sample")
        ax1.step(n, best_curve(state), where="post", color="C0", label="best so far")
        ax1.legend(loc="best")
    ax1.set_xlabel("samples made")
    ax1.set_ylabel(f"{prop} ({goal})")
    ax1.set_title("best value against samples made")
    ax1.grid(alpha=0.3)

    comps = np.array([[o["composition"].get(e, 0.0) for e in els] for o in obs], dtype=float)
    if len(els) == 3:
        xy = _ternary(comps) if len(obs) else np.zeros((0, 2))
        corners = _ternary(np.eye(3))
        ax2.plot(*np.vstack([corners, corners[:1]]).T, color="0.3", lw=1)
        for (x, y), el in zip(corners, els, strict=True):
            ax2.annotate(el, (x, y), textcoords="offset points", xytext=(0, 5), ha="center")
        ax2.set_aspect("equal")
        ax2.axis("off")
        ax2.set_title("samples in composition space (ternary)")
    else:
        if len(obs) >= 2:
            centred = comps - comps.mean(0)
            _, sv, vt = np.linalg.svd(centred, full_matrices=False)
            xy = centred @ vt[:2].T
            if xy.shape[1] < 2:
                xy = np.column_stack([xy, np.zeros(len(xy))])
            total = float((sv**2).sum()) or 1.0
            var = [float(s**2) / total for s in sv[:2]] + [0.0, 0.0]
            load = [", ".join(f"{c:+.2f} {e}" for c, e in sorted(
                zip(vt[i], els, strict=True), key=lambda t: -abs(t[0]))[:3])
                for i in range(min(2, len(vt)))] + ["", ""]
            ax2.set_xlabel(f"PC1 ({var[0]:.0%}): {load[0]}", fontsize=8)
            ax2.set_ylabel(f"PC2 ({var[1]:.0%}): {load[1]}", fontsize=8)
        else:
            xy = np.zeros((len(obs), 2))
        ax2.set_title("samples in composition space (PCA of the fractions)")
        ax2.grid(alpha=0.3)
    if len(obs):
        sc = ax2.scatter(xy[:, 0], xy[:, 1], c=values, cmap="viridis", s=30,
                         edgecolors="k", linewidths=0.3)
        fig.colorbar(sc, ax=ax2, label=prop)
        best = _better(goal)(range(len(obs)), key=lambda i: values[i]) if goal != "target" \
            else max(range(len(obs)), key=lambda i: obs[i]["utility"])
        ax2.scatter([xy[best, 0]], [xy[best, 1]], marker="*", s=220, color="red",
                    edgecolors="k", label=f"best: {obs[best]['sample_id']}")
        ax2.legend(loc="best", fontsize=8)
    fig.suptitle(title or f"campaign {spec['name']}: {len(obs)} samples")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
