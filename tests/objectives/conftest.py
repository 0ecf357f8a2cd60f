"""The training tests' tiny model directory and arithmetic dataset (tests/train/conftest.py), shared here."""

from tests.train.conftest import workspace  # noqa: F401
