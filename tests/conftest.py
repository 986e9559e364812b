"""Fixtures shared by tests/*.py (their shared helpers are in helpers.py). pytest.ini puts the
repository root (common, data, benchmark, the method files) and tests/ (helpers) on sys.path."""
import pytest

from helpers import synth_h5


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A synthetic dataset in an HDF5 file: 300 cells, 200 genes, 4 types labelled 1..4."""
    return synth_h5(tmp_path_factory)
