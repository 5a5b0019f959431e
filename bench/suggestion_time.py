"""Time to suggest a batch of 4 with 50, 200 and 1000 observations, against a scikit-learn refit.

Ours (:class:`protocols.optimizer.gp.GPAgent`) between hyperparameter refits: tell the 4 results of
the previous batch (block Cholesky update) and ask for 4 (kriging believer). A typical scikit-learn
user refits ``GaussianProcessRegressor(ConstantKernel * Matern(ARD, nu=2.5) + WhiteKernel,
normalize_y=True, n_restarts_optimizer=3)`` on all observations for every batch. Also printed: our
own refit and the per-batch cost averaged over a refit interval. Pool: the OER plate (2,121
compositions) plus, for 1000 observations, the same plate crossed with anneal temperatures so the
pool is larger than the data.

    python bench/suggestion_time.py [--sizes 50 200 1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from protocols.optimizer.base import SearchSpace
from protocols.optimizer.gp import GPAgent

OER = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "oer_plate_3496.csv"


def sklearn_refit(x: np.ndarray, y: np.ndarray, seed: int) -> float:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel

    kernel = ConstantKernel() * Matern(length_scale=np.ones(x.shape[1]), nu=2.5) + WhiteKernel()
    gp = GaussianProcessRegressor(
        kernel, normalize_y=True, n_restarts_optimizer=3, random_state=seed
    )
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gp.fit(x, y)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[50, 200, 1000])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    data = np.loadtxt(OER, delimiter=",", skiprows=1)
    comps, values = data[:, :-1], data[:, -1]
    temps = np.array([600.0, 800.0])
    cand = np.hstack([np.repeat(comps, len(temps), 0), np.tile(temps, len(comps))[:, None]])
    # A property that depends on temperature too, so the model has something to learn there.
    truth = -np.repeat(values, len(temps)) - 0.02 * ((cand[:, -1] - 700) / 100) ** 2
    space = SearchSpace(
        names=("Ni", "Fe", "Co", "Mn", "Ce", "La", "anneal_c"),
        n_composition=6,
        candidates=cand,
        lower=np.array([500.0]),
        upper=np.array([900.0]),
    )
    print(f"pool {len(cand)} candidates, 7 inputs; batch of 4")
    print(
        f"{'n obs':>6} {'ours: tell+ask':>15} {'ours: refit':>12} {'amortised':>10} "
        f"{'sklearn refit':>14} {'ratio':>7} {'amortised ratio':>16}"
    )
    rng = np.random.default_rng(0)
    for n in args.sizes:
        idx = rng.choice(len(cand), n + 4 * args.repeats, replace=False)
        agent = GPAgent(space, seed=0)
        agent.tell_many(cand[idx[:n]], truth[idx[:n]])
        t0 = time.perf_counter()
        agent.refit()
        t_refit = time.perf_counter() - t0
        warm = agent.ask(4)  # factor built; this batch is the one whose results come in next
        times = []
        for r in range(args.repeats):
            a = copy.deepcopy(agent)
            new = idx[n + 4 * r : n + 4 * (r + 1)]
            for x in warm:
                a.drop_pending(x.x)
            t0 = time.perf_counter()
            a.tell_many(cand[new], truth[new])
            a.ask(4)
            times.append(time.perf_counter() - t0)
            assert a.hyperparameters is not None and a.hyperparameters["fitted_at_n"] == n
        t_ask = float(np.median(times))
        interval = max(agent.cfg.refit_min, math.ceil(agent.cfg.refit_fraction * n))
        batches = max(1, math.ceil(interval / 4))
        amort = t_ask + t_refit / batches
        t_sk = float(
            np.median(
                [
                    sklearn_refit(agent.features(cand[idx[:n]]), truth[idx[:n]], s)
                    for s in range(max(1, args.repeats // 2))
                ]
            )
        )
        print(
            f"{n:6d} {t_ask * 1e3:12.1f} ms {t_refit * 1e3:9.0f} ms {amort * 1e3:7.1f} ms "
            f"{t_sk * 1e3:11.0f} ms {t_ask / t_sk:7.4f} {amort / t_sk:16.4f}",
            flush=True,
        )
    print(
        "ratio = ours (tell 4 + ask 4, between refits) / sklearn refit; amortised adds our "
        "refit spread over the batches between refits"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
