"""Bluesky plans of the cell; importing the package registers every protocol (see
:mod:`protocols.registry`)."""

from . import batch, sample, technician  # noqa: F401  (register the protocols)
