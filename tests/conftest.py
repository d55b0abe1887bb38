import os
import pathlib

import pytest
import torch

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seeded():
    # Shapes and values are drawn fresh per test, but reproducibly: a failure names its seed.
    torch.manual_seed(int(os.environ.get("FASTNER_TEST_SEED", "0")))
    yield


@pytest.fixture
def one_thread():
    # Tiny models: thread wake-ups cost more than they save, and badly so on a shared machine.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def conll_dir():
    path = SHARED_DATA / "conll2003"
    if not (path / "eng.train").exists():
        pytest.skip(f"CoNLL-2003 data not found at {path}")
    return path
