"""Tagger.load(precision=...) and --precision on `fastner tag`, `evaluate`, `export` and serve's
config: the int8 encoder (fastner.nn.quantize) end to end; bf16 until its kernels land."""
import importlib.util
import json

import pytest
import torch

import fastner
from fastner.cli import main
from fastner.nn.quantize import Int8GRU, Int8LSTM, Int8RNN

pytestmark = pytest.mark.usefixtures("one_thread")

SENTENCES = [["Omar", "Haddad", "of", "Kestrel", "Pharma", "said", "so", "."],
             ["Shares", "jumped", "in", "Frankfurt", "on", "Tuesday", "."], ["Hi"]]
HAS_BF16 = importlib.util.find_spec("fastner.nn.rnn_bf16") is not None


def test_load_int8_quantizes_the_encoder_only(demo_tagger_dir):
    fp32 = fastner.Tagger.load(str(demo_tagger_dir))
    int8 = fastner.Tagger.load(str(demo_tagger_dir), precision="int8")
    assert isinstance(int8.model.encoder, (Int8LSTM, Int8GRU, Int8RNN))
    assert not isinstance(fp32.model.encoder, (Int8LSTM, Int8GRU, Int8RNN))
    assert int8.model.state_dict().keys() == fp32.model.state_dict().keys()
    # Same tags on (nearly) every token: 7-bit activations move the emissions by ~1%.
    got, want = int8.tag(SENTENCES), fp32.tag(SENTENCES)
    tokens = sum(len(s) for s in SENTENCES)
    same = sum(a == b for g, w in zip(got, want) for a, b in zip(g, w))
    assert same >= tokens - 1, (got, want)
    entities = int8.predict("Omar Haddad said so.")["entities"]
    assert isinstance(entities, list)


def test_load_precision_errors(demo_tagger_dir):
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, int8"):
        fastner.Tagger.load(str(demo_tagger_dir), precision="int4")
    if not HAS_BF16:
        with pytest.raises(NotImplementedError, match="rnn_bf16"):
            fastner.Tagger.load(str(demo_tagger_dir), precision="bf16")


def test_cli_precision(demo_tagger_dir, tmp_path, capsys):
    conll = tmp_path / "gold.conll"
    conll.write_text("Omar B-PER\nHaddad I-PER\nsaid O\n\nFrankfurt B-LOC\n.\tO\n".replace("\t", " "))
    assert main(["evaluate", str(demo_tagger_dir), str(conll), "--precision", "int8"]) == 0
    assert "FB1" in capsys.readouterr().out
    out = tmp_path / "exported"
    assert main(["export", str(demo_tagger_dir), str(out), "--precision", "int8"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert "rnn_layer_int8_forward" in meta["fastner_ops"]
    from fastner.export import load

    exported = load(str(out))
    int8 = fastner.Tagger.load(str(demo_tagger_dir), precision="int8")
    assert exported.tag(SENTENCES) == int8.tag(SENTENCES)
    if not HAS_BF16:
        assert main(["evaluate", str(demo_tagger_dir), str(conll), "--precision", "bf16"]) == 2
        assert "--precision bf16" in capsys.readouterr().err
        # serve refuses it before binding anything (or for want of uvicorn: exit 2 either way)
        assert main(["serve", str(demo_tagger_dir), "--precision", "bf16", "--port", "0"]) == 2
        err = capsys.readouterr().err
        assert "--precision bf16" in err or "uvicorn" in err, err
    with pytest.raises(SystemExit) as exit_info:
        main(["tag", str(demo_tagger_dir), "--precision", "int4"])
    assert exit_info.value.code == 2


def test_serve_config_precisions():
    from fastner.serve.config import PRECISIONS, ServeConfig

    assert {"float32", "int8", "bf16"} <= set(PRECISIONS)
    assert ServeConfig(precision="int8").precision == "int8"
    with pytest.raises(ValueError, match="precision"):
        ServeConfig(precision="int4")
