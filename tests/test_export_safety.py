"""fastner.export.load runs no code from the archive: tampered program.pt2 files are refused
with a clear error before torch.export.load (which would unpickle, sympify or exec them) sees
them, and the payload never runs."""
import io
import json
import os
import re
import shutil
import zipfile

import pytest
import torch

from fastner import export
from fastner.program_check import UnsafeProgramError

from test_export import tiny_tagger


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("safe") / "export"
    export.export_tagger(tiny_tagger(), str(out), max_length=12)
    return out


def _member(archive_path, suffix):
    with zipfile.ZipFile(archive_path) as archive:
        return next(name for name in archive.namelist() if name.endswith(suffix))


def tampered(export_dir, target, suffix, change):
    """A copy of export_dir whose program.pt2 member ending in `suffix` is change(bytes)."""
    os.makedirs(target, exist_ok=True)
    for name in (export.META_FILE, export.PRETRAINED_INDEX_FILE):
        shutil.copy(export_dir / name, target / name)
    source = export_dir / export.PROGRAM_FILE
    member = _member(source, suffix)
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target / export.PROGRAM_FILE, "w") as zout:
        for name in zin.namelist():
            data = zin.read(name)
            zout.writestr(name, change(data) if name == member else data)
    return target


class WritesAFile:
    path = None

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_untampered_archive_loads(export_dir):
    assert export.load(str(export_dir)).predict([["Anna", "visited", "Oslo"]])[0]["tokens"] == ["Anna", "visited", "Oslo"]


def test_pickle_payload_in_sample_inputs_is_refused_and_never_runs(export_dir, tmp_path):
    marker = tmp_path / "PAYLOAD_RAN"
    WritesAFile.path = str(marker)
    buffer = io.BytesIO()
    torch.save(WritesAFile(), buffer)
    bad = tampered(export_dir, tmp_path / "bad", "sample_inputs/model.pt", lambda _: buffer.getvalue())
    with pytest.raises(UnsafeProgramError, match=r"sample inputs are not plain tensors.*io\.open"):
        export.load(str(bad))
    assert not marker.exists()


def test_code_in_a_guard_is_refused_and_never_runs(export_dir, tmp_path):
    marker = tmp_path / "GUARD_RAN"

    def change(data):
        program = json.loads(data)
        program["guards_code"].append(f"open({str(marker)!r}, 'w') is not None")
        return json.dumps(program).encode()

    bad = tampered(export_dir, tmp_path / "bad", "models/model.json", change)
    with pytest.raises(UnsafeProgramError, match="guard .* is not a comparison of input sizes"):
        export.load(str(bad))
    assert not marker.exists()


def test_code_in_a_shape_expression_is_refused_and_never_runs(export_dir, tmp_path):
    marker = tmp_path / "SYMPY_RAN"
    payload = f"Mul(Integer(1), Symbol(str(open({str(marker)!r}, 'w'))))"

    def change(data):
        text = data.decode()
        first = text.index('"expr_str": "') + len('"expr_str": "')
        end = text.index('"', first)
        return (text[:first] + payload.replace('"', '\\"') + text[end:]).encode()

    bad = tampered(export_dir, tmp_path / "bad", "models/model.json", change)
    with pytest.raises(UnsafeProgramError, match="shape expression"):
        export.load(str(bad))
    assert not marker.exists()


def test_pickled_weight_and_foreign_members_are_refused(export_dir, tmp_path):
    def pickled(data):
        config = json.loads(data)
        next(iter(config["config"].values()))["use_pickle"] = True
        return json.dumps(config).encode()

    bad = tampered(export_dir, tmp_path / "pickled", "model_weights_config.json", pickled)
    with pytest.raises(UnsafeProgramError, match="stored as a pickle"):
        export.load(str(bad))

    extra = tmp_path / "extra"
    shutil.copytree(export_dir, extra)
    (extra / export.MANIFEST_FILE).unlink()  # a hand-made directory: no manifest to compare with
    with zipfile.ZipFile(extra / export.PROGRAM_FILE, "a") as archive:
        root = archive.namelist()[0].split("/")[0]
        archive.writestr(f"{root}/data/constants/custom_obj_0", b"anything")
    with pytest.raises(UnsafeProgramError, match="unexpected member 'data/constants/custom_obj_0'"):
        export.load(str(extra))


def test_graph_calling_outside_aten_and_fastner_is_refused(export_dir, tmp_path):
    def change(data):
        text = data.decode()
        target = re.search(r'"torch\.ops\.aten\.[a-z_0-9]+\.[a-z_0-9]+"', text).group(0)  # the graph's first aten call
        return text.replace(target, '"torch.save"', 1).encode()

    bad = tampered(export_dir, tmp_path / "bad", "models/model.json", change)
    with pytest.raises(UnsafeProgramError, match="calls 'torch.save'"):
        export.load(str(bad))


def test_garbage_archive_gives_a_clear_error(export_dir, tmp_path):
    bad = tmp_path / "garbage"
    shutil.copytree(export_dir, bad)
    (bad / export.PROGRAM_FILE).write_bytes(b"not a zip at all")
    with pytest.raises(ValueError, match="program.pt2 differs from what export-manifest.json records"):
        export.load(str(bad))
    (bad / export.MANIFEST_FILE).unlink()
    with pytest.raises(UnsafeProgramError, match="not a torch.export archive"):
        export.load(str(bad))


def test_corrupt_weights_give_the_cause_and_no_logged_traceback(export_dir, tmp_path, capfd):
    # it was: torch.export.load logged a 30-line traceback on stderr as a warning, and the
    # error said only "We ran into an error ... check the warnings above"
    bad = tampered(export_dir, tmp_path / "short", "weights/weight_0", lambda data: data[:4])
    with pytest.raises(ValueError, match=r"not a loadable torch.export program \(RuntimeError: setStorage: .* out of bounds"):
        export.load(str(bad))
    assert "Traceback" not in capfd.readouterr().err
