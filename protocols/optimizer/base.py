"""The optimiser's agent interface, after bluesky-adaptive's ask/tell agents.

bluesky-adaptive's ``Agent`` (``bluesky_adaptive/agents/base.py``) is told observations with
``tell(x, y)`` / ``tell_many(xs, ys)``, asked for the next points with ``ask(batch_size)`` and can
``report()``. Ours keeps those names and meanings without the Kafka/tiled/queue-server plumbing
(the daemon does that part), and adds what a cell needs:

* a finite :class:`SearchSpace` of candidates (a composition grid crossed with process settings, or
  a pool of compositions), so suggestions are always makeable points and duplicates are excluded;
* *pending* points: suggested, not yet measured. ``ask`` never returns an observed or pending
  candidate, and a model agent conditions on pending points (kriging believer in :mod:`.gp`);
* state rebuilt from stored observations: an agent is a pure function of its seed, its
  observations, its pending points and (optionally) :meth:`Agent.model_state`, so a daemon that was
  killed rebuilds it with ``tell_many`` and gets the same next suggestions.

Every agent *maximises* ``y``; the campaign turns minimise/target objectives into a utility.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class SearchSpace:
    """Where an agent may look.

    ``candidates`` holds one row per makeable point: the first ``n_composition`` columns are
    element fractions (rows sum to 1), the remaining ones process parameters in their own units,
    whose ranges are ``lower``/``upper`` (used to scale them to [0, 1]).
    """

    names: tuple[str, ...]
    n_composition: int
    candidates: np.ndarray
    lower: np.ndarray = field(default_factory=lambda: np.zeros(0))
    upper: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def __post_init__(self) -> None:
        c = np.asarray(self.candidates, dtype=float)
        if c.ndim != 2 or c.shape[1] != len(self.names):
            raise ValueError(f"candidates must be (n, {len(self.names)}), got {c.shape}")
        n_proc = len(self.names) - self.n_composition
        if len(self.lower) != n_proc or len(self.upper) != n_proc:
            raise ValueError(f"lower/upper must have {n_proc} entries (process parameters)")
        object.__setattr__(self, "candidates", c)
        object.__setattr__(self, "lower", np.asarray(self.lower, dtype=float))
        object.__setattr__(self, "upper", np.asarray(self.upper, dtype=float))

    @property
    def dim(self) -> int:
        return len(self.names)

    def key(self, x: Sequence[float] | np.ndarray) -> tuple[float, ...]:
        """A hashable identity of a point: rounded, so 0.1 + 0.2 and 0.3 are the same point."""
        return tuple(round(float(v), 6) for v in x)


@dataclass(frozen=True)
class Suggestion:
    """One point to make next, with what the agent knew about it (for the record)."""

    x: np.ndarray
    doc: dict[str, Any]


class Agent(ABC):
    """Ask/tell agent over a finite :class:`SearchSpace`.

    Subclasses implement :meth:`_choose`; this class keeps observations, pending points and the
    bookkeeping that makes ``ask`` never repeat a point.
    """

    name = "agent"

    def __init__(self, space: SearchSpace, seed: int = 0) -> None:
        self.space = space
        self.seed = int(seed)
        self.X: list[np.ndarray] = []
        self.y: list[float] = []
        self._pending: dict[tuple[float, ...], np.ndarray] = {}
        self._index = {space.key(c): i for i, c in enumerate(space.candidates)}
        self._taken = np.zeros(len(space.candidates), dtype=bool)
        self._pending_idx: dict[tuple[float, ...], int] = {}

    # --- ask/tell -------------------------------------------------------------------------
    def tell(self, x: Sequence[float] | np.ndarray, y: float) -> dict[str, Any]:
        """Record an observation; a pending point of the same coordinates stops being pending."""
        return self.tell_many([x], [y])[0]

    def tell_many(
        self, xs: Iterable[Sequence[float] | np.ndarray], ys: Iterable[float]
    ) -> list[dict[str, Any]]:
        xs_ = [np.asarray(x, dtype=float) for x in xs]
        ys_ = [float(v) for v in ys]
        if len(xs_) != len(ys_):
            raise ValueError(f"tell_many: {len(xs_)} points but {len(ys_)} values")
        docs = []
        for x, v in zip(xs_, ys_, strict=True):
            if x.shape != (self.space.dim,):
                raise ValueError(f"tell: x must have {self.space.dim} values, got {x.shape}")
            if not np.isfinite(v):
                raise ValueError(f"tell: y must be finite, got {v}")
            k = self.space.key(x)
            self._pending.pop(k, None)
            self._pending_idx.pop(k, None)
            i = self._index.get(k)
            if i is not None:
                self._taken[i] = True
            self.X.append(x)
            self.y.append(v)
            docs.append({"x": x.tolist(), "y": v, "n_observations": len(self.y)})
        self._observed(xs_, ys_)
        return docs

    def add_pending(self, x: Sequence[float] | np.ndarray) -> None:
        """A point that is being made: never suggested again, and the model accounts for it."""
        x = np.asarray(x, dtype=float)
        k = self.space.key(x)
        self._pending[k] = x
        i = self._index.get(k)
        if i is not None:
            self._pending_idx[k] = i

    def drop_pending(self, x: Sequence[float] | np.ndarray) -> None:
        """A pending point that will not be measured (interrupted): it may be suggested again."""
        k = self.space.key(np.asarray(x, dtype=float))
        self._pending.pop(k, None)
        self._pending_idx.pop(k, None)

    @property
    def pending(self) -> list[np.ndarray]:
        return list(self._pending.values())

    def available(self) -> np.ndarray:
        """Indices of candidates neither observed nor pending."""
        mask = ~self._taken
        if self._pending_idx:
            mask[list(self._pending_idx.values())] = False
        return np.flatnonzero(mask)

    def ask(self, batch_size: int) -> list[Suggestion]:
        """The next ``batch_size`` points (fewer if the space runs out); they become pending."""
        if batch_size < 1:
            raise ValueError(f"ask: batch_size must be >= 1, got {batch_size}")
        avail = self.available()
        if avail.size == 0:
            return []
        # The RNG depends on the state only, so a rebuilt agent asks the same.
        rng = np.random.default_rng([self.seed, len(self.y), len(self._pending)])
        chosen = self._choose(avail, min(batch_size, avail.size), rng)
        out = []
        for i, doc in chosen:
            x = self.space.candidates[i].copy()
            self.add_pending(x)
            out.append(Suggestion(x=x, doc={"agent": self.name, **doc}))
        return out

    def report(self) -> dict[str, Any]:
        """What the agent knows: observation count, best point, pending count."""
        rep: dict[str, Any] = {
            "agent": self.name,
            "n_observations": len(self.y),
            "n_pending": len(self._pending),
            "n_candidates_left": int(self.available().size),
        }
        if self.y:
            b = int(np.argmax(self.y))
            rep.update(best_y=self.y[b], best_x=self.X[b].tolist())
        return rep

    def model_state(self) -> dict[str, Any]:
        """JSON-able state beyond the observations (e.g. fitted hyperparameters)."""
        return {}

    def load_model_state(self, state: dict[str, Any]) -> None:  # noqa: B027
        """Restore :meth:`model_state` before ``tell_many`` replays the observations."""

    # --- for subclasses -------------------------------------------------------------------
    def _observed(self, xs: list[np.ndarray], ys: list[float]) -> None:  # noqa: B027
        """Hook: new observations were appended to ``self.X``/``self.y``."""

    @abstractmethod
    def _choose(
        self, available: np.ndarray, q: int, rng: np.random.Generator
    ) -> list[tuple[int, dict[str, Any]]]:
        """Pick ``q`` distinct indices into ``space.candidates`` from ``available``."""
