"""Compositions: atomic fractions, their validation, and the powder masses that make them.

The cell doses elemental powders by mass, while compositions are stated in atomic fractions, so
every protocol that makes a sample converts with standard atomic weights (IUPAC 2021 abridged
values, g/mol). The table is the protocols' own: ``hardware_sims`` keeps a copy of its own on
purpose (DESIGN.md: a simulator shares no code with the daemon, so a wrong weight here would show
up as a measured composition that disagrees with the target).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

#: Standard atomic weights, g/mol.
ATOMIC_MASS: dict[str, float] = {
    "Li": 6.94, "B": 10.81, "C": 12.011, "N": 14.007, "Mg": 24.305, "Al": 26.982,
    "Si": 28.085, "P": 30.974, "S": 32.06, "Ca": 40.078, "Sc": 44.956, "Ti": 47.867,
    "V": 50.942, "Cr": 51.996, "Mn": 54.938, "Fe": 55.845, "Co": 58.933, "Ni": 58.693,
    "Cu": 63.546, "Zn": 65.38, "Ga": 69.723, "Ge": 72.630, "Sr": 87.62, "Y": 88.906,
    "Zr": 91.224, "Nb": 92.906, "Mo": 95.95, "Ru": 101.07, "Rh": 102.91, "Pd": 106.42,
    "Ag": 107.87, "In": 114.82, "Sn": 118.71, "Sb": 121.76, "La": 138.91, "Ce": 140.12,
    "Pr": 140.91, "Nd": 144.24, "Sm": 150.36, "Gd": 157.25, "Hf": 178.49, "Ta": 180.95,
    "W": 183.84, "Re": 186.21, "Os": 190.23, "Ir": 192.22, "Pt": 195.08, "Au": 196.97,
    "Bi": 208.98,
}

#: How far the fractions of a composition may sum from 1.
SUM_TOLERANCE = 1e-3


def check_composition(composition: Mapping[str, float]) -> dict[str, float]:
    """Validate atomic fractions: known element symbols (case-sensitive), each 0..1, summing to
    1 within :data:`SUM_TOLERANCE`; returns them renormalised to sum exactly 1.

    Raises ValueError with a message that says what is wrong."""
    if not composition:
        raise ValueError("the composition is empty: give atomic fractions per element")
    unknown = [el for el in composition if el not in ATOMIC_MASS]
    if unknown:
        raise ValueError(f"unknown element symbol(s) {unknown} (symbols are case-sensitive: 'Fe')")
    for el, x in composition.items():
        if not math.isfinite(x) or not 0.0 <= x <= 1.0:
            raise ValueError(f"atomic fraction of {el} is {x!r}: must be within 0..1")
    total = sum(composition.values())
    if abs(total - 1.0) > SUM_TOLERANCE:
        raise ValueError(f"atomic fractions sum to {total:.6g}, not 1 (within {SUM_TOLERANCE:g})")
    return {el: x / total for el, x in composition.items()}


def mass_fractions(composition: Mapping[str, float]) -> dict[str, float]:
    """Mass fractions of the atomic ``composition`` (elements with fraction 0 keep 0)."""
    grams = {el: x * ATOMIC_MASS[el] for el, x in composition.items()}
    total = sum(grams.values())
    return {el: g / total for el, g in grams.items()}


def dose_masses(composition: Mapping[str, float], total_mg: float) -> dict[str, float]:
    """Powder mass (mg) of each element for ``total_mg`` of the atomic ``composition``."""
    return {el: w * total_mg for el, w in mass_fractions(composition).items()}


def atomic_fractions(masses_mg: Mapping[str, float]) -> dict[str, float]:
    """Atomic fractions of powders dosed by mass (the composition actually made)."""
    moles = {el: mg / ATOMIC_MASS[el] for el, mg in masses_mg.items() if mg > 0}
    total = sum(moles.values())
    return {el: n / total for el, n in moles.items()} if total > 0 else {}


_FORMULA = re.compile(r"([A-Z][a-z]?)\s*([0-9]*\.?[0-9]*)")


def parse_formula(text: str) -> dict[str, float]:
    """``"Fe25Co25Ni50"``, ``"Fe0.5 Ni0.5"`` or ``"Fe, Ni"`` -> atomic fractions (normalised:
    the numbers are proportions, a missing number is 1). Raises ValueError naming the part it
    cannot read."""
    s = text.replace(",", " ").replace(";", " ").strip()
    if not s:
        raise ValueError("the formula is empty")
    amounts: dict[str, float] = {}
    pos = 0
    for m in _FORMULA.finditer(s):
        gap = s[pos:m.start()].strip()
        if gap:
            raise ValueError(f"cannot read {gap!r} in formula {text!r}")
        el, num = m.group(1), m.group(2)
        if el not in ATOMIC_MASS:
            raise ValueError(f"unknown element symbol {el!r} in formula {text!r}")
        if el in amounts:
            raise ValueError(f"{el} appears twice in formula {text!r}")
        try:
            amounts[el] = float(num) if num else 1.0
        except ValueError:
            raise ValueError(f"cannot read the amount {num!r} of {el} in {text!r}") from None
        pos = m.end()
    rest = s[pos:].strip()
    if rest:
        raise ValueError(f"cannot read {rest!r} in formula {text!r}")
    total = sum(amounts.values())
    if not total > 0:
        raise ValueError(f"formula {text!r} has no positive amount")
    return {el: a / total for el, a in amounts.items()}
