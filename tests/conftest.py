import os
import pathlib

import pytest
import torch

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
# Set to a site-packages directory to run the suite against the fastner installed there (a
# wheel, .ci/gpu_wheel.sh) rather than a source tree: the run stops at once if it imports any other.
INSTALLED_ENV = "FASTNER_TEST_INSTALLED_IN"


def pytest_configure(config):
    site = os.environ.get(INSTALLED_ENV)
    if site:
        import fastner

        imported = pathlib.Path(fastner.__file__).resolve()
        if not imported.is_relative_to(pathlib.Path(site).resolve()):
            raise pytest.UsageError(f"{INSTALLED_ENV}={site}, but the tests imported fastner from {imported}")


@pytest.fixture(autouse=True)
def _seeded():
    # Shapes and values are drawn fresh per test, but reproducibly: a failure names its seed.
    torch.manual_seed(int(os.environ.get("FASTNER_TEST_SEED", "0")))
    yield


@pytest.fixture
def conll_dir():
    path = SHARED_DATA / "conll2003"
    if not (path / "eng.train").exists():
        pytest.skip(f"CoNLL-2003 data not found at {path}")
    return path
