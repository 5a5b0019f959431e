"""Baselines for comparison: random search and a grid sweep."""

from __future__ import annotations

from typing import Any

import numpy as np

from protocols.optimizer.base import Agent, SearchSpace


class RandomAgent(Agent):
    """Uniformly random among the candidates not yet made or pending."""

    name = "random"

    def _choose(
        self, available: np.ndarray, q: int, rng: np.random.Generator
    ) -> list[tuple[int, dict[str, Any]]]:
        picks = rng.choice(available, size=q, replace=False)
        return [(int(i), {}) for i in picks]


def _van_der_corput(n: int) -> np.ndarray:
    """Base-2 radical inverse of 0..n-1: an order in which any prefix is spread evenly."""
    out = np.zeros(n)
    for i in range(n):
        f, v, k = 0.5, 0.0, i
        while k:
            v += f * (k & 1)
            k >>= 1
            f /= 2
        out[i] = v
    return out


class GridAgent(Agent):
    """A coarse-to-fine sweep of the candidate grid in its enumeration order.

    Candidates are visited in van der Corput order of their index, so the first samples are spread
    over the whole grid rather than filling one corner; the seed rotates the starting point.
    """

    name = "grid"

    def __init__(self, space: SearchSpace, seed: int = 0) -> None:
        super().__init__(space, seed)
        n = len(space.candidates)
        shift = np.random.default_rng(seed).random()
        self._rank = np.argsort(np.argsort((_van_der_corput(n) + shift) % 1.0))

    def _choose(
        self, available: np.ndarray, q: int, rng: np.random.Generator
    ) -> list[tuple[int, dict[str, Any]]]:
        order = available[np.argsort(self._rank[available])]
        return [(int(i), {}) for i in order[:q]]
