"""Every user mistake at the CLI gives one `fastner: error: ...` line (file and line where there
is one) and exit status 2, never a traceback; loading never runs code from a model file."""
import io
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

from fastner import Tagger
from fastner.cli import EXIT_USAGE, main
from fastner.data.conll import Sentence, read_conll, write_conll
from fastner.demo import generate_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_OPTIONS = ["--epochs", "1", "--hidden", "8", "--word-dim", "8", "--optimizer", "adam", "--lr", "0.01",
                 "--batch-size", "8", "--seed", "1"]


# tiny models: see conftest.one_thread
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli-errors")
    train_data, dev_data = generate_corpus(40, 10, seed=2)
    write_conll(str(base / "train.txt"), train_data)
    write_conll(str(base / "dev.txt"), dev_data)
    assert main(["train", "--train", str(base / "train.txt"), "--dev", str(base / "dev.txt"),
                 "--out", str(base / "model")] + TRAIN_OPTIONS) == 0
    return base


def user_error(capsys, argv, *fragments):
    """main(argv) must exit 2 with `fastner: error:` and each fragment in its message."""
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse
        code = exit.code
    err = capsys.readouterr().err
    assert code == EXIT_USAGE, err
    assert "Traceback" not in err
    message = err.strip().splitlines()[-1]
    assert message.startswith("fastner: error: "), err
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def run_cli(args, stdin=b"", env=None):
    environment = dict(os.environ, **(env or {}))
    result = subprocess.run([sys.executable, "-m", "fastner"] + args, input=stdin, capture_output=True,
                            cwd=ROOT, env=environment, timeout=300)
    return result.returncode, result.stdout.decode("utf-8", "replace"), result.stderr.decode("utf-8", "replace")


def model_copy(files, tmp_path, keep_manifest=False):
    copy = tmp_path / "model"
    shutil.copytree(files / "model", copy)
    if not keep_manifest:  # a hand-assembled directory: nothing to check the files against
        os.remove(copy / "manifest.json")
    return copy


# ---- numeric options -------------------------------------------------------------------------

@pytest.mark.parametrize("option, value, expected", [
    ("--batch-size", "-1", "argument --batch-size: must be >= 1, got -1"),
    ("--batch-size", "0", "argument --batch-size: must be >= 1, got 0"),
    ("--batch-size", "ten", "argument --batch-size: expected an integer, got 'ten'"),
    ("--threads", "0", "argument --threads: must be in [1, 1024], got 0"),
    # OpenMP hung at 65536 threads and crashed (segfault) at 1000000
    ("--threads", "65536", "argument --threads: must be in [1, 1024], got 65536"),
    # k-best grows faster than linearly in k: 100000 ran for minutes, 10**20 was a traceback
    ("--nbest", "1001", "argument --nbest: must be in [1, 1000], got 1001"),
    ("--nbest", str(10**20), "argument --nbest: must be in [1, 1000]"),
])
def test_tag_numeric_options(files, capsys, option, value, expected):
    user_error(capsys, ["tag", str(files / "model"), str(files / "dev.txt"), option, value], expected)


@pytest.mark.parametrize("option, value, expected", [
    ("--lr", "1e30", "argument --lr: must be a finite number in (0, 1000], got 1e30"),
    ("--lr", "nan", "argument --lr: must be a finite number"),
    ("--lr", "0", "argument --lr: must be a finite number"),
    ("--dropout", "1.5", "argument --dropout: must be a finite number in [0, 1), got 1.5"),
    ("--hidden", "0", "argument --hidden: must be in [1, 8192], got 0"),
    ("--epochs", "0", "argument --epochs: must be >= 1, got 0"),
    ("--batch-size", "0", "argument --batch-size: must be >= 1, got 0"),
    ("--layers", "-2", "argument --layers: must be in [1, 64]"),
    ("--clip", "inf", "argument --clip: must be a finite number"),
    ("--seed", "-1", "argument --seed: must be in [0, "),
    ("--max-sentences", "0", "argument --max-sentences: must be >= 1"),
])
def test_train_numeric_options(files, capsys, tmp_path, option, value, expected):
    user_error(capsys, ["train", "--train", str(files / "train.txt"), "--dev", str(files / "dev.txt"),
                        "--out", str(tmp_path / "new"), option, value], expected)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("option, value, bound", [
    ("--hidden", "99999999999", "8192"), ("--word-dim", "99999999999", "16384"),
    ("--layers", "100000", "64"),  # built modules for minutes
])
def test_model_sizes_past_any_real_use_are_refused(files, capsys, tmp_path, option, value, bound):
    # the bounds are ModelConfig's (MAX_SIZES), which a --config file meets too
    user_error(capsys, ["train", "--train", str(files / "train.txt"), "--dev", str(files / "dev.txt"),
                        "--out", str(tmp_path / "new"), option, value],
               f"argument {option}: must be in [1, {bound}], got {value}")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("device, expected", [("foo", "device must be 'cpu', 'cuda' or 'cuda:N', got 'foo'"),
                                              ("cuda:x", "device must be")])
def test_train_device_is_checked_before_the_data_is_read(capsys, tmp_path, device, expected):
    # it was refused only after reading (and checking) the training and dev files
    user_error(capsys, ["train", "--train", str(tmp_path / "missing.txt"), "--dev", str(tmp_path / "missing.txt"),
                        "--out", str(tmp_path / "new"), "--device", device], expected)
    assert not (tmp_path / "new").exists()


def test_a_model_too_big_for_memory_is_a_user_error(files, capsys, tmp_path, monkeypatch):
    # the allocator's RuntimeError was a traceback; sizes within the bounds can still add up to
    # more memory than the machine has (simulated: the CPU allocator's own message)
    import fastner.train

    def allocate(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 214748364800 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(fastner.train, "train", allocate)
    user_error(capsys, ["train", "--train", str(files / "train.txt"), "--dev", str(files / "dev.txt"),
                        "--out", str(tmp_path / "new")],
               "fastner: error: not enough memory (200.0 GiB at once); choose smaller sizes (--hidden")
    assert not (tmp_path / "new").exists()  # the run saved nothing: no empty folder left behind


def test_a_run_that_fails_before_saving_leaves_no_empty_out_folder(files, capsys, tmp_path):
    args = ["train", "--train", str(files / "train.txt"), "--dev", str(files / "dev.txt"), "--out", str(tmp_path / "new")]
    user_error(capsys, args + ["--resume"], "--resume: no checkpoint to resume from")
    assert not (tmp_path / "new").exists()
    user_error(capsys, args + ["--embeddings", str(tmp_path / "vectors.txt")], "embeddings file not found")
    assert not (tmp_path / "new").exists()
    (tmp_path / "new").mkdir()  # a folder the user made stays
    user_error(capsys, args + ["--resume"], "--resume: no checkpoint to resume from")
    assert (tmp_path / "new").is_dir()


def test_other_subcommands_numeric_options(files, capsys, tmp_path):
    user_error(capsys, ["evaluate", str(files / "model"), str(files / "dev.txt"), "--batch-size", "0"], "--batch-size")
    user_error(capsys, ["export", str(files / "model"), str(tmp_path / "e"), "--max-length", "1"], "--max-length")
    user_error(capsys, ["demo", "--sentences", "0"], "--sentences")
    user_error(capsys, ["demo", "--epochs", "-1"], "--epochs")


def test_predict_refuses_an_nbest_out_of_range(files):
    tagger = Tagger.load(str(files / "model"), device="cpu")
    for bad in (0, 1001, 10**20, True):
        with pytest.raises(ValueError, match=r"nbest must be None or an int in \[1, 1000\]"):
            tagger.predict(["Anna visited Oslo"], nbest=bad)


def test_predict_refuses_a_batch_size_below_one(files):
    tagger = Tagger.load(str(files / "model"), device="cpu")
    for bad in (-1, 0, 2.5, True):
        with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
            tagger.predict(["Anna visited Oslo"], batch_size=bad)
    assert len(tagger.predict(["Anna visited Oslo"], batch_size=1)[0]["sentences"][0]["tags"]) == 3


# ---- text encoding -----------------------------------------------------------------------------

def test_a_byte_order_mark_is_not_part_of_the_first_token(files, capsys, tmp_path, monkeypatch):
    text = tmp_path / "bom.txt"
    text.write_bytes("\ufeffAnna visited Oslo .\n".encode("utf-8"))
    assert main(["tag", str(files / "model"), str(text)]) == 0
    assert capsys.readouterr().out.splitlines()[0].split()[0] == "Anna"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.read_bytes()), encoding="utf-8"))
    assert main(["tag", str(files / "model")]) == 0
    assert capsys.readouterr().out.splitlines()[0].split()[0] == "Anna"
    conll = tmp_path / "bom.conll"
    conll.write_bytes("\ufeffAnna B-PER\nvisited O\n".encode("utf-8"))
    assert read_conll(str(conll))[0].tokens == ["Anna", "visited"]


def test_a_jsonl_file_with_a_byte_order_mark_is_read_as_jsonl(files, capsys, tmp_path):
    # named .txt, so told apart by content: the mark made it read as CoNLL ("malformed tag")
    path = tmp_path / "spans.txt"
    path.write_bytes('\ufeff{"text": "Anna visited Oslo .", "spans": [{"start": 0, "end": 4, "label": "PER"}]}\r\n'
                     .encode("utf-8"))
    assert main(["convert", str(path), str(tmp_path / "out.conll")]) == 0
    assert (tmp_path / "out.conll").read_text(encoding="utf-8").splitlines()[:2] == ["Anna B-PER", "visited O"]
    capsys.readouterr()


def test_latin1_input_names_the_line_on_stdin_and_in_a_file(files, tmp_path):
    latin1 = "Anna visited Oslo .\nJosé visited Köln .\n".encode("latin-1")
    code, out, err = run_cli(["tag", str(files / "model")], stdin=latin1)
    assert code == EXIT_USAGE and "Traceback" not in err and "\ufffd" not in out
    assert err.strip().splitlines()[-1].startswith("fastner: error: <stdin>:2: not UTF-8 (byte 0xe9")
    path = tmp_path / "latin1.txt"
    path.write_bytes(latin1)
    code, _, err = run_cli(["tag", str(files / "model"), str(path)])
    assert code == EXIT_USAGE and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"fastner: error: {path}:2: not UTF-8 (byte 0xe9")


def test_latin1_data_file_names_file_and_line(files, capsys, tmp_path):
    bad = tmp_path / "train.txt"
    bad.write_bytes("Anna B-PER\n\nJos\xe9 B-PER\n".encode("latin-1"))
    user_error(capsys, ["evaluate", str(files / "model"), str(bad)], f"{bad}:3: not UTF-8 (byte 0xe9")


# ---- data files --------------------------------------------------------------------------------

def test_malformed_tag_names_file_and_line(files, capsys, tmp_path):
    bad = tmp_path / "train.txt"
    bad.write_text("Anna B-PER\nvisited O\n\nOslo X-PER\n", encoding="utf-8")
    user_error(capsys, ["train", "--train", str(bad), "--dev", str(files / "dev.txt"), "--out", str(tmp_path / "m")],
               f"{bad}:4: malformed tag 'X-PER'")
    user_error(capsys, ["evaluate", str(files / "model"), str(bad)], f"{bad}:4: malformed tag 'X-PER'")


def test_carriage_return_only_line_ends_are_refused_naming_the_file(files, capsys, tmp_path):
    # read as one line whose CRs split() took for spaces: one token "Anna" tagged "O", exit 0
    mac = tmp_path / "mac.txt"
    mac.write_bytes(b"Anna B-PER\rvisited O\rOslo B-LOC\r\rBob B-PER\rleft O\r")
    for argv in (["evaluate", str(files / "model"), str(mac)], ["convert", str(mac), str(tmp_path / "out.jsonl")],
                 ["tag", str(files / "model"), str(mac), "--input", "conll"]):
        user_error(capsys, argv, f"{mac}:1: a carriage return (\\r) inside the line")
    assert not (tmp_path / "out.jsonl").exists()
    windows = tmp_path / "windows.txt"  # \r\n line ends are fine
    windows.write_bytes(b"Anna B-PER\r\nvisited O\r\n\r\nBob B-PER\r\n")
    assert [s.tokens for s in read_conll(str(windows))] == [["Anna", "visited"], ["Bob"]]
    # raw text may end its lines in CR alone
    assert main(["tag", str(files / "model"), str(mac), "--output", "jsonl"]) == 0
    capsys.readouterr()


def test_a_device_or_a_directory_as_a_data_file_says_what_it_is(files, capsys, tmp_path):
    user_error(capsys, ["evaluate", str(files / "model"), os.devnull], f"{os.devnull} is a character device")
    user_error(capsys, ["evaluate", str(files / "model"), str(tmp_path)], f"{tmp_path} is a directory")
    # tag reads a directory's .txt articles; one without any is the mistake
    user_error(capsys, ["tag", str(files / "model"), str(tmp_path)], f"{tmp_path}: a directory without .txt files")
    user_error(capsys, ["evaluate", str(files / "model"), str(tmp_path / "missing.txt")], "not found")
    user_error(capsys, ["tag", str(files / "model"), str(tmp_path), "--input", "conll"],
               f"{tmp_path} is a directory; expected an input file")
    # a directory as --config was "config file not found"
    user_error(capsys, ["train", "--train", str(files / "train.txt"), "--dev", str(files / "dev.txt"),
                        "--out", str(tmp_path / "new"), "--config", str(tmp_path)],
               f"{tmp_path} is a directory; expected a config file")


def test_evaluate_compares_tags_in_the_gold_files_scheme(files, capsys, tmp_path):
    """The model predicts in its training file's scheme (IOB2 here); a gold file in BIOES was
    compared tag by tag with IOB2 predictions: a wrong token accuracy, and wrong --output."""
    from fastner.data.schemes import convert_tags
    from fastner.metrics import conlleval, format_conlleval

    gold = read_conll(str(files / "dev.txt"))
    bioes = tmp_path / "dev-bioes.txt"
    write_conll(str(bioes), [Sentence(s.tokens, convert_tags(s.tags, "BIOES")) for s in gold])
    assert main(["evaluate", str(files / "model"), str(files / "dev.txt"), "--output", str(tmp_path / "iob2.txt")]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(files / "model"), str(bioes), "--output", str(tmp_path / "bioes.txt")]) == 0
    report = capsys.readouterr().out

    def columns(path):
        blocks = path.read_text(encoding="utf-8").strip("\n").split("\n\n")
        return [[line.split() for line in block.splitlines()] for block in blocks]

    predicted = [convert_tags([row[2] for row in block], "BIOES") for block in columns(tmp_path / "iob2.txt")]
    assert [[row[2] for row in block] for block in columns(tmp_path / "bioes.txt")] == predicted
    gold_bioes = [convert_tags(s.tags, "BIOES") for s in gold]
    assert report.strip() == format_conlleval(conlleval(gold_bioes, predicted)).strip()
    tagger = Tagger.load(str(files / "model"), device="cpu")
    assert tagger.evaluate(read_conll(str(bioes)))["accuracy"] == conlleval(gold_bioes, predicted)["accuracy"]


# ---- output paths -----------------------------------------------------------------------------

def test_output_into_a_fifo_reaches_its_reader(files, capsys, tmp_path):
    """A FIFO (like /dev/stdout, a device or `--out >(gzip > x.gz)`) is written into; it was
    replaced by a regular file, its reader got nothing and the command said nothing (as root
    `--out /dev/stdout` turned /dev/stdout itself into a regular file)."""
    import threading

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text(encoding="utf-8")), daemon=True)
    reader.start()
    assert main(["tag", str(files / "model"), str(files / "dev.txt"), "--input", "conll", "--out", str(fifo)]) == 0
    reader.join(timeout=30)
    assert received and received[0].splitlines()[0].split()[0] == read_conll(str(files / "dev.txt"))[0].tokens[0]
    assert fifo.is_fifo()


def test_output_through_a_link_replaces_the_file_it_names(files, capsys, tmp_path):
    target, link = tmp_path / "tagged.txt", tmp_path / "link.txt"
    link.symlink_to(target)
    assert main(["tag", str(files / "model"), str(files / "dev.txt"), "--input", "conll", "--out", str(link)]) == 0
    assert link.is_symlink() and target.read_text(encoding="utf-8").strip()


def test_an_unwritable_output_folder_names_the_output(files, capsys, tmp_path, monkeypatch):
    import errno
    import tempfile

    def read_only(*args, **kwargs):  # root writes anywhere: a read-only file system, simulated
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    out = tmp_path / "out.txt"
    user_error(capsys, ["tag", str(files / "model"), str(files / "dev.txt"), "--out", str(out)],
               f"--out {out}: cannot write in {tmp_path}: Read-only file system")
    user_error(capsys, ["evaluate", str(files / "model"), str(files / "dev.txt"), "--output", str(out)],
               f"--output {out}: cannot write in {tmp_path}: Read-only file system")
    assert not out.exists()


# ---- model files -------------------------------------------------------------------------------

class WritesAFile:
    path = None

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_malicious_weights_file_is_refused_and_never_runs(files, capsys, tmp_path):
    model = model_copy(files, tmp_path)
    marker = tmp_path / "PAYLOAD_RAN"
    WritesAFile.path = str(marker)
    torch.save({"weight": WritesAFile()}, model / "weights.pt")
    message = user_error(capsys, ["tag", str(model), str(files / "dev.txt")],
                         f"{model / 'weights.pt'} is not a weights file fastner can read safely")
    assert "weights_only=False" not in message and "io.open" in message
    assert not marker.exists()


@pytest.mark.parametrize("content, expected", [
    (b"", "is empty (0 bytes)"),
    (b"garbage, not a torch file" * 4, "is not a weights file fastner can read safely"),
    (pickle.dumps([1, 2, 3]), "is not a weights file fastner can read safely"),
    ("list", "holds a list, expected a state dict"),
    ("wrong shapes", "the weights do not fit the model in config.json: Error(s) in loading state_dict"),
])
def test_bad_weights_files(files, capsys, tmp_path, content, expected):
    model = model_copy(files, tmp_path)
    if content == "list":
        torch.save([torch.zeros(2)], model / "weights.pt")
    elif content == "wrong shapes":
        state = torch.load(model / "weights.pt", weights_only=True)
        torch.save({name: torch.zeros(1) for name in state}, model / "weights.pt")
    else:
        (model / "weights.pt").write_bytes(content)
    user_error(capsys, ["evaluate", str(model), str(files / "dev.txt")], str(model / "weights.pt"), expected)


def test_a_changed_file_in_a_manifested_directory(files, capsys, tmp_path):
    model = model_copy(files, tmp_path, keep_manifest=True)
    (model / "weights.pt").write_bytes(b"")
    user_error(capsys, ["tag", str(model), str(files / "dev.txt")],
               f"{model / 'weights.pt'} differs from what manifest.json records")


def test_config_json_not_utf8_or_not_json_names_file_and_line(files, capsys, tmp_path):
    model = model_copy(files, tmp_path)
    text = (model / "config.json").read_bytes()
    (model / "config.json").write_bytes(text.replace(b'"model"', b'"mod\xe9l"', 1))
    user_error(capsys, ["tag", str(model), str(files / "dev.txt")], f"{model / 'config.json'}:", "not UTF-8")
    (model / "config.json").write_bytes(b'{\n "format_version": 1,\n oops\n}')
    user_error(capsys, ["tag", str(model), str(files / "dev.txt")], f"{model / 'config.json'}:3: not valid JSON")


def test_bad_backend_variable_is_a_user_error():
    code, _, err = run_cli(["info"], env={"FASTNER_BACKEND": "bogus"})
    assert code == EXIT_USAGE and "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("fastner: error: FASTNER_BACKEND must be 'reference', 'fused' or "
                                            "'auto', got 'bogus'")


# ---- saved runs --------------------------------------------------------------------------------

def test_train_refuses_to_overwrite_a_saved_run(files, capsys, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(files / "model", out)
    before = (out / "weights.pt").read_bytes()
    args = ["train", "--train", str(files / "train.txt"), "--dev", str(files / "dev.txt"), "--out", str(out)]
    user_error(capsys, args + TRAIN_OPTIONS, "already holds a saved run", "--resume", "--overwrite")
    assert (out / "weights.pt").read_bytes() == before
    user_error(capsys, args + TRAIN_OPTIONS + ["--resume", "--overwrite"], "give one of them")
    assert main(args + TRAIN_OPTIONS[:-2] + ["--seed", "7", "--overwrite"]) == 0
    assert (out / "weights.pt").read_bytes() != before


def test_resume_contradicting_the_checkpoint_is_refused_naming_the_settings(files, capsys, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(files / "model", out)
    args = ["train", "--train", str(files / "train.txt"), "--dev", str(files / "dev.txt"), "--out", str(out), "--resume"]
    user_error(capsys, args + ["--encoder", "gru", "--hidden", "20", "--epochs", "2"],
               "encoder 'gru' (checkpoint: 'lstm')", "hidden 20 (checkpoint: 8)")
    # options not given keep the run's values (hidden 8, adam, ...), not the defaults
    assert main(args + ["--epochs", "2"]) == 0
    assert Tagger.load(str(out), device="cpu").model.config.hidden == 8


def test_resume_with_an_entity_type_the_run_does_not_know(files, capsys, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(files / "model", out)
    extra = tmp_path / "extra.txt"
    extra.write_text("Anna B-PER\nloves O\nJazz B-GENRE\n\n", encoding="utf-8")
    user_error(capsys, ["train", "--train", str(extra), "--dev", str(files / "dev.txt"), "--out", str(out), "--resume",
                        "--epochs", "2"],
               # the checkpoint records a digest of its data, so other sentences are refused
               # before their tags are read; runs saved before that get the entity-type message
               "the train data (other sentences than the run's)", "start a new run")


def test_embeddings_file_errors_name_file_and_line(files, capsys, tmp_path):
    vectors = tmp_path / "vectors.txt"
    vectors.write_bytes("anna 0.1 0.2\nk\xf6ln 0.3 0.4\n".encode("latin-1"))
    args = ["train", "--train", str(files / "train.txt"), "--dev", str(files / "dev.txt"), "--out", str(tmp_path / "m")]
    user_error(capsys, args + ["--embeddings", str(vectors)], f"{vectors}:2: not UTF-8 (byte 0xf6")
    user_error(capsys, args + ["--embeddings", str(tmp_path)], f"{tmp_path} is a directory")


def test_bench_and_demo_mistakes(files, capsys, tmp_path):
    user_error(capsys, ["bench", "--threads", "0"], "--threads must be in [1, 1024], got 0")
    user_error(capsys, ["bench", "--threads", "65536"], "--threads must be in [1, 1024], got 65536")
    user_error(capsys, ["bench", "--only", "nothing"], "--only takes a comma-separated list")
    user_error(capsys, ["demo", "--out", str(files / "model"), "--sentences", "20", "--epochs", "1"],
               "already holds a saved run", "choose another --out")
    # a file as --out was a FileExistsError traceback once the demo had generated its corpus
    user_error(capsys, ["demo", "--out", str(files / "train.txt"), "--sentences", "20", "--epochs", "1"],
               f"--out {files / 'train.txt'} exists and is not a directory")
