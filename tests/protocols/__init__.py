"""Tests of protocols/: campaigns and the optimiser."""
