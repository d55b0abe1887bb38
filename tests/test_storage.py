"""Nothing a user saved is lost: a kill at any point of a save leaves the old tagger or the new
one loadable (never a mix), a run directory stays resumable, and `train` refuses to overwrite
a saved run unasked or to resume it with other settings."""
import functools
import os
import pickle
import shutil
import stat
import threading
import time

import pytest
import torch

from fastner import storage
from fastner.demo import generate_corpus
from fastner.models.tagger import ModelConfig, SequenceTagger
from fastner.tagger import Tagger, TaggerLoadError
from fastner.train import RunDirectoryError, build_vocabularies, train
from tests import testing


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, no `except Exception` catches it."""


def small_tagger(sentences, hidden, seed):
    train_data, _ = generate_corpus(sentences, 1, seed=seed)
    words, chars, tags = build_vocabularies(train_data, "BIOES", False)
    torch.manual_seed(seed)
    config = ModelConfig(num_words=len(words), num_chars=len(chars), tags=list(tags.itos), word_dim=8, char_dim=6,
                         char_filters=6, hidden=hidden, dropout=0.0)
    return Tagger(SequenceTagger(config), words, chars, tags, "IOB2", False, "cpu")


def same_model(loaded, tagger):
    if loaded.model.config.hidden != tagger.model.config.hidden or loaded.words.itos != tagger.words.itos:
        return False
    theirs = tagger.model.state_dict()
    return all(torch.equal(value, theirs[name]) for name, value in loaded.model.state_dict().items())


def kill_at(monkeypatch, function_name, n):
    """Make os.<function_name> raise Killed on its n-th call from now on (1-based)."""
    real = getattr(os, function_name)
    calls = {"count": 0}

    def fake(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == n:
            raise Killed(f"killed at {function_name} call {n}")
        return real(*args, **kwargs)

    monkeypatch.setattr(os, function_name, fake)
    return calls


def save_killed(monkeypatch, tagger, directory, install_kill) -> bool:
    """tagger.save(directory) with install_kill(patch) in force: True if the save finished,
    False if the kill it installs stopped it."""
    with monkeypatch.context() as patch:
        install_kill(patch)
        try:
            tagger.save(str(directory))
            return True
        except Killed:
            return False


# os.fsync: a kill while files are written (staged or, before this fix, in place);
# os.replace: a kill while they are moved into place; os.mkdir, os.open: while the staging
# folder and the staged manifest are made; os.rmdir, os.unlink: while the staging folder is removed
# os.remove: while the file of a member that left the set (an older tagger's table) is removed
@pytest.mark.parametrize("function_name", ["fsync", "replace", "mkdir", "open", "rmdir", "unlink", "remove"])
@pytest.mark.parametrize("old_table", [False, True], ids=["", "over-a-table"])
def test_a_kill_anywhere_in_a_save_leaves_the_old_or_the_new_tagger(tmp_path, monkeypatch, function_name, old_table):
    old = pretrained_tagger(rows=50, seed=1) if old_table else small_tagger(20, hidden=6, seed=1)
    new = small_tagger(30, hidden=10, seed=2)
    outcomes = set()
    for n in range(1, 60):
        directory = tmp_path / f"kill{n}"
        old.save(str(directory))
        finished = save_killed(monkeypatch, new, directory, lambda patch: kill_at(patch, function_name, n))
        loaded = Tagger.load(str(directory), device="cpu")
        if same_model(loaded, new):
            outcomes.add("new")
        else:
            assert same_model(loaded, old), f"a kill at os.{function_name} call {n} left neither model"
            outcomes.add("old")
        # the next save after the kill completes the set and leaves nothing behind
        new.save(str(directory))
        assert same_model(Tagger.load(str(directory), device="cpu"), new)
        assert not any(name.startswith(".") for name in os.listdir(directory))
        assert not old_table or "pretrained.npy" not in os.listdir(directory)
        if finished:
            break
    else:
        pytest.fail("the save never finished")
    assert "new" in outcomes
    if function_name == "fsync":  # kills before the staged manifest exists keep the old set
        assert "old" in outcomes
    if function_name == "remove" and old_table:  # the kill came after the new set was in place
        assert outcomes == {"new"}


def test_a_write_torn_by_a_kill_leaves_the_old_or_the_new_tagger(tmp_path, monkeypatch):
    """A kill while a file's bytes are not yet on disk leaves half of them: the staged manifest
    among them must not hide the complete set in place (nor be moved into place by the next save)."""
    old, new = small_tagger(20, hidden=6, seed=1), small_tagger(30, hidden=10, seed=2)
    real_fsync = os.fsync
    for n in range(1, 60):
        directory = tmp_path / f"kill{n}"
        old.save(str(directory))
        calls = {"count": 0}

        def torn_fsync(fd):
            if stat.S_ISREG(os.fstat(fd).st_mode):
                calls["count"] += 1
                if calls["count"] == n:
                    os.ftruncate(fd, os.fstat(fd).st_size // 2)
                    raise Killed(f"killed writing file {n}")
            real_fsync(fd)

        finished = save_killed(monkeypatch, new, directory, lambda patch: patch.setattr(os, "fsync", torn_fsync))
        loaded = Tagger.load(str(directory), device="cpu")
        assert same_model(loaded, new) or same_model(loaded, old), f"a torn file {n} left neither model"
        new.save(str(directory))
        assert same_model(Tagger.load(str(directory), device="cpu"), new)
        if finished:
            break
    else:
        pytest.fail("the save never finished")


@pytest.mark.parametrize("manifest", ["[]", '"files"', '{"format": 1, "files": {"weights.pt": "abc"}}',
                                      "[" * 100_000 + "]" * 100_000])
def test_a_manifest_of_the_wrong_shape_is_refused_naming_it(tmp_path, manifest):
    small_tagger(20, hidden=6, seed=1).save(str(tmp_path / "m"))
    (tmp_path / "m" / storage.MANIFEST_FILE).write_text(manifest)
    with pytest.raises(TaggerLoadError, match="manifest.json: (unreadable|not a fastner) manifest"):
        Tagger.load(str(tmp_path / "m"))


class RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_weights_file_that_would_run_code_is_refused_without_advice_to_run_it(tmp_path):
    tagger = small_tagger(20, hidden=6, seed=1)
    tagger.save(str(tmp_path / "m"))
    os.remove(tmp_path / "m" / storage.MANIFEST_FILE)
    marker = tmp_path / "PAYLOAD_RAN"
    for protocol in (0, 2):
        (tmp_path / "m" / "weights.pt").write_bytes(pickle.dumps(RunsACommand(marker), protocol=protocol))
        with pytest.raises(TaggerLoadError, match="weights.pt is not a weights file fastner can read safely") as err:
            Tagger.load(str(tmp_path / "m"))
        # the unpickler's reason (the global it refused), not torch's advice to disable the check
        assert f"{os.system.__module__}.system" in str(err.value)
        assert "weights_only" not in str(err.value) and "add_safe_globals" not in str(err.value)
        assert not marker.exists()


def test_an_altered_file_is_refused_not_mixed(tmp_path):
    tagger = small_tagger(20, hidden=6, seed=1)
    tagger.save(str(tmp_path / "m"))
    other = small_tagger(30, hidden=10, seed=2)
    other.save(str(tmp_path / "other"))
    shutil.copy(tmp_path / "other" / "config.json", tmp_path / "m" / "config.json")
    with pytest.raises(TaggerLoadError, match="config.json differs from what manifest.json records"):
        Tagger.load(str(tmp_path / "m"))


def test_a_directory_without_manifest_still_loads(tmp_path):
    tagger = small_tagger(20, hidden=6, seed=1)
    tagger.save(str(tmp_path / "m"))
    os.remove(tmp_path / "m" / storage.MANIFEST_FILE)  # as written before manifests existed
    assert same_model(Tagger.load(str(tmp_path / "m"), device="cpu"), tagger)


# ---- training runs -------------------------------------------------------------------------

tiny_config = functools.partial(testing.tiny_config, epochs=1)


@pytest.fixture(scope="module")
def corpus():
    return generate_corpus(40, 15, seed=5)


def quiet(_text):
    pass


def test_a_kill_during_an_epoch_save_leaves_a_resumable_run(corpus, tmp_path, monkeypatch):
    train_data, dev_data = corpus
    straight = train(train_data, dev_data, str(tmp_path / "straight"), tiny_config(epochs=2), log=quiet)
    for n in range(1, 40):
        directory = str(tmp_path / f"run{n}")
        train(train_data, dev_data, directory, tiny_config(epochs=1), log=quiet)
        with monkeypatch.context() as patch:
            kill_at(patch, "replace", n)
            try:
                train(train_data, dev_data, directory, tiny_config(epochs=2), resume=True, log=quiet)
                finished = True
            except Killed:
                finished = False
        resumed = train(train_data, dev_data, directory, tiny_config(epochs=2), resume=True, log=quiet)
        losses = [r["loss_per_token"] for r in resumed["history"]]
        assert losses == [r["loss_per_token"] for r in straight["history"]], f"kill at os.replace call {n}"
        Tagger.load(directory, device="cpu")
        if finished:
            break
    else:
        pytest.fail("the resumed run never finished")


def test_train_refuses_a_directory_holding_a_run_unless_resume_or_overwrite(corpus, tmp_path):
    train_data, dev_data = corpus
    out = str(tmp_path / "m")
    train(train_data, dev_data, out, tiny_config(), log=quiet)
    before = {name: open(os.path.join(out, name), "rb").read() for name in ("weights.pt", "checkpoint.pt")}
    with pytest.raises(RunDirectoryError, match=r"already holds a saved run .*--resume.*--overwrite"):
        train(train_data, dev_data, out, tiny_config(seed=9), log=quiet)
    assert before == {name: open(os.path.join(out, name), "rb").read() for name in before}
    train(train_data, dev_data, out, tiny_config(seed=9), overwrite=True, log=quiet)
    assert open(os.path.join(out, "weights.pt"), "rb").read() != before["weights.pt"]


def test_resume_with_contradicting_settings_is_refused_naming_them(corpus, tmp_path):
    train_data, dev_data = corpus
    out = str(tmp_path / "m")
    train(train_data, dev_data, out, tiny_config(), log=quiet)
    contradicting = tiny_config(epochs=2, model={"hidden": 20, "encoder": "gru", "char_filters": 6, "char_dim": 6})
    with pytest.raises(RunDirectoryError, match=r"hidden 20 \(checkpoint: 8\).*encoder 'gru' \(checkpoint: 'lstm'\)"):
        train(train_data, dev_data, out, contradicting, resume=True, log=quiet)
    with pytest.raises(RunDirectoryError, match=r"lr 0.5 \(checkpoint: 0.01\)"):
        train(train_data, dev_data, out, tiny_config(epochs=2, lr=0.5), resume=True, log=quiet)
    assert len(train(train_data, dev_data, out, tiny_config(epochs=2), resume=True, log=quiet)["history"]) == 2


def test_resume_with_other_data_is_refused(corpus, tmp_path):
    train_data, dev_data = corpus
    out = str(tmp_path / "m")
    train(train_data, dev_data, out, tiny_config(), log=quiet)
    other_train, other_dev = generate_corpus(40, 15, seed=6)
    with pytest.raises(RunDirectoryError, match=r"the train data \(other sentences than the run's\)"):
        train(other_train, dev_data, out, tiny_config(epochs=2), resume=True, log=quiet)
    with pytest.raises(RunDirectoryError, match=r"the dev data \(other sentences than the run's\)"):
        train(train_data, other_dev, out, tiny_config(epochs=2), resume=True, log=quiet)
    assert len(train(train_data, dev_data, out, tiny_config(epochs=2), resume=True, log=quiet)["history"]) == 2


@pytest.mark.parametrize("key, value", [
    ("torch_rng", torch.zeros(3)), ("optimizer", {"state": {}}), ("python_rng", [1, 2]), ("best_f1", "high"),
    ("epoch", -5), ("epoch", 10**6), ("history", 5), ("model", {"word_embedding.weight": torch.zeros(1)}),
])
def test_resume_from_a_checkpoint_of_the_wrong_shape_is_refused_naming_it(corpus, tmp_path, key, value):
    train_data, dev_data = corpus
    out = tmp_path / "m"
    train(train_data, dev_data, str(out), tiny_config(), log=quiet)
    os.remove(out / storage.MANIFEST_FILE)  # read as it is: a checkpoint from elsewhere
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    state[key] = value
    torch.save(state, out / "checkpoint.pt")
    with pytest.raises(RunDirectoryError, match="checkpoint.pt holds a checkpoint fastner cannot continue"):
        train(train_data, dev_data, str(out), tiny_config(epochs=2), resume=True, log=quiet)


def test_open_file_set_checks_what_a_reader_maps(tmp_path):
    from fastner.storage import MissingFiles, StorageError, open_file_set, write_file_set

    write_file_set(str(tmp_path), {"big.npy": b"x" * 3_000_000, "small.json": b"{}"})
    blocks = []
    with open_file_set(str(tmp_path), ["small.json"], optional=["big.npy", "absent.npy"],
                       scan={"big.npy": lambda offset, block: blocks.append((offset, len(block)))}) as files:
        assert files.data == {"small.json": b"{}"} and set(files.handles) == {"big.npy"}
        assert files.handles["big.npy"].read() == b"x" * 3_000_000  # the handle is back at 0
    assert [offset for offset, _ in blocks] == [0, 1 << 20, 2 << 20] and sum(n for _, n in blocks) == 3_000_000
    with pytest.raises(MissingFiles):
        open_file_set(str(tmp_path), ["absent.npy"])
    with open(tmp_path / "big.npy", "r+b") as handle:  # one byte changed in place
        handle.seek(2_000_000)
        handle.write(b"y")
    with pytest.raises(StorageError, match="big.npy differs"):
        open_file_set(str(tmp_path), ["big.npy"], scan={"big.npy": lambda offset, block: None})
    # an optional member that fails its check is left out, its error kept for a caller needing it
    with open_file_set(str(tmp_path), ["small.json"], optional=["big.npy"],
                       scan={"big.npy": lambda offset, block: None}) as files:
        assert not files.handles and list(files.data) == ["small.json"]
        assert isinstance(files.errors["big.npy"], StorageError) and "big.npy differs" in str(files.errors["big.npy"])


# ---- a load racing a save ------------------------------------------------------------------

def generation_files(n: int):
    """A set whose every file says which save wrote it (and a large one, read as a stream)."""
    return {"config.json": b"%d" % n, "vocab.json": b"%d" % n * 1000, "weights.pt": b"%d" % n * 3,
            "pretrained.npy": (b"%d" % n).ljust(8) * 300_000}


def race(directory, seconds, save, load):
    """Save alternately in a thread while loading in this one for `seconds`: every load's
    outcome (a load that raises fails the test)."""
    stop, failures, outcomes = threading.Event(), [], []

    def saver():
        n = 0
        try:
            while not stop.is_set():
                n += 1
                save(n)
        except BaseException as err:  # noqa: B036, reported below
            failures.append(err)

    save(0)
    thread = threading.Thread(target=saver)
    thread.start()
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not failures:
            outcomes.append(load())
    finally:
        stop.set()
        thread.join()
    assert not failures, failures
    return outcomes


RACE_SECONDS = [pytest.param(1.5, id="1.5s"), pytest.param(30, id="30s", marks=pytest.mark.slow)]


@pytest.mark.parametrize("seconds", RACE_SECONDS)
def test_a_load_racing_saves_reads_one_whole_set(tmp_path, seconds):
    """It was: 1 load in ~1,000 failed ("missing vocab.json": a staged file moved into place
    between its look and its open) or found a file differing from the manifest it had read (the
    save's renames fell between the two), and pretrained.npy was checked through its path apart
    from the others, so the file then mapped could be a newer save's."""
    from fastner.storage import open_file_set, write_file_set

    def load():
        with open_file_set(str(tmp_path), ["config.json", "vocab.json", "weights.pt"], optional=["pretrained.npy"],
                           scan={"pretrained.npy": lambda offset, block: None}) as files:
            generation = files.data["config.json"].decode()
            table = files.handles["pretrained.npy"].read()
        assert files.data == {name: data for name, data in generation_files(int(generation)).items()
                              if name != "pretrained.npy"}
        assert table == generation_files(int(generation))["pretrained.npy"], "pretrained.npy of another save"
        return int(generation)

    generations = race(tmp_path, seconds, lambda n: write_file_set(str(tmp_path), generation_files(n)), load)
    assert len(set(generations)) > 1, "no save happened while loading"


@pytest.mark.parametrize("seconds", RACE_SECONDS)
def test_a_tagger_load_racing_saves_gets_one_whole_tagger(tmp_path, seconds):
    """It was: a load mapped the pretrained table of the save after the one its weights came from."""
    from fastner.tagger import PRETRAINED_VECTORS_FILE

    old, new = (pretrained_tagger(rows=20_000, seed=seed) for seed in (1, 2))

    def load():
        loaded = Tagger.load(str(tmp_path), device="cpu")
        match = [tagger for tagger in (old, new) if same_model(loaded, tagger)]
        assert match and torch.equal(loaded.model.pretrained, match[0].model.pretrained), "a mixed tagger"
        return match[0] is new

    outcomes = race(tmp_path, seconds, lambda n: (old, new)[n % 2].save(str(tmp_path)), load)
    assert set(outcomes) == {True, False}
    assert os.path.isfile(tmp_path / PRETRAINED_VECTORS_FILE)


def pretrained_tagger(rows: int, seed: int):
    """A small tagger with a frozen pretrained table of `rows` rows (float16, random per seed)."""
    train_data, _ = generate_corpus(20, 1, seed=seed)
    words, chars, tags = build_vocabularies(train_data, "BIOES", False)
    torch.manual_seed(seed)
    config = ModelConfig(num_words=len(words), num_chars=len(chars), tags=list(tags.itos), word_dim=8, char_dim=6,
                         char_filters=6, hidden=6, dropout=0.0, pretrained_rows=rows)
    table = torch.randn(rows, 8).half()
    return Tagger(SequenceTagger(config, pretrained=table), words, chars, tags, "IOB2", False, "cpu",
                  pretrained_words=[f"w{seed}_{i}" for i in range(rows)])


def test_a_bad_member_name_is_refused_before_anything_is_written(tmp_path):
    from fastner.storage import write_file_set

    write_file_set(str(tmp_path), {"a.json": b"1"})
    with pytest.raises(ValueError, match="plain file name, got '../b.json'"):
        write_file_set(str(tmp_path), {"a.json": b"2", "../b.json": b"x"})
    assert sorted(os.listdir(tmp_path)) == ["a.json", "manifest.json"]  # no staging folder left half-written


def test_a_tagger_saved_over_one_with_a_table_leaves_no_table_behind(tmp_path):
    """It was: the manifest kept naming the older tagger's pretrained.npy and pretrained_words.json
    (40 MB for GloVe), so they stayed, were copied along and hashed at every load."""
    from fastner.tagger import PRETRAINED_VECTORS_FILE, PRETRAINED_WORDS_FILE

    pretrained_tagger(rows=50, seed=1).save(str(tmp_path))
    plain = small_tagger(20, hidden=6, seed=2)
    plain.save(str(tmp_path))
    assert PRETRAINED_VECTORS_FILE not in os.listdir(tmp_path) and PRETRAINED_WORDS_FILE not in os.listdir(tmp_path)
    assert PRETRAINED_VECTORS_FILE not in (tmp_path / storage.MANIFEST_FILE).read_text()
    assert same_model(Tagger.load(str(tmp_path)), plain)


def test_a_damaged_table_a_model_does_not_use_does_not_stop_its_load(tmp_path):
    """A directory an older fastner saved a table-less tagger into, over one with a table: the
    stale table is listed in the manifest, and damage to it concerns no one."""
    from fastner.tagger import PRETRAINED_VECTORS_FILE

    pretrained_tagger(rows=50, seed=1).save(str(tmp_path))
    plain = small_tagger(20, hidden=6, seed=2)
    storage.write_file_set(str(tmp_path), {name: data for name, data in plain.files().items() if data is not None})
    with open(tmp_path / PRETRAINED_VECTORS_FILE, "r+b") as handle:
        handle.seek(200)
        handle.write(b"\xff\xff")
    assert same_model(Tagger.load(str(tmp_path)), plain)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_saved_files_get_the_umask_s_permissions_and_the_umask_is_left_alone(tmp_path, monkeypatch, umask):
    """It was: atomic_write_bytes read the umask by setting it to 0 and back, process-wide, so a
    file another thread created in between got mode 0666 whatever the umask."""
    previous = os.umask(umask)
    try:
        with monkeypatch.context() as patch:
            def no_umask(mask):
                raise AssertionError("the process umask was changed")

            patch.setattr(os, "umask", no_umask)
            storage.atomic_write_bytes(str(tmp_path / "single.json"), b"{}")
            storage.write_file_set(str(tmp_path / "set"), {"a.json": b"1"})
    finally:
        os.umask(previous)
    for path in (tmp_path / "single.json", tmp_path / "set" / "a.json", tmp_path / "set" / storage.MANIFEST_FILE):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask, path


def test_saves_into_one_directory_at_once_wait_for_each_other(tmp_path):
    """It was: two saves at once shared the staging folder, and most failed ("File exists:
    .manifest.json.staging", or "No such file" for a staged file the other's recovery swept
    away): 288 of 400 in two threads. Now each waits for the other; every save lands whole."""
    from fastner.storage import read_file_set, write_file_set

    failures = []

    def saver(writer):
        try:
            for n in range(25):
                write_file_set(str(tmp_path), generation_files(1000 * writer + n))
        except Exception as err:  # noqa: BLE001, reported below
            failures.append(err)

    threads = [threading.Thread(target=saver, args=(writer,)) for writer in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures[:3]
    last = read_file_set(str(tmp_path), generation_files(0))
    assert last == generation_files(int(last["config.json"])) and int(last["config.json"]) % 1000 == 24
    assert sorted(os.listdir(tmp_path)) == sorted([*generation_files(0), storage.MANIFEST_FILE])


def test_a_save_onto_a_file_says_it_is_not_a_directory(tmp_path):
    """It was: FileExistsError "File exists: 'PATH'" (from os.makedirs), which reads as if the
    save refused to overwrite."""
    (tmp_path / "model").write_text("x")
    with pytest.raises(NotADirectoryError, match="model' exists and is not a directory"):
        small_tagger(20, hidden=6, seed=1).save(str(tmp_path / "model"))
    assert (tmp_path / "model").read_text() == "x"


def test_a_tagger_with_nan_weights_is_not_saved(tmp_path):
    """It was: saved without a word, over the previous tagger, and the directory then failed to
    load as "a damaged weights file"."""
    good = small_tagger(20, hidden=6, seed=1)
    good.save(str(tmp_path))
    bad = small_tagger(20, hidden=6, seed=2)
    with torch.no_grad():
        bad.model.crf.transitions[0, 1] = float("nan")
    with pytest.raises(ValueError, match=r"weights hold nan or inf values \(crf.transitions\): not saved"):
        bad.save(str(tmp_path))
    assert same_model(Tagger.load(str(tmp_path)), good)


def test_a_load_that_two_saves_overtake_rereads_even_when_the_second_restores_the_first(tmp_path, monkeypatch):
    """Saves A, B, A again (a run saving alternately, or a rollback): a reader that read A's
    manifest, then opened a file of B and the rest of the second A, found a mismatch while the
    manifest read the same as its snapshot (same content), and reported damage instead of
    rereading. The snapshot now includes the manifest file's identity, which every save renews."""
    from fastner.storage import open_file_set, write_file_set

    a, b = generation_files(1), generation_files(2)
    write_file_set(str(tmp_path), a)
    real_open, members, busy = open, [], []

    def racing_open(path, *args, **kwargs):
        if not busy and os.path.dirname(str(path)) == str(tmp_path) and os.path.basename(str(path)) in a:
            members.append(path)
            busy.append(True)
            try:
                write_file_set(str(tmp_path), b if len(members) == 1 else a)  # B before the first, A before the second
            finally:
                busy.pop()
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(storage, "open", racing_open, raising=False)
    with open_file_set(str(tmp_path), ["config.json", "vocab.json"]) as files:
        monkeypatch.undo()
        assert files.data == {name: a[name] for name in ("config.json", "vocab.json")}


FORMAT_1 = os.path.join(os.path.dirname(__file__), "fixtures", "tagger_format1")


def test_a_tagger_saved_in_format_1_loads_and_tags_as_it_did(tmp_path):
    """tests/fixtures/tagger_format1 was saved by fastner at 59fd7df (format 1: the pretrained
    words as a JSON list, pretrained_words.json; odd words, a repeated one), beside the word ids
    and tags it gave then (tagger_format1.json). It loads and tags alike; saved again it is
    format 2 (pretrained_words.bin, the JSON list gone), and that loads and tags alike too."""
    import json

    from fastner.data.vocab import word_lookup
    from fastner.tagger import PRETRAINED_INDEX_FILE, PRETRAINED_WORDS_FILE

    with open(FORMAT_1 + ".json", encoding="utf-8") as handle:
        expected = json.load(handle)
    directory = tmp_path / "model"
    shutil.copytree(FORMAT_1, directory)
    with open(directory / PRETRAINED_WORDS_FILE, encoding="utf-8") as handle:
        words = json.load(handle)
    loaded = []
    for version in (1, 2):
        tagger = Tagger.load(str(directory))
        assert json.loads((directory / "config.json").read_text())["format_version"] == version
        lookup = word_lookup(tagger.words, tagger.pretrained_index)
        assert [[lookup(t) for t in s] for s in expected["sentences"]] == expected["ids"]
        assert tagger.tag(expected["sentences"]) == expected["tags"]
        assert tagger.pretrained_words == words
        loaded.append(tagger)
        tagger.save(str(directory))
        assert PRETRAINED_WORDS_FILE not in os.listdir(directory) and PRETRAINED_INDEX_FILE in os.listdir(directory)
    assert same_model(*loaded)


def test_a_damaged_word_index_is_refused_naming_it(tmp_path):
    from fastner.tagger import PRETRAINED_INDEX_FILE

    pretrained_tagger(rows=50, seed=1).save(str(tmp_path))
    path = tmp_path / PRETRAINED_INDEX_FILE
    path.write_bytes(b"X" + path.read_bytes()[1:])
    with pytest.raises(TaggerLoadError, match=f"{PRETRAINED_INDEX_FILE} differs from what manifest.json records"):
        Tagger.load(str(tmp_path))
    os.remove(tmp_path / storage.MANIFEST_FILE)  # read as it is: the index's own checks
    with pytest.raises(TaggerLoadError, match=f"{PRETRAINED_INDEX_FILE}: cannot read the pretrained words: not a "
                                              "fastner word index"):
        Tagger.load(str(tmp_path))
