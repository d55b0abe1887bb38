"""Open vocabulary and honest evaluation: vocabularies from the training data alone, every word
with a pretrained vector keeps it (frozen table), and dev/test files change nothing a model learns."""
import io
import os

import numpy as np
import pytest
import torch

from fastner.data.conll import Sentence
from fastner.data.vocab import Vocab, word_lookup
from fastner.demo import generate_corpus
from fastner.embeddings import WordIndex, word_rows
from fastner.tagger import PRETRAINED_INDEX_FILE, PRETRAINED_VECTORS_FILE, Tagger, TaggerLoadError
from fastner.train import TrainConfig, build_vocabularies, train

DIM = 8


# tiny models: see conftest.one_thread
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus():
    train_data, held_out = generate_corpus(40, 30, seed=5)
    return train_data, held_out[:15], held_out[15:]


@pytest.fixture(scope="module")
def vectors_file(corpus, tmp_path_factory):
    """Lowercased vectors (like GloVe) for every word of every split, plus one no split has."""
    train_data, dev_a, dev_b = corpus
    words = sorted({t.lower() for part in corpus for s in part for t in s.tokens} | {"zanzibar"})
    generator = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("vectors") / "vectors.txt"
    with open(path, "w", encoding="utf-8") as handle:
        for word in words:
            handle.write(word + " " + " ".join(f"{v:.4f}" for v in generator.uniform(-1, 1, DIM)) + "\n")
    return str(path)


def config(vectors_file, **overrides):
    options = dict(epochs=2, batch_size=8, seed=3, optimizer="sgd", lr=0.05, embeddings=vectors_file,
                   patience=100, model={"hidden": 8, "char_filters": 6, "char_dim": 6})
    options.update(overrides)
    return TrainConfig(**options)


def quiet(_text):
    pass


def test_dev_and_test_files_change_no_parameter(corpus, vectors_file, tmp_path):
    """Two runs that differ only in their dev and test files end with the same vocabularies,
    config and weights (the last epoch's, in the checkpoint: the saved best may come from
    another epoch, chosen by dev F1, which is what dev data is for)."""
    train_data, dev_a, dev_b = corpus
    assert {t for s in dev_b for t in s.tokens} - {t for s in train_data for t in s.tokens}  # new words
    train(train_data, dev_a, str(tmp_path / "a"), config(vectors_file), log=quiet)
    changed = [Sentence(s.tokens[::-1] + ["Zanzibar"], s.tags[::-1] + ["O"]) for s in dev_b]
    train(train_data, changed, str(tmp_path / "b"), config(vectors_file), test_data=dev_a, log=quiet)
    for name in ("vocab.json", "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert [r["loss_per_token"] for r in a["history"]] == [r["loss_per_token"] for r in b["history"]]
    assert (tmp_path / "a" / PRETRAINED_VECTORS_FILE).read_bytes() == (tmp_path / "b" / PRETRAINED_VECTORS_FILE).read_bytes()


def test_vocabularies_come_from_the_training_data_alone(corpus):
    train_data, dev_a, _ = corpus
    words, chars, tags = build_vocabularies(train_data, "BIOES", False)
    assert set(words.itos) - set(words.specials) == {t for s in train_data for t in s.tokens}
    assert set(chars.itos) - set(chars.specials) == {c for s in train_data for t in s.tokens for c in t}
    assert tags.itos[0] == "O" and "S-PER" in tags.itos


def test_word_lookup_order():
    words = Vocab(["Paris", "london", "0000"])
    pretrained = {"berlin": 0, "Oslo": 1, "oslo": 2, "paris": 3}
    lookup = word_lookup(words, pretrained)
    n = len(words)
    assert lookup("Paris") == words["Paris"]  # fine-tuned row wins over the pretrained one
    assert lookup("London") == words["london"]  # then the fine-tuned lowercase form
    assert lookup("Oslo") == n + 1  # then the pretrained exact form
    assert lookup("BERLIN") == n + 0  # then the pretrained lowercase form
    assert lookup("Zanzibar") == words.unk_id
    assert word_lookup(words)("Oslo") == words.unk_id  # no table: closed vocabulary
    assert word_lookup(words, pretrained, digits_to_zero=True)("1996") == words["0000"]
    assert word_lookup(words, pretrained)("1996") == words.unk_id


@pytest.fixture(scope="module")
def trained(corpus, vectors_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("model")
    train_data, dev_a, _ = corpus
    train(train_data, dev_a, str(out), config(vectors_file), log=quiet)
    return str(out)


def test_words_outside_training_keep_their_pretrained_vector(trained, corpus):
    tagger = Tagger.load(trained, device="cpu")
    model = tagger.model
    assert model.pretrained.dtype == torch.float16 and not model.pretrained.requires_grad
    assert "pretrained" not in model.state_dict()
    assert all(p is not model.pretrained for p in model.parameters())
    vectors = np.load(os.path.join(trained, PRETRAINED_VECTORS_FILE))
    words = tagger.pretrained_words
    assert words == sorted(words) and "zanzibar" in words  # the vectors file's words, in its order
    lookup = word_lookup(tagger.words, tagger.pretrained_index)
    ids = torch.tensor([[lookup("Zanzibar"), lookup(tagger.words.itos[5]), lookup("qqqq-not-a-word")]])
    assert ids[0, 0] == len(tagger.words) + words.index("zanzibar")
    with torch.no_grad():
        embedded = model.embed_words(ids)[0]  # [3, DIM]
    assert torch.equal(embedded[0], torch.from_numpy(vectors[words.index("zanzibar")]).float())
    assert torch.equal(embedded[1], model.word_embedding.weight[5])
    assert torch.equal(embedded[2], model.word_embedding.weight[tagger.words.unk_id])


def test_frozen_table_gets_no_gradient_and_saved_model_predicts_alike(trained, corpus):
    from fastner.data.batching import encode_sentences, make_batch

    tagger = Tagger.load(trained, device="cpu")
    _, dev_a, dev_b = corpus
    sentences = [s.tokens + ["Zanzibar"] for s in dev_b]
    encoded = encode_sentences([Sentence(t) for t in sentences], tagger.words, tagger.chars,
                               pretrained=tagger.pretrained_index)
    assert any(i >= len(tagger.words) for e in encoded for i in e.words)
    model = tagger.model.train()
    batch = make_batch(encoded, list(range(4)), tagger.words.pad_id, tagger.chars.pad_id)
    batch.tags = torch.zeros_like(batch.words)
    model.loss(batch).backward()
    assert model.pretrained.grad is None
    model.eval()
    again = Tagger.load(trained, device="cpu")
    assert tagger.tag(sentences) == again.tag(sentences)


def test_load_refuses_a_missing_or_bad_pretrained_table(trained, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(trained, broken)
    os.remove(broken / PRETRAINED_VECTORS_FILE)
    with pytest.raises(TaggerLoadError, match=PRETRAINED_VECTORS_FILE):
        Tagger.load(str(broken))
    np.save(broken / PRETRAINED_VECTORS_FILE, np.zeros((3, DIM), dtype=np.float16))
    with pytest.raises(TaggerLoadError, match="differs from what manifest.json records"):
        Tagger.load(str(broken))
    os.remove(broken / "manifest.json")  # a directory without a manifest is read as it is: the checks below
    with pytest.raises(TaggerLoadError, match="expected float16"):
        Tagger.load(str(broken))
    # an object array needs pickle to load: refused, never unpickled
    np.save(broken / PRETRAINED_VECTORS_FILE, np.array([object()] * 3, dtype=object), allow_pickle=True)
    with pytest.raises(TaggerLoadError, match="Python objects"):
        Tagger.load(str(broken))
    damaged = np.load(os.path.join(trained, PRETRAINED_VECTORS_FILE))
    damaged[1, 2] = np.nan  # loaded, and tagged every sentence with that row's word as garbage
    np.save(broken / PRETRAINED_VECTORS_FILE, damaged)
    with pytest.raises(TaggerLoadError, match=f"{PRETRAINED_VECTORS_FILE} holds nan or inf values"):
        Tagger.load(str(broken))
    (broken / PRETRAINED_VECTORS_FILE).write_bytes(b"")  # numpy raises EOFError for an empty file
    with pytest.raises(TaggerLoadError, match=f"{PRETRAINED_VECTORS_FILE}: cannot read the pretrained table"):
        Tagger.load(str(broken))
    shutil.copy(os.path.join(trained, PRETRAINED_VECTORS_FILE), broken / PRETRAINED_VECTORS_FILE)
    (broken / PRETRAINED_INDEX_FILE).write_bytes(WordIndex.build(["a", "b"]).to_bytes())
    with pytest.raises(TaggerLoadError, match=f"{PRETRAINED_INDEX_FILE} must hold .* words, one per pretrained row, got 2"):
        Tagger.load(str(broken))
    os.remove(broken / PRETRAINED_INDEX_FILE)
    with pytest.raises(TaggerLoadError, match=f"{PRETRAINED_INDEX_FILE} is missing"):
        Tagger.load(str(broken))


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_the_table_check_finds_exactly_what_isfinite_finds(tmp_path, dtype):
    """The nan/inf check runs on the raw bits of each block as the file is hashed (np.isfinite
    over the mapped table cost ~35 ms of a 0.3 s load): it must flag exactly the tables
    np.isfinite flags, wherever the value lies (first, last, across a block boundary)."""
    from fastner.storage import open_file_set, write_file_set
    from fastner.tagger import _TableScan

    rng = np.random.default_rng(0)
    bits = np.uint16 if dtype == np.float16 else np.uint32
    rows = (1 << 20) // (np.dtype(dtype).itemsize * DIM) + 3  # more than one 1 MiB block
    cases = [np.zeros((rows, DIM), dtype)]
    for special in (np.nan, np.inf, -np.inf, np.finfo(dtype).max, np.finfo(dtype).tiny, -0.0):
        for index in (0, rows * DIM - 1, (1 << 20) // np.dtype(dtype).itemsize - 60, 12345):
            table = np.zeros((rows, DIM), dtype)
            table.flat[index] = special
            cases.append(table)
    cases += [rng.integers(0, np.iinfo(bits).max, (rows, DIM), dtype=bits, endpoint=True).view(dtype)
              for _ in range(4)]  # random bit patterns: nan payloads, subnormals, both signs
    cases += [np.asfortranarray(cases[2]), cases[2].astype(np.dtype(dtype).newbyteorder(">"))]
    for n, table in enumerate(cases):
        buffer = io.BytesIO()
        np.save(buffer, table)
        write_file_set(str(tmp_path), {PRETRAINED_VECTORS_FILE: buffer.getvalue()})
        scan = _TableScan()
        with open_file_set(str(tmp_path), [PRETRAINED_VECTORS_FILE], scan={PRETRAINED_VECTORS_FILE: scan}):
            pass
        assert scan.header[:3] == (table.shape, table.flags.f_contiguous and not table.flags.c_contiguous, table.dtype)
        assert scan.nonfinite == (not np.isfinite(table).all()), f"case {n}"


# ---- the pretrained words' index (pretrained_words.bin) ---------------------------------------

ODD_WORDS = ["the", "", "The", "the", "naïve", "日本", "a b", "x\ny", "\ud800", "\x00", "the", "ß", "é" * 70]


def test_word_index_finds_what_the_dict_finds():
    """Every word at its first row (a repeated word too), the empty word, any str (a lone
    surrogate, NUL, newline) and nothing else; the same after a save, as the word list."""
    rng = np.random.default_rng(0)
    many = [f"w{i}" for i in rng.integers(0, 5000, 3000)]  # repeats and a crowded table
    for words in ([], ["solo"], ODD_WORDS, many + ODD_WORDS):
        built = WordIndex.build(words)
        for index in (built, WordIndex.from_bytes(built.to_bytes())):
            expected = word_rows(words)
            assert len(index) == len(words) and index.words() == words
            assert all(index.get(word) == row for word, row in expected.items())
            for missing in ("THE", "w", "w5000", "the ", "\ud801", "é" * 69):
                assert missing not in index and index.get(missing, -7) == -7
        assert built.to_bytes() == WordIndex.build(list(words)).to_bytes()  # one layout per list


def index_parts(words):
    """(header, offsets, slots, blob) of the saved index of `words`, to damage one of them."""
    data = WordIndex.build(words).to_bytes()
    head = len(WordIndex.MAGIC) + 32
    n, blob_size, mask, size = np.frombuffer(data, "<i8", 4, len(WordIndex.MAGIC))
    offsets = np.frombuffer(data, "<i8", n + 1, head).copy()
    slots = np.frombuffer(data, "<i4", size, head + 8 * (n + 1)).copy()
    return np.array([n, blob_size, mask, size], "<i8"), offsets, slots, data[len(data) - blob_size:]


def joined(header, offsets, slots, blob):
    return WordIndex.MAGIC + header.tobytes() + offsets.tobytes() + slots.tobytes() + blob


def damaged_indexes():
    header, offsets, slots, blob = index_parts(["naïve", "a", "b"])
    good = joined(header, offsets, slots, blob)
    yield good[:-1], "its header says"
    yield good + b"x", "its header says"
    yield b"[\"a\"]", "FNWORDS1"
    yield header.tobytes(), "FNWORDS1"
    yield joined(header * [1, 1, 2 ** 40, 1], offsets, slots, blob), "inconsistent"
    yield joined(header * [1, 1, 1, 2 ** 40], offsets, slots, blob), "inconsistent"
    yield joined(header * [-1, 1, 1, 1], offsets, slots, blob), "inconsistent"
    yield joined(header, offsets[[0, 2, 1, 3]], slots, blob), "not increasing"
    yield joined(header, offsets + 1, slots, blob), "not increasing"
    split = offsets.copy()
    split[1] = 3  # inside the two bytes of 'ï'
    yield joined(header, split, slots, blob), "not UTF-8"
    yield joined(header, offsets, slots, b"\xff" + blob[1:]), "not UTF-8"
    used = np.flatnonzero(slots >= 0)
    twice, lost, too_big, too_small, no_end = (slots.copy() for _ in range(5))
    twice[used[0]] = slots[used[1]]
    lost[used[0]] = -1
    too_big[used[0]] = 3
    too_small[used[0]] = -2
    no_end[used[-1]], no_end[-1] = -1, slots[used[-1]]  # a search could run past the table
    for table in (twice, lost, too_big, too_small):
        yield joined(header, offsets, table, blob), "does not hold each word once"
    yield joined(header, offsets, no_end, blob), "does not end with an empty slot"


@pytest.mark.parametrize("data, reason", list(damaged_indexes()))
def test_a_damaged_word_index_is_refused_saying_why(data, reason):
    """A damaged index never loads into lookups that fail, loop or mislead: each refusal says why."""
    with pytest.raises(ValueError, match=reason):
        WordIndex.from_bytes(data)
