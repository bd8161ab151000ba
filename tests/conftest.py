"""Makes ``tests/helpers.py`` importable from every test module; caches go to a temporary folder."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# Under pytest-xdist (make test runs one worker per core) each worker and the processes it starts take their
# share of the cores: OpenMP threads that outnumber the cores spin against each other and run several times slower.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    import torch

    torch.set_num_threads(_threads)


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
