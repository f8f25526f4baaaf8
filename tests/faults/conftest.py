"""Fault-injection tests: the training fixtures (a prepared tiny dataset and model) are shared with tests/train."""

from tests.train.conftest import prepared  # noqa: F401
