"""Ground truth for the screened property.

Two sources, one interface (:class:`GroundTruth`):

* :class:`SyntheticLandscape`: a smooth, multi-modal function of composition (atomic fractions)
  and anneal temperature, built from a seed. Good for rehearsing the whole cell.
* :class:`TableGroundTruth`: a CSV of measured data (header row, one column per element holding
  fractions, the last column the property), replayed *pool-based*: the analyser answers with the
  measured value of the pool composition nearest to the one actually made. This is how a campaign is
  rehearsed on known data (``--ground-truth FILE --goal minimize|maximize``).
"""

from __future__ import annotations

import csv
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

Goal = Literal["minimize", "maximize"]


class GroundTruthError(ValueError):
    """A ground-truth file that cannot be used, with the reason."""


@dataclass(frozen=True)
class PropertyValue:
    value: float
    #: For a table: the pool row that answered and its distance to the made composition.
    pool_index: int | None = None
    distance: float | None = None


class GroundTruth(ABC):
    elements: tuple[str, ...]
    property_name: str
    unit: str
    goal: Goal

    @abstractmethod
    def evaluate(self, composition: Mapping[str, float], anneal_c: float | None) -> PropertyValue:
        """The property of a sample of ``composition`` (fractions) annealed at ``anneal_c`` °C."""

    def describe(self) -> dict[str, object]:
        return {
            "kind": type(self).__name__,
            "elements": list(self.elements),
            "property": self.property_name,
            "unit": self.unit,
            "goal": self.goal,
        }


def _vector(composition: Mapping[str, float], elements: Sequence[str]) -> np.ndarray:
    unknown = set(composition) - set(elements)
    if unknown:
        raise GroundTruthError(
            f"composition has elements {sorted(unknown)} that the ground truth does not know "
            f"(it knows {list(elements)})"
        )
    x = np.array([float(composition.get(e, 0.0)) for e in elements])
    total = x.sum()
    return x / total if total > 0 else x


class SyntheticLandscape(GroundTruth):
    """A reproducible landscape: Gaussian bumps over the simplex times an anneal-temperature window.

    ``bumps = sum_k a_k exp(-|x - c_k|^2 / (2 w_k^2)) * exp(-((T - T_k)/s_T)^2 / 2)``;
    ``value = base + bumps`` when maximising and ``base + 300 - bumps`` when minimising;
    an unannealed sample (``anneal_c`` None or below 300 °C) gets a fraction of the value.
    """

    def __init__(
        self,
        elements: Sequence[str],
        seed: int = 0,
        goal: Goal = "maximize",
        property_name: str = "hardness",
        unit: str = "HV",
        n_peaks: int = 4,
    ) -> None:
        if len(elements) < 2:
            raise GroundTruthError("a synthetic landscape needs at least two elements")
        self.elements = tuple(elements)
        self.goal = goal
        self.property_name = property_name
        self.unit = unit
        rng = np.random.default_rng(seed)
        d = len(elements)
        self._centres = rng.dirichlet(np.ones(d), size=n_peaks)
        self._widths = rng.uniform(0.12, 0.3, size=n_peaks)
        self._amps = rng.uniform(80.0, 250.0, size=n_peaks)
        self._t_opt = rng.uniform(650.0, 1050.0, size=n_peaks)
        self._base = 150.0
        self._t_width = 180.0

    def evaluate(self, composition: Mapping[str, float], anneal_c: float | None) -> PropertyValue:
        x = _vector(composition, self.elements)
        t = 0.0 if anneal_c is None else float(anneal_c)
        bumps = 0.0
        for c, w, a, t_opt in zip(
            self._centres, self._widths, self._amps, self._t_opt, strict=True
        ):
            comp = math.exp(-float(np.sum((x - c) ** 2)) / (2 * w * w))
            temp = math.exp(-(((t - t_opt) / self._t_width) ** 2) / 2) if t >= 300 else 0.25
            bumps += a * comp * temp
        # Minimising: the peaks become wells, so the same seed gives a landscape of the same shape.
        value = self._base + bumps if self.goal == "maximize" else self._base + 300.0 - bumps
        return PropertyValue(value=value)


class TableGroundTruth(GroundTruth):
    """Pool-based replay of a CSV of measured data."""

    def __init__(self, path: Path | str, goal: Goal) -> None:
        self.path = Path(path)
        self.goal = goal
        try:
            with self.path.open(newline="") as fh:
                rows = list(csv.reader(fh))
        except OSError as exc:
            raise GroundTruthError(f"cannot read ground-truth file {self.path}: {exc}") from exc
        if len(rows) < 2:
            raise GroundTruthError(f"{self.path}: needs a header row and at least one data row")
        header = [h.strip() for h in rows[0]]
        if len(header) < 3:
            raise GroundTruthError(
                f"{self.path}: needs at least two element columns and a property column, "
                f"got header {header}"
            )
        self.elements = tuple(header[:-1])
        self.property_name, self.unit = _split_unit(header[-1])
        data = []
        for lineno, row in enumerate(rows[1:], start=2):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise GroundTruthError(
                    f"{self.path}:{lineno}: {len(row)} fields, header has {len(header)}"
                )
            try:
                data.append([float(c) for c in row])
            except ValueError as exc:
                raise GroundTruthError(f"{self.path}:{lineno}: not a number: {exc}") from exc
        arr = np.array(data)
        self.compositions = arr[:, :-1]
        self.values = arr[:, -1]
        sums = self.compositions.sum(axis=1)
        bad = np.flatnonzero(np.abs(sums - 1.0) > 0.02)
        if bad.size:
            raise GroundTruthError(
                f"{self.path}:{int(bad[0]) + 2}: element fractions sum to {sums[bad[0]]:.3f}, "
                "expected 1"
            )

    def __len__(self) -> int:
        return len(self.values)

    def evaluate(self, composition: Mapping[str, float], anneal_c: float | None) -> PropertyValue:
        x = _vector(composition, self.elements)
        dist = np.abs(self.compositions - x).sum(axis=1)
        i = int(np.argmin(dist))
        return PropertyValue(value=float(self.values[i]), pool_index=i, distance=float(dist[i]))

    def describe(self) -> dict[str, object]:
        d = super().describe()
        d.update(file=str(self.path), pool_size=len(self))
        return d


def _split_unit(column: str) -> tuple[str, str]:
    """``overpotential_V`` -> (``overpotential``, ``V``); ``hardness`` -> (``hardness``, ``""``)."""
    if "_" in column:
        name, unit = column.rsplit("_", 1)
        if unit and len(unit) <= 4:
            return name, unit
    return column, ""


def load_ground_truth(
    file: Path | str | None,
    goal: Goal,
    elements: Sequence[str],
    seed: int = 0,
) -> GroundTruth:
    if file is None:
        return SyntheticLandscape(elements, seed=seed, goal=goal)
    return TableGroundTruth(file, goal)
