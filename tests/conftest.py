import os
import pathlib

import pytest
import torch

from tests.testing import torch_threads

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
def one_thread():
    # Tiny models: thread wake-ups cost more than they save, and badly so on a shared machine.
    with torch_threads(1):
        yield


@pytest.fixture(params=("persistent", "stepwise"))
def rnn_cuda_path(request, monkeypatch):
    """Each CUDA RNN path in turn (persistent and step-wise kernels), forced through
    FASTNER_RNN_CUDA_PATH: the CUDA suite and its CPU emulation run every case on both."""
    monkeypatch.setenv("FASTNER_RNN_CUDA_PATH", request.param)
    return request.param


@pytest.fixture
def conll_dir():
    path = SHARED_DATA / "conll2003"
    if not (path / "eng.train").exists():
        pytest.skip(f"CoNLL-2003 data not found at {path}")
    return path


@pytest.fixture(scope="session")
def demo_tagger_dir(tmp_path_factory):
    """A small CRF tagger trained on the generated demo corpus (BIOES), shared by the tests of
    raw-text tagging; its held-out F1 is not the point, its having weights and vocabularies is."""
    from fastner.demo import generate_corpus
    from fastner.train import TrainConfig, train

    out = tmp_path_factory.mktemp("demo-tagger")
    train_data, held_out = generate_corpus(150, 15, seed=5)
    config = TrainConfig(epochs=3, batch_size=8, seed=3, optimizer="adam", lr=0.03, word_dim=8,
                         model={"hidden": 8, "char_filters": 6, "char_dim": 6})
    with torch_threads(1):
        train(train_data, held_out, str(out), config, log=lambda _: None)
    return out


@pytest.fixture(scope="module")
def tagger(tmp_path_factory):
    """The serve tests' tiny tagger (tests/serve_testing.py trains it once a session), loaded
    once per module; a module that wants another tagger under this name defines its own."""
    import fastner
    from tests.serve_testing import tiny_model_dir

    return fastner.Tagger.load(tiny_model_dir(tmp_path_factory), device="cpu")
