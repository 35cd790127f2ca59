"""Fixtures of the data tests: small phantoms with merged label maps."""

from __future__ import annotations

import pytest

from ctseg.data.merge import prepare
from ctseg.data.phantoms import write_phantoms


@pytest.fixture(scope="session")
def phantom_records(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Records (image, merged label) of four small phantoms in assorted orientations
    (read-only: copy a file before changing it)."""
    root = tmp_path_factory.mktemp("phantoms")
    write_phantoms(root, 4, seed=3, shape=(40, 40, 32))
    return prepare(root, out=tmp_path_factory.mktemp("prepared")).records
