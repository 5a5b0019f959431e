"""Pluggable optimisers for campaigns: ask/tell agents (see :mod:`.base`)."""

from __future__ import annotations

from typing import Any

from protocols.optimizer.base import Agent, SearchSpace, Suggestion
from protocols.optimizer.baselines import GridAgent, RandomAgent
from protocols.optimizer.gp import GPAgent, GPConfig

AGENTS: dict[str, type[Agent]] = {"gp": GPAgent, "random": RandomAgent, "grid": GridAgent}


def make_agent(
    kind: str, space: SearchSpace, seed: int = 0, options: dict[str, Any] | None = None
) -> Agent:
    """An agent by name; ``options`` configure the gp agent (fields of :class:`GPConfig`)."""
    if kind not in AGENTS:
        raise ValueError(f"optimizer.kind {kind!r} is not one of {sorted(AGENTS)}")
    options = options or {}
    if kind == "gp":
        try:
            cfg = GPConfig(**options)
        except TypeError as exc:
            raise ValueError(f"optimizer.options: {exc}") from exc
        return GPAgent(space, seed, cfg)
    if options:
        raise ValueError(f"optimizer.options: the {kind} optimizer takes none, got {options}")
    return AGENTS[kind](space, seed)


__all__ = [
    "AGENTS",
    "Agent",
    "GPAgent",
    "GPConfig",
    "GridAgent",
    "RandomAgent",
    "SearchSpace",
    "Suggestion",
    "make_agent",
]
