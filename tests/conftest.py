"""Makes ``tests/helpers.py`` importable from every test module; caches go to a temporary folder."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True, scope="session")
def _abkd_cache_dir(tmp_path_factory):
    """``ABKD_CACHE_DIR`` (the image-check cache) in a session temporary folder, not the real home."""
    previous = os.environ.get("ABKD_CACHE_DIR")
    os.environ["ABKD_CACHE_DIR"] = str(tmp_path_factory.mktemp("abkd-cache"))
    yield
    if previous is None:
        os.environ.pop("ABKD_CACHE_DIR", None)
    else:
        os.environ["ABKD_CACHE_DIR"] = previous
