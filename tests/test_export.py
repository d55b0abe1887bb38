"""torch.compile and torch.export of the tagger; `fastner export` and fastner.export.load.

One export serves most tests (a module fixture): exporting costs seconds on a small machine.
Where the compiled extension serves the recurrent layer and the CRF, the exported graph must call
them as torch.ops.fastner.* nodes with a dynamic sequence length; on the reference path the graph
is plain aten with a fixed length (see fastner/export.py).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from fastner import _extension, cli, export
from fastner.demo import generate_corpus
from fastner.tagger import Tagger

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LENGTH = 12


# tiny models: see conftest.one_thread
pytestmark = pytest.mark.usefixtures("one_thread")


def _served(op):
    return _extension.has_kernel(op, "cpu") and not _extension.forced_reference()


def tiny_tagger(encoder="lstm", head="crf", layers=1, seed=0):
    from fastner.models.tagger import ModelConfig, SequenceTagger
    from fastner.train import build_vocabularies

    train_data, _ = generate_corpus(30, 1, seed=4)
    words, chars, tags = build_vocabularies(train_data, "BIOES", False)
    torch.manual_seed(seed)
    # a frozen pretrained table for words outside the training data ("Zyxw" by its lowercase form)
    pretrained_words = ["zyxw", "unseen", "tokens"]
    config = ModelConfig(num_words=len(words), num_chars=len(chars), tags=list(tags.itos), word_dim=8, char_dim=6,
                         char_filters=6, hidden=6, layers=layers, encoder=encoder, head=head, dropout=0.0,
                         pretrained_rows=len(pretrained_words))
    model = SequenceTagger(config, pretrained=torch.randn(len(pretrained_words), 8).mul(3).half())
    with torch.no_grad():  # an untrained CRF's transitions are near 0: make the paths matter
        for param in model.parameters():
            param.mul_(3.0)
    return Tagger(model, words, chars, tags, "IOB2", False, "cpu", pretrained_words)


def sentences(count=9, seed=1):
    _, held_out = generate_corpus(1, count, seed=seed)
    out = [s.tokens[:MAX_LENGTH] for s in held_out]
    out[0] = ["Zyxw", "unseen", "tokens", "2024"]  # unknown words and chars
    out[1] = ["one"]
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(tagger, export directory) via the CLI: `fastner export DIR OUT`."""
    tagger = tiny_tagger()
    base = tmp_path_factory.mktemp("export")
    tagger.save(str(base / "tagger"))
    assert cli.main(["export", str(base / "tagger"), str(base / "out"), "--max-length", str(MAX_LENGTH)]) == 0
    return tagger, base / "out"


@pytest.fixture(scope="module")
def runtime(exported):
    return export.load(str(exported[1]))


def assert_same_predictions(expected, got):
    assert [p["tags"] for p in got] == [p["tags"] for p in expected]
    assert [[(s["start"], s["end"], s["type"]) for s in p["spans"]] for p in got] == \
        [[(s["start"], s["end"], s["type"]) for s in p["spans"]] for p in expected]
    confidence = lambda ps: torch.tensor([s["confidence"] for p in ps for s in p["spans"]])  # noqa: E731
    torch.testing.assert_close(confidence(got), confidence(expected), rtol=0, atol=1e-5)  # spans round to 6 digits


# ---- export ----------------------------------------------------------------------------------

def test_round_trip_tags_like_the_tagger_without_model_or_training_code(exported):
    tagger, out = exported
    assert sorted(os.listdir(out)) == sorted([export.MANIFEST_FILE, export.META_FILE, export.PROGRAM_FILE,
                                              export.PRETRAINED_INDEX_FILE])
    batch = sentences()
    # a fresh process: only the runtime is imported; batches of 4 of varied lengths
    script = (
        "import json, sys\n"
        "import fastner.export\n"
        f"tagger = fastner.export.load({str(out)!r})\n"
        f"print(json.dumps(tagger.predict({batch!r}, batch_size=4)))\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(('fastner.train', 'fastner.models', 'fastner.tagger')))\n"
        "print(json.dumps(loaded))\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    predictions, loaded = [json.loads(line) for line in result.stdout.strip().splitlines()[-2:]]
    assert loaded == [], f"the runtime imported {loaded}"
    assert_same_predictions(tagger.predict(batch), predictions)


def test_dynamic_batch_and_sequence_length(exported, runtime):
    tagger, out = exported
    batch = sentences(12, seed=3)
    expected = tagger.predict(batch)
    for batch_size in (1, 5, 64):  # batch sizes 1, 5 and 2 (the rest), 12 at once
        assert_same_predictions(expected, runtime.predict(batch, batch_size=batch_size))
    assert runtime.tag(batch[:3]) == tagger.tag(batch[:3])
    meta = json.loads((out / export.META_FILE).read_text())
    if meta["fixed_length"] is None:  # dynamic time: lengths other than the example's run as they are
        module = runtime.program.module()
        for B, T in ((1, 1), (3, 37)):
            words = torch.ones(B, T, dtype=torch.long)
            tags, log_z, emissions = module(words, torch.ones(B, T, 4, dtype=torch.long), torch.full((B,), T))
            assert tags.shape == (B, T) and log_z.shape == (B,) and emissions.shape[:2] == (B, T)
    else:
        assert meta["fixed_length"] == MAX_LENGTH
        with pytest.raises(ValueError, match=f"at most {MAX_LENGTH}"):
            runtime.predict([["w"] * (MAX_LENGTH + 1)])


def test_fused_ops_appear_in_the_graph_where_the_extension_serves_them(exported, runtime):
    _, out = exported
    ops = set(export.fastner_ops(runtime.program))
    meta = json.loads((out / export.META_FILE).read_text())
    assert sorted(ops) == meta["fastner_ops"]
    for op in ("rnn_layer_forward", "crf_viterbi", "crf_forward"):
        assert (op in ops) == _served(op), (op, sorted(ops))
    # the char CNN through its table (an inference graph; the tiny alphabet is under the bound)
    assert ("char_embed_conv_max" in ops) == _served("char_embed_conv_max"), sorted(ops)
    assert "char_conv_max" not in ops
    dynamic_time = _served("rnn_layer_forward") and _served("crf_viterbi") and _served("crf_forward")
    assert (meta["fixed_length"] is None) == dynamic_time
    if not ops:
        targets = {str(n.target) for n in runtime.program.graph.nodes if n.op == "call_function"}
        assert not any(t.startswith("fastner.") for t in targets)


@pytest.mark.parametrize("encoder,head", [("gru", "softmax"), ("rnn", "crf")])
def test_other_encoders_and_heads_export(encoder, head):
    tagger = tiny_tagger(encoder, head, layers=2, seed=1)
    program, fixed_length = export.export_program(tagger.model, max_length=8)
    graph = export.InferenceGraph(tagger.model).eval()
    runtime = export.ExportedTagger(program, {
        "fixed_length": fixed_length, "digits_to_zero": False, "output_scheme": "IOB2",
        "words": tagger.words.to_json(), "chars": tagger.chars.to_json(), "tags": tagger.tags.to_json(),
        "pretrained_words": tagger.pretrained_words,
        "transition_scores": [export._json_floats(t) for t in tagger.model.transition_scores()]})
    batch = [s[:8] for s in sentences(5, seed=7)]
    assert_same_predictions(tagger.predict(batch), runtime.predict(batch, batch_size=2))
    assert graph.fused == export.fused_paths("cpu")


def test_exported_program_is_the_models_infer(exported, runtime):
    # one inference path: the program computes exactly SequenceTagger.infer
    tagger, _ = exported
    from fastner.data.batching import encode_sentences, make_batch
    from fastner.data.conll import Sentence

    batch = [s for s in sentences(6, seed=2)]
    encoded = encode_sentences([Sentence(s) for s in batch], tagger.words, tagger.chars)
    made = make_batch(encoded, list(range(len(batch))), tagger.words.pad_id, tagger.chars.pad_id)
    words, chars = made.words, made.chars
    if runtime.fixed_length is not None:
        pad = runtime.fixed_length - words.shape[1]
        words = torch.nn.functional.pad(words, (0, pad), value=tagger.words.pad_id)
        chars = torch.nn.functional.pad(chars, (0, 0, 0, pad), value=tagger.chars.pad_id)
    with torch.no_grad():
        want = tagger.model.infer(words, chars, made.lengths)
        got = runtime.module(words, chars, made.lengths)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    torch.testing.assert_close(got[2], want[2])


def test_raw_documents_through_the_runtime(exported, runtime):
    tagger, _ = exported
    document = "Shares of Kestrel Pharma rose 4.2% in Oslo on Monday. Omar Haddad said so."
    expected, got = tagger.predict(document, nbest=2), runtime.predict(document, nbest=2)
    assert [s["tags"] for s in got["sentences"]] == [s["tags"] for s in expected["sentences"]]
    assert [(e["start"], e["end"], e["label"]) for e in got["entities"]] == \
        [(e["start"], e["end"], e["label"]) for e in expected["entities"]]
    for a, b in zip(got["entities"], expected["entities"]):
        assert a["score"] == pytest.approx(b["score"], abs=1e-5)
    assert [len(s["nbest"]) for s in got["sentences"]] == [len(s["nbest"]) for s in expected["sentences"]]


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="program.pt2"):
        export.load(str(tmp_path))
    (tmp_path / export.PROGRAM_FILE).write_bytes(b"")
    (tmp_path / export.META_FILE).write_text(json.dumps({"format": 99}))
    with pytest.raises(ValueError, match="format 99"):
        export.load(str(tmp_path))


@pytest.mark.parametrize("field, value, expected", [
    ("transition_scores", [[1.0]], "'transition_scores' must be .transitions"),  # loaded; wrong span scores
    ("tags", {"specials": [], "itos": ["O"]}, "'transition_scores' must be .transitions \\[1, 1\\]"),
    ("words", {"specials": [], "itos": [1, 2]}, "the vocabularies are missing or invalid .*'itos' must be a list of strings"),
    ("fixed_length", "12", "'fixed_length' must be null or an integer >= 2, got '12'"),
    ("digits_to_zero", "false", "'digits_to_zero' must be true or false"),  # read as true
    ("output_scheme", None, "'output_scheme' must be a tag scheme, got nothing"),
    ("pretrained_words", ["zyxw"], "'pretrained_words' must be absent in format 3 .the words are in "
                                   "export-pretrained-words.bin."),
    ("device", "bogus", "'device' must be a torch device"),
    ("precision", "fp16", "'precision' must be one of fp32, bf16, int8, got 'fp16'"),
])
def test_load_refuses_an_export_json_that_does_not_fit(exported, tmp_path, field, value, expected):
    """Each was a KeyError/TypeError/RuntimeError when tagging, or tags and scores read silently
    through the wrong table; export.json is checked as it is loaded, naming the field."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(exported[1], out)
    os.remove(out / export.MANIFEST_FILE)  # read as it is, as a directory copied without it would be
    meta = json.loads((out / export.META_FILE).read_text())
    if value is None:
        del meta[field]
    else:
        meta[field] = value
    (out / export.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=f"export.json: {expected}"):
        export.load(str(out))


def test_export_cli_errors(tmp_path, capsys):
    assert cli.main(["export", str(tmp_path / "missing"), str(tmp_path / "out")]) == cli.EXIT_USAGE
    assert "fastner: error:" in capsys.readouterr().err


def test_predict_rejects_bytes(runtime):
    with pytest.raises(TypeError, match="decode bytes"):
        runtime.predict(b"a sentence")


@pytest.mark.parametrize("bad, expected", [
    ("Apple hired Tim Cook .", "tag raw text with predict"),  # was tagged one character per sentence
    (["Apple hired Tim Cook ."], "item 0: a document"),
    ([["Apple", 3]], "item 0: token 1 is int, expected str"),  # was AttributeError: 'int' ... 'lower'
    ([None], "item 0: expected a document"),  # was TypeError: 'NoneType' object is not iterable
    (None, "got NoneType"),
])
def test_tag_rejects_what_is_not_token_lists(exported, runtime, bad, expected):
    for tagger in (exported[0], runtime):  # the Tagger and its exported runtime: one check
        with pytest.raises(TypeError, match=expected):
            tagger.tag(bad)
    assert runtime.tag([]) == [] and runtime.tag([[]]) == [[]]
    assert runtime.tag((t for t in [("Tim", "Cook")])) == exported[0].tag([["Tim", "Cook"]])


def test_runtime_keeps_within_the_programs_shape_bounds(exported, runtime):
    # it was: AssertionError "Guard failed: words.size()[0] <= 4096" for batch_size > 4096, and
    # "Guard failed: words.size()[1] <= 100000" for a longer sentence
    tagger, _ = exported
    many = [["one"], ["Zyxw", "unseen"]] * (export.MAX_BATCH // 2 + 1)
    assert runtime.tag(many, batch_size=export.MAX_BATCH + 2) == tagger.tag(many, batch_size=export.MAX_BATCH + 2)
    with pytest.raises(ValueError, match=r"sentence 1 has 100001 tokens; this export takes at most"):
        runtime.tag([["one"], ["one"] * (export.MAX_TIME + 1)])


# ---- torch.compile ---------------------------------------------------------------------------

def test_tagger_runs_under_torch_compile_and_matches_eager():
    from fastner.data.batching import encode_sentences, make_batch
    from fastner.data.conll import Sentence
    from fastner.data.schemes import convert_tags

    tagger = tiny_tagger()
    model = tagger.model
    train_data, _ = generate_corpus(6, 1, seed=9)
    data = [Sentence(s.tokens, convert_tags(s.tags, "BIOES")) for s in train_data]
    batch = make_batch(encode_sentences(data, tagger.words, tagger.chars, tagger.tags), list(range(6)),
                       tagger.words.pad_id, tagger.chars.pad_id)
    torch._dynamo.reset()
    # aot_eager: dynamo + AOT autograd through every op (fake kernels included), without the
    # C++ compile time of inductor
    model.train()
    loss_fn = torch.compile(model.loss, backend="aot_eager")
    compiled_loss = loss_fn(batch)
    # graphs were compiled (with breaks: the char CNN's boolean-mask scatter, and on the
    # reference path the recurrent layer and the CRF's input checks, run eagerly between them)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    compiled_grads = torch.autograd.grad(compiled_loss, list(model.parameters()))
    eager_loss = model.loss(batch)
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
    torch.testing.assert_close(compiled_loss, eager_loss)
    for compiled, eager in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(compiled, eager)
    model.eval()
    graph = export.InferenceGraph(model).eval()
    compiled_graph = torch.compile(graph, backend="aot_eager")
    with torch.no_grad():
        got = compiled_graph(batch.words, batch.chars, batch.lengths)
        want = graph(batch.words, batch.chars, batch.lengths)
        tags, _ = model.predict(batch)
    assert torch.equal(got[0], want[0]) and torch.equal(want[0], tags)
    torch.testing.assert_close(got[1], want[1])


def test_a_column_major_pretrained_table_saves_exports_and_loads_without_torch_warnings(tmp_path, capfd):
    """It was: GloVe's table arrives column-major (np.asarray keeps its source's order), so the
    frozen table was, pretrained.npy was written so (fortran_order) and mapped back so, and
    torch.export.save found no tensor covering the table's storage: "No complete tensor found
    in the group! Returning the first one. This may cause issues when your weights are not on
    CPU." on stderr. The table is now saved row-major and exported as a row-major copy."""
    import warnings

    import numpy as np

    from fastner.tagger import PRETRAINED_VECTORS_FILE

    tagger = tiny_tagger()
    tagger.model.pretrained = tagger.model.pretrained.t().contiguous().t()  # same values, column-major
    assert not tagger.model.pretrained.is_contiguous()
    tagger.save(str(tmp_path / "tagger"))
    saved = np.load(tmp_path / "tagger" / PRETRAINED_VECTORS_FILE)
    assert saved.flags.c_contiguous and np.array_equal(saved, tagger.model.pretrained.numpy())
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export.export_tagger(tagger, str(tmp_path / "out"), max_length=12)
        assert not tagger.model.pretrained.is_contiguous()  # the tagger itself is left as it was
        runtime = export.load(str(tmp_path / "out"))
    assert not [str(w.message) for w in caught if "complete tensor" in str(w.message)]
    assert "complete tensor" not in capfd.readouterr().err
    assert runtime.tag(sentences()) == tagger.tag(sentences())


def test_export_json_records_the_precision_and_load_checks_it(exported, runtime, tmp_path):
    """It was: export.json did not say whether the program's encoder was fp32, bf16 or int8. Now
    it does (an int8 export: test_precision.py::test_cli_precision); a value that does not match
    the weights program.pt2 holds is refused (export.json and program.pt2 of two exports), and
    an export.json written before the field is read as what its program holds."""
    import shutil

    from fastner.nn.quantize import quantize
    from fastner.tagger import PRECISIONS

    assert set(export.PRECISION_WEIGHTS) == set(PRECISIONS)
    for precision in ("int8", "bf16"):
        tagger = tiny_tagger()
        quantize(tagger.model, PRECISIONS[precision])
        assert export.weights_precision([*tagger.model.parameters(), *tagger.model.buffers()]) == precision
    assert json.loads((exported[1] / export.META_FILE).read_text())["precision"] == "fp32"
    assert runtime.precision == "fp32"
    out = tmp_path / "out"
    shutil.copytree(exported[1], out)
    os.remove(out / export.MANIFEST_FILE)  # edited by hand below
    meta = json.loads((out / export.META_FILE).read_text())
    (out / export.META_FILE).write_text(json.dumps(dict(meta, precision="int8")))
    with pytest.raises(ValueError, match="export.json: 'precision' is 'int8', but program.pt2 holds fp32 weights"):
        export.load(str(out))
    del meta["precision"]  # as written before the field existed
    (out / export.META_FILE).write_text(json.dumps(meta))
    assert export.load(str(out)).precision == "fp32"


def test_export_refuses_nan_weights_and_keeps_the_previous_export(exported, tmp_path):
    # It was: the program was written with the nan weights (Tagger.save refuses them).
    import shutil

    out = tmp_path / "out"
    shutil.copytree(exported[1], out)
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    tagger = tiny_tagger()
    with torch.no_grad():
        next(tagger.model.parameters())[0].fill_(float("nan"))
    with pytest.raises(ValueError, match="nan or inf values .*not exported"):
        export.export_tagger(tagger, str(out), max_length=12)
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before


@pytest.mark.slow
def test_a_bf16_export_records_bf16(tmp_path):
    from fastner.nn.quantize import quantize

    tagger = tiny_tagger()
    quantize(tagger.model, torch.bfloat16)
    assert export.export_tagger(tagger, str(tmp_path), max_length=12)["precision"] == "bf16"
    runtime = export.load(str(tmp_path))
    assert runtime.precision == "bf16" and runtime.tag(sentences()) == tagger.tag(sentences())


def _cut_tags(meta):
    k = len(meta["tags"]["itos"]) - 2
    meta["tags"]["itos"] = meta["tags"]["itos"][:k]
    transitions, start, end = meta["transition_scores"]
    meta["transition_scores"] = [[row[:k] for row in transitions[:k]], start[:k], end[:k]]


@pytest.mark.parametrize("change, expected", [
    (_cut_tags, "'tags' lists 19 entries, but program.pt2 was exported with 21"),
    (lambda meta: meta["words"]["itos"].append("extra"), "'words' lists 215 entries, but program.pt2 was exported with 214"),
    (lambda meta: meta["chars"]["itos"].pop(), "'chars' lists 63 entries, but program.pt2 was exported with 64"),
    (lambda meta: meta["pretrained_words"].append("extra"), "'pretrained_words' lists 4 words, but program.pt2 holds 3"),
    (lambda meta: meta.update(pretrained_words=None), "'pretrained_words' lists 0 words, but program.pt2 holds 3"),
])
def test_load_refuses_an_export_json_of_another_program(exported, tmp_path, change, expected):
    """export.json and program.pt2 of two exports put together by hand (no manifest to tell):
    it was an IndexError (tags) or an index error deep in the graph (words) when tagging."""
    import shutil

    out = tmp_path / "out"
    if "pretrained_words" in expected:  # format 2's list in export.json
        format_2_export(exported, out)
    else:
        shutil.copytree(exported[1], out)
    os.remove(out / export.MANIFEST_FILE)
    meta = json.loads((out / export.META_FILE).read_text())
    change(meta)
    (out / export.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=f"export.json: {expected} .*the two files do not belong together"):
        export.load(str(out))


# ---- the pretrained words: export-pretrained-words.bin (format 3), export.json's list (format 2) --

def format_2_export(exported, out):
    """The export directory `fastner export` wrote before format 3, from `exported`'s program:
    the pretrained words listed in export.json."""
    from fastner.storage import json_bytes, write_file_set

    tagger, source = exported
    meta = json.loads((source / export.META_FILE).read_text())
    meta.update(format=2, pretrained_words=tagger.pretrained_words)
    write_file_set(str(out), {export.PROGRAM_FILE: (source / export.PROGRAM_FILE).read_bytes(),
                              export.META_FILE: json_bytes(meta)}, manifest=export.MANIFEST_FILE)
    return out


def test_the_pretrained_words_are_exported_as_their_word_index(exported, runtime):
    """It was: export.json listed every pretrained word (GloVe: 400k, 5.7 MB) and each load
    parsed them and built their dict (~0.2 s of a ~0.75 s load of the CoNLL GloVe export); now
    they are a WordIndex in the file set, read with no work per word."""
    from fastner.embeddings import WordIndex

    tagger, out = exported
    meta = json.loads((out / export.META_FILE).read_text())
    assert meta["format"] == export.INDEX_FORMAT and "pretrained_words" not in meta
    assert export.PRETRAINED_INDEX_FILE in json.loads((out / export.MANIFEST_FILE).read_text())["files"]
    index = WordIndex.from_bytes((out / export.PRETRAINED_INDEX_FILE).read_bytes())
    assert index.words() == tagger.pretrained_words
    assert isinstance(runtime.pretrained_index, WordIndex) and runtime.pretrained_index.words() == tagger.pretrained_words


def test_a_format_2_export_still_loads_and_tags_alike(exported, runtime, tmp_path):
    old = export.load(str(format_2_export(exported, tmp_path / "old")))
    assert old.pretrained_index == {"zyxw": 0, "unseen": 1, "tokens": 2}
    batch = sentences()  # "Zyxw unseen tokens": found through the pretrained words
    assert_same_predictions(runtime.predict(batch), old.predict(batch))
    assert old.tag(batch) == exported[0].tag(batch)
    meta = json.loads((tmp_path / "old" / export.META_FILE).read_text())
    (tmp_path / "old" / export.MANIFEST_FILE).unlink()  # edited by hand below
    (tmp_path / "old" / export.META_FILE).write_text(json.dumps(dict(meta, pretrained_words="abc")))
    with pytest.raises(ValueError, match="export.json: 'pretrained_words' must be null or a list of strings"):
        export.load(str(tmp_path / "old"))


def _replace_index(data):
    return _index_of(["zyxw", "unseen", "tokens", "extra"])


def _index_of(words):
    from fastner.embeddings import WordIndex

    return WordIndex.build(words).to_bytes()


@pytest.mark.parametrize("keep_manifest, change, error, expected", [
    (True, lambda data: data[:-1] + b"!", ValueError,
     "export-pretrained-words.bin differs from what export-manifest.json records"),
    (False, lambda data: b"X" + data[1:], ValueError,
     "export-pretrained-words.bin: cannot read the pretrained words: not a fastner word index"),
    (False, lambda data: data[:-1], ValueError, "export-pretrained-words.bin: cannot read the pretrained words: "
                                                "it holds .* bytes, its header says"),
    (False, _replace_index, ValueError,
     "export.json: 'export-pretrained-words.bin' lists 4 words, but program.pt2 holds 3 pretrained rows"),
    (True, None, FileNotFoundError, "not a fastner export directory: missing export-pretrained-words.bin"),
    (False, None, FileNotFoundError, "not a fastner export directory: missing export-pretrained-words.bin"),
])
def test_a_damaged_or_missing_word_index_is_refused(exported, tmp_path, keep_manifest, change, error, expected):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(exported[1], out)
    if not keep_manifest:
        (out / export.MANIFEST_FILE).unlink()
    index = out / export.PRETRAINED_INDEX_FILE
    if change is None:
        index.unlink()
    else:
        index.write_bytes(change(index.read_bytes()))
    with pytest.raises(error, match=expected):
        export.load(str(out))


def test_a_tagger_without_pretrained_words_exports_format_2_over_a_format_3_export(exported, tmp_path):
    """Format 3 only where there are pretrained words (an older fastner reads the rest); the
    earlier export's word index leaves the set."""
    import shutil

    from fastner.models.tagger import ModelConfig, SequenceTagger

    tagger = exported[0]
    config = ModelConfig(num_words=len(tagger.words), num_chars=len(tagger.chars), tags=list(tagger.tags.itos),
                         word_dim=8, char_dim=6, char_filters=6, hidden=6, layers=1, dropout=0.0)
    plain = Tagger(SequenceTagger(config), tagger.words, tagger.chars, tagger.tags, "IOB2", False, "cpu")
    out = tmp_path / "out"
    shutil.copytree(exported[1], out)
    assert export.export_tagger(plain, str(out), max_length=MAX_LENGTH)["format"] == export.EXPORT_FORMAT
    assert export.PRETRAINED_INDEX_FILE not in os.listdir(out)
    runtime = export.load(str(out))
    assert runtime.pretrained_index is None and runtime.tag(sentences()) == plain.tag(sentences())


@pytest.mark.skipif(not _served("rnn_layer_forward"), reason="the export calls no fastner ops without the extension")
def test_loading_an_export_of_fastner_ops_under_the_reference_backend_says_why(exported):
    # It was: "... calls fastner ops [...] but the compiled extension could not be loaded: None"
    # (FASTNER_BACKEND=reference never loads it, so there is no load error to show).
    script = ("from fastner import export\n"
              "try:\n"
              f"    export.load({str(exported[1])!r})\n"
              "except RuntimeError as err:\n"
              "    print(err)\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               FASTNER_BACKEND="reference")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("could not be loaded: FASTNER_BACKEND=reference keeps it unloaded"), \
        result.stdout
