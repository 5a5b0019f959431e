"""The RunEngine fixtures live in :mod:`tests.support.runengine` (shared by the whole suite);
re-exported here because the driver tests import ``ValidatedDocuments`` and ``in_re_loop`` from
this module."""

from tests.support.runengine import ValidatedDocuments, in_re_loop

__all__ = ["ValidatedDocuments", "in_re_loop"]
