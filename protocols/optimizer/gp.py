"""Default optimiser: Bayesian optimisation with a Gaussian process, numpy/scipy only.

Model
    GP with an anisotropic (ARD) Matérn-5/2 kernel on features of a candidate: the element
    fractions, optionally a presence indicator per element (is it in the alloy at all? on a
    composition-spread plate, adding a fourth element changes the phase, not just the mean), and
    the process parameters scaled to [0, 1]. Observations enter through an output warp (``rank``:
    normal scores of the ranks, robust to the long tail of bad samples that otherwise sets the
    kernel's length scales; ``none``: standardised values).

Cost
    Hyperparameters (length scales, signal and noise variance) are refitted by maximising the
    marginal likelihood (L-BFGS-B, analytic gradients, warm start) only when the data grew by
    ``refit_fraction`` since the last fit (at least ``refit_min`` observations). Between refits the
    Cholesky factor ``L`` of the kernel matrix and ``V = L⁻¹ K(X, C)`` over all candidates ``C`` are
    extended by block updates, O(n·k·|C|) for k new points, so asking costs O(n·|C|) instead of the
    O(n³) of a refit.

Batch
    Greedy kriging believer: each chosen (and each pending) point is treated as observed at its
    posterior mean, which leaves the mean unchanged and shrinks the variance around it, so the next
    pick of the batch goes elsewhere unless the first region is clearly best.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from scipy.linalg import cho_solve, cholesky, solve_triangular
from scipy.optimize import minimize
from scipy.special import ndtr, ndtri

from protocols.optimizer.base import Agent, SearchSpace

_SQRT5 = math.sqrt(5.0)
_LOG_2PI = math.log(2 * math.pi)


@dataclass
class GPConfig:
    """Tunables of :class:`GPAgent` (defaults tuned on the OER benchmark plate, see bench/)."""

    acquisition: Literal["ei", "ucb", "top"] = "top"
    #: ``top``: probability of lying above the ``1 - top_fraction`` quantile of the predicted
    #: values over all candidates, i.e. of belonging to the best ``top_fraction`` of the space.
    top_fraction: float = 0.1
    #: EI exploration margin, in units of the warped outputs' standard deviation.
    xi: float = 0.0
    #: UCB: ``beta = ucb_beta0 / (1 + n / ucb_decay)``; the bonus shrinks as data accumulates.
    ucb_beta0: float = 4.0
    ucb_decay: float = 100.0
    #: Random points before the model is trusted.
    n_initial: int = 4
    presence_features: bool = False
    #: ``sqrt`` spreads small fractions apart (0 -> 0.1 is a bigger step than 0.5 -> 0.6).
    composition_transform: Literal["linear", "sqrt"] = "linear"
    output_warp: Literal["rank", "none"] = "rank"
    refit_min: int = 8
    refit_fraction: float = 0.1
    #: Length-scale bounds in feature units (features lie in [0, 1]).
    lengthscale_bounds: tuple[float, float] = (0.03, 30.0)
    noise_bounds: tuple[float, float] = (1e-4, 1.0)
    max_iter: int = 60


# --- kernel and marginal likelihood ---------------------------------------------------------
def _sqdist(a: np.ndarray, b: np.ndarray, ls: np.ndarray) -> np.ndarray:
    a, b = a / ls, b / ls
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def matern52(a: np.ndarray, b: np.ndarray, ls: np.ndarray, s2: float) -> np.ndarray:
    r = _SQRT5 * np.sqrt(_sqdist(a, b, ls))
    return s2 * (1.0 + r + r * r / 3.0) * np.exp(-r)


def neg_log_marginal_likelihood(
    theta: np.ndarray, x: np.ndarray, y: np.ndarray
) -> tuple[float, np.ndarray]:
    """-log p(y | x, theta) and its gradient; ``theta = [log ls (D), log s2, log noise]``."""
    n, d = x.shape
    ls, s2, noise = np.exp(theta[:d]), math.exp(theta[d]), math.exp(theta[d + 1])
    r = _SQRT5 * np.sqrt(_sqdist(x, x, ls))
    e = np.exp(-r)
    kf = s2 * (1.0 + r + r * r / 3.0) * e
    k = kf + noise * np.eye(n)
    try:
        low = cholesky(k, lower=True)
    except np.linalg.LinAlgError:
        return 1e25, np.zeros_like(theta)
    alpha = cho_solve((low, True), y)
    nll = 0.5 * y @ alpha + np.log(np.diag(low)).sum() + 0.5 * n * _LOG_2PI
    w = cho_solve((low, True), np.eye(n)) - np.outer(alpha, alpha)
    grad = np.empty_like(theta)
    common = s2 * (5.0 / 3.0) * (1.0 + r) * e  # dk/dlog(ls_d) = common * delta_d^2 / ls_d^2
    for j in range(d):
        delta = (x[:, j : j + 1] - x[:, j : j + 1].T) / ls[j]
        grad[j] = 0.5 * np.sum(w * common * delta * delta)
    grad[d] = 0.5 * np.sum(w * kf)
    grad[d + 1] = 0.5 * noise * np.trace(w)
    return float(nll), grad


def fit_hyperparameters(
    x: np.ndarray, y: np.ndarray, theta0: np.ndarray, cfg: GPConfig
) -> np.ndarray:
    """Maximum marginal likelihood from a warm start (plain synchronous; run it off the loop)."""
    d = x.shape[1]
    lo_l, hi_l = (math.log(v) for v in cfg.lengthscale_bounds)
    bounds = [(lo_l, hi_l)] * d + [
        (math.log(0.05), math.log(20.0)),
        tuple(math.log(v) for v in cfg.noise_bounds),
    ]
    theta0 = np.clip(theta0, [b[0] for b in bounds], [b[1] for b in bounds])
    res = minimize(
        neg_log_marginal_likelihood,
        theta0,
        args=(x, y),
        jac=True,
        method="L-BFGS-B",
        bounds=bounds,
        options={"maxiter": cfg.max_iter},
    )
    f0, _ = neg_log_marginal_likelihood(theta0, x, y)
    return np.asarray(res.x) if res.fun <= f0 else theta0


def warp(y: np.ndarray, how: str) -> np.ndarray:
    """Observations -> GP targets with mean 0 and unit spread."""
    if how == "rank":
        ranks = np.argsort(np.argsort(y, kind="stable"), kind="stable")
        return ndtri((ranks + 0.5) / len(y))
    sd = float(np.std(y))
    return (y - np.mean(y)) / (sd if sd > 0 else 1.0)


# --- the agent ------------------------------------------------------------------------------
class GPAgent(Agent):
    """Batch Bayesian optimisation over a finite candidate set (see the module docstring)."""

    name = "gp"

    def __init__(self, space: SearchSpace, seed: int = 0, config: GPConfig | None = None) -> None:
        super().__init__(space, seed)
        self.cfg = config or GPConfig()
        self._fc = self.features(space.candidates)
        self._theta: np.ndarray | None = None
        self._n_fit = 0
        self._low: np.ndarray | None = None  # Cholesky factor over the observations
        self._v: np.ndarray | None = None  # L^-1 K(X, candidates)
        self._vsq: np.ndarray | None = None  # column sums of V**2
        self._fx = np.zeros((0, self._fc.shape[1]))

    # features ----------------------------------------------------------------------------
    def features(self, x: np.ndarray) -> np.ndarray:
        x = np.atleast_2d(np.asarray(x, dtype=float))
        k = self.space.n_composition
        comp = x[:, :k]
        parts = [np.sqrt(np.maximum(comp, 0)) if self.cfg.composition_transform == "sqrt" else comp]
        if self.cfg.presence_features:
            parts.append((x[:, :k] > 1e-9).astype(float))
        if x.shape[1] > k:
            span = np.where(
                self.space.upper > self.space.lower, self.space.upper - self.space.lower, 1
            )
            parts.append((x[:, k:] - self.space.lower) / span)
        return np.hstack(parts)

    # state -------------------------------------------------------------------------------
    def model_state(self) -> dict[str, Any]:
        return {
            "theta": None if self._theta is None else self._theta.tolist(),
            "n_fit": self._n_fit,
            "config": asdict(self.cfg),
        }

    def load_model_state(self, state: dict[str, Any]) -> None:
        if state.get("theta") is not None:
            self._theta = np.asarray(state["theta"], dtype=float)
            self._n_fit = int(state["n_fit"])
            self._low = self._v = self._vsq = None
            self._fx = np.zeros((0, self._fc.shape[1]))

    @property
    def hyperparameters(self) -> dict[str, Any] | None:
        if self._theta is None:
            return None
        d = self._fc.shape[1]
        return {
            "lengthscales": np.exp(self._theta[:d]).tolist(),
            "signal_variance": math.exp(self._theta[d]),
            "noise_variance": math.exp(self._theta[d + 1]),
            "fitted_at_n": self._n_fit,
        }

    # model -------------------------------------------------------------------------------
    def _kern(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        assert self._theta is not None
        d = self._fc.shape[1]
        return matern52(a, b, np.exp(self._theta[:d]), math.exp(self._theta[d]))

    @property
    def _noise(self) -> float:
        assert self._theta is not None
        return math.exp(self._theta[-1])

    @property
    def _s2(self) -> float:
        assert self._theta is not None
        return math.exp(self._theta[-2])

    def _needs_refit(self) -> bool:
        n = len(self.y)
        if self._theta is None:
            return True
        grown = n - self._n_fit
        return grown >= max(self.cfg.refit_min, math.ceil(self.cfg.refit_fraction * self._n_fit))

    def refit(self) -> None:
        """Refit the hyperparameters on all observations and rebuild the factorisation."""
        fx = self.features(np.array(self.X))
        yw = warp(np.array(self.y), self.cfg.output_warp)
        d = fx.shape[1]
        theta0 = (
            self._theta
            if self._theta is not None
            else np.concatenate([np.full(d, math.log(0.5)), [0.0, math.log(0.05)]])
        )
        self._theta = fit_hyperparameters(fx, yw, theta0, self.cfg)
        self._n_fit = len(self.y)
        self._rebuild()

    def _rebuild(self) -> None:
        fx = self.features(np.array(self.X))
        k = self._kern(fx, fx) + self._noise * np.eye(len(fx))
        self._low = _chol(k)
        self._v = solve_triangular(self._low, self._kern(fx, self._fc), lower=True)
        self._vsq = (self._v * self._v).sum(0)
        self._fx = fx

    def _observed(self, xs: list[np.ndarray], ys: list[float]) -> None:
        if self._low is None or self._v is None or self._vsq is None:
            return  # built lazily at the next ask
        fnew = self.features(np.array(xs))
        k12 = self._kern(self._fx, fnew)
        l21 = solve_triangular(self._low, k12, lower=True).T  # (k, n)
        k22 = self._kern(fnew, fnew) + self._noise * np.eye(len(fnew))
        l22 = _chol(k22 - l21 @ l21.T)
        n, m = self._low.shape[0], len(fnew)
        low = np.zeros((n + m, n + m))
        low[:n, :n] = self._low
        low[n:, :n] = l21
        low[n:, n:] = l22
        vnew = solve_triangular(l22, self._kern(fnew, self._fc) - l21 @ self._v, lower=True)
        self._low = low
        self._v = np.vstack([self._v, vnew])
        self._vsq = self._vsq + (vnew * vnew).sum(0)
        self._fx = np.vstack([self._fx, fnew])

    def posterior(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and variance (warped units, noise-free) at candidates ``idx``."""
        assert self._low is not None and self._v is not None and self._vsq is not None
        yw = warp(np.array(self.y), self.cfg.output_warp)
        beta = solve_triangular(self._low, yw, lower=True)
        mu = self._v[:, idx].T @ beta
        var = np.maximum(self._s2 - self._vsq[idx], 1e-12)
        return mu, var

    # asking ------------------------------------------------------------------------------
    def _choose(
        self, available: np.ndarray, q: int, rng: np.random.Generator
    ) -> list[tuple[int, dict[str, Any]]]:
        if len(self.y) < max(2, self.cfg.n_initial):
            picks = rng.choice(available, size=q, replace=False)
            return [(int(i), {"reason": "initial design"}) for i in picks]
        if self._needs_refit():
            self.refit()
        elif self._low is None or self._low.shape[0] != len(self.y):
            self._rebuild()
        assert self._v is not None and self._low is not None
        mu, var = self.posterior(available)
        tau = 0.0
        if self.cfg.acquisition == "top":
            mu_all, _ = self.posterior(np.arange(len(self._fc)))
            tau = float(np.quantile(mu_all, 1.0 - self.cfg.top_fraction))
        best = float(warp(np.array(self.y), self.cfg.output_warp).max())
        # Pending points (and the batch's own picks) as kriging-believer fantasies.
        fant = [self.features(p)[0] for p in self.pending]
        fant_mu = [float(self._predict_mean(np.array([f]))[0]) for f in fant]
        va = self._v[:, available]
        fa = self._fc[available]
        taken = np.zeros(len(available), dtype=bool)
        out: list[tuple[int, dict[str, Any]]] = []
        for _ in range(q):
            v_now = var.copy()
            if fant:
                fs = np.array(fant)
                vs = solve_triangular(self._low, self._kern(self._fx, fs), lower=True)
                sig = self._kern(fs, fs) + self._noise * np.eye(len(fs)) - vs.T @ vs
                cross = self._kern(fa, fs) - va.T @ vs
                sol = np.linalg.solve(sig + 1e-10 * np.eye(len(fs)), cross.T)
                v_now = np.maximum(var - (cross * sol.T).sum(1), 1e-12)
            inc = max([best, *fant_mu]) if self.cfg.acquisition != "top" else tau
            acq = self._acquisition(mu, np.sqrt(v_now), inc)
            acq[taken] = -np.inf
            j = int(np.argmax(acq))
            taken[j] = True
            i = int(available[j])
            out.append(
                (i, {"mean": float(mu[j]), "sd": float(math.sqrt(v_now[j])), "acq": float(acq[j])})
            )
            fant.append(self._fc[i])
            fant_mu.append(float(mu[j]))
        return out

    def _predict_mean(self, f: np.ndarray) -> np.ndarray:
        assert self._low is not None
        yw = warp(np.array(self.y), self.cfg.output_warp)
        beta = solve_triangular(self._low, yw, lower=True)
        vs = solve_triangular(self._low, self._kern(self._fx, f), lower=True)
        return vs.T @ beta

    def _acquisition(self, mu: np.ndarray, sd: np.ndarray, best: float) -> np.ndarray:
        if self.cfg.acquisition == "ucb":
            beta = self.cfg.ucb_beta0 / (1.0 + len(self.y) / self.cfg.ucb_decay)
            return mu + math.sqrt(beta) * sd
        z = (mu - best - self.cfg.xi) / sd
        if self.cfg.acquisition == "top":
            return ndtr(z)
        return sd * (z * ndtr(z) + np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi))

    def report(self) -> dict[str, Any]:
        rep = super().report()
        rep["hyperparameters"] = self.hyperparameters
        return rep


def _chol(k: np.ndarray) -> np.ndarray:
    jitter = 0.0
    for _ in range(6):
        try:
            return cholesky(k + jitter * np.eye(len(k)), lower=True)
        except np.linalg.LinAlgError:
            jitter = max(jitter * 10, 1e-8)
    raise np.linalg.LinAlgError("kernel matrix is not positive definite even with jitter")
