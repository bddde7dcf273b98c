"""Fixtures for the validation tests: every image of :data:`images.CASES`, built once."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.validate.images import build_all


@pytest.fixture(scope="session")
def images(qemu: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Case name -> image path (built with qemu-img, or written byte by byte)."""
    return build_all(tmp_path_factory.mktemp("validate-images"))
