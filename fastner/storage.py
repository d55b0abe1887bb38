"""Writing files so that a kill at any moment loses nothing a user saved.

Single files: `atomic_write_bytes` (temp file in the same directory, fsync, os.replace).

Sets of files that only make sense together (a tagger's config.json, vocab.json and weights.pt,
with the training checkpoint beside them; an export's program.pt2 and export.json):
`write_file_set` stages the new files in a hidden sibling folder, fsyncs them, writes the staged
manifest (names, sizes, SHA-256) last, then moves the files into place and the manifest after
them. `open_file_set` (and `read_file_set`, its bytes) opens a complete set, checked against its
manifest: the new staged set when its manifest was written (the swap may have been cut short),
else the set in place. So a kill before the staged manifest exists leaves the old set; a kill
after it, the new one; never a mix. Saves into one directory wait for each other (flock).
A reader racing a save (its renames falling between the reader's reading of the manifest and its
opening of the files) finds a file that differs from the manifest it read while the manifest has
changed, and reads the new set instead; what it returns are the open files it checked (a large
file is memory-mapped from the very handle that was hashed), so a later save cannot swap one
under it. A directory written before manifests existed is read as it is.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import secrets
import shutil
from typing import BinaryIO, Callable, Dict, Iterable, Optional

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1


class StorageError(ValueError):
    """A file set that is incomplete, torn or altered; the message names the directory and file."""


class MissingFiles(StorageError):
    def __init__(self, directory: str, missing: Iterable[str]):
        self.missing = list(missing)
        super().__init__(f"{directory!r} lacks {', '.join(self.missing)}")


# ---- single files ----------------------------------------------------------------------------

def _fsync_directory(directory: str) -> None:
    try:  # make renames in `directory` durable
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _write_synced(path: str, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write `data` to `path` so that a reader sees the old file or the new one, never a torn one:
    a temp file in the same directory, fsync, then os.replace."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = _create_temp(directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def _create_temp(directory: str):
    """(fd, path) of a new empty file in `directory`, with the permissions a plain open() gives
    (0666 less the umask, applied by the kernel): mkstemp's are private (0600), and reading the
    umask means setting it, process-wide, which gave a file another thread created meanwhile
    mode 0666 whatever its umask."""
    for _ in range(100):
        path = os.path.join(directory, f".tmp-{secrets.token_hex(8)}")
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary file name in {directory}")


def json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


def torch_bytes(obj) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


class UnsafeTorchFile(ValueError):
    """Bytes the weights_only unpickler refuses; the message is its one-line reason."""


def weights_only_load(data: bytes):
    """torch.load of `data` with the weights_only unpickler, never a fallback to full pickle.

    Raises UnsafeTorchFile with the unpickler's own reason (a foreign global, a torn file) and
    without torch's advice around it: to retry with weights_only=False, or to allowlist the
    global, either of which would run the payload of a malicious file."""
    import torch

    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # whatever the safe unpickler refuses, a torn or foreign file
        raise UnsafeTorchFile(_unpickler_reason(str(err)) or type(err).__name__) from None


# the paragraphs of torch.load's weights_only message that advise rather than say what is wrong
_TORCH_ADVICE = ("Weights only load failed", "(1)", "(2)", "Check the documentation of torch.load",
                 "Please file an issue")


def _unpickler_reason(message: str) -> str:
    """The line of a torch.load error that says what the file holds: the text after
    "WeightsUnpickler error:" (or the line after it where that is empty, or a blocked module's
    own line), without the allowlisting advice."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for line in lines:
        if "WeightsUnpickler error:" in line:
            line = line.split("WeightsUnpickler error:", 1)[1].strip()
        elif line.startswith(_TORCH_ADVICE):
            continue
        if line:
            return line.split(" Please use `torch.serialization", 1)[0]
    return ""


def atomic_write_json(obj, path: str) -> None:
    atomic_write_bytes(path, json_bytes(obj))


def atomic_torch_save(obj, path: str) -> None:
    atomic_write_bytes(path, torch_bytes(obj))


# ---- sets of files ---------------------------------------------------------------------------

def _staging(directory: str, manifest: str) -> str:
    return os.path.join(directory, f".{manifest}.staging")


def _digest(data: bytes) -> Dict[str, object]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def _read_manifest(path: str) -> Optional[Dict[str, dict]]:
    """The files a manifest names, or None where there is no (complete) manifest."""
    return _read_stamped_manifest(path)[0]


def _read_stamped_manifest(path: str):
    """(the files a manifest names or None, the identity of the manifest file read: inode,
    modification time and size, new with every save even of the same content)."""
    try:
        with open(path, "rb") as handle:
            status = os.fstat(handle.fileno())
            content = json.loads(handle.read().decode("utf-8"))
    except FileNotFoundError:
        return None, None
    # ValueError: json's JSONDecodeError, and an integer of too many digits; RecursionError:
    # arrays nested too deep
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise StorageError(f"{path}: unreadable manifest ({err})") from None
    files = content.get("files") if isinstance(content, dict) else None
    if (not isinstance(files, dict) or content.get("format") != MANIFEST_FORMAT
            or not all(isinstance(entry, dict) for entry in files.values())):
        raise StorageError(f"{path}: not a fastner manifest (format {MANIFEST_FORMAT})")
    return files, (status.st_ino, status.st_mtime_ns, status.st_size)


def _finish_swap(directory: str, staging: str, manifest: str) -> None:
    """Move a complete staged set into place: the files first, the manifest last."""
    for name in os.listdir(staging):
        if name != manifest:
            os.replace(os.path.join(staging, name), os.path.join(directory, name))
    os.replace(os.path.join(staging, manifest), os.path.join(directory, manifest))
    _fsync_directory(directory)
    shutil.rmtree(staging, ignore_errors=True)


def _recover(directory: str, manifest: str) -> None:
    """Complete a swap a kill cut short (its staged manifest exists), or drop a staging folder
    whose manifest was never written (the set in place is still whole)."""
    staging = _staging(directory, manifest)
    if not os.path.isdir(staging):
        return
    if os.path.isfile(os.path.join(staging, manifest)):
        _finish_swap(directory, staging, manifest)
    else:
        shutil.rmtree(staging)


def write_file_set(directory: str, files: Dict[str, Optional[bytes]], manifest: str = MANIFEST_FILE) -> None:
    """Replace `files` (name -> content) in `directory` as one set; files the manifest already
    names and `files` does not keep their entries (e.g. the tagger beside a new checkpoint). A
    name mapped to None leaves the set (e.g. the pretrained table of a model saved before over
    one that has none): its file is removed once the new set is in place."""
    for name in files:  # before anything is written
        if os.path.basename(name) != name or name in (manifest, "", ".", ".."):
            raise ValueError(f"file set member must be a plain file name, got {name!r}")
    if os.path.exists(directory) and not os.path.isdir(directory):  # makedirs would say "File exists"
        raise NotADirectoryError(f"{directory!r} exists and is not a directory (a file set is saved into a directory)")
    os.makedirs(directory, exist_ok=True)
    with _one_writer(directory):
        _write_file_set(directory, files, manifest)


@contextlib.contextmanager
def _one_writer(directory: str):
    """One save at a time into `directory`, across threads and processes (flock on the folder
    itself: no lock file). Two at once shared the staging folder: one failed on mkdir (File
    exists), or its staged files were swept away by the other's recovery (No such file)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: saves are not serialised
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a file system without flock (some network mounts)
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


def _write_file_set(directory: str, files: Dict[str, Optional[bytes]], manifest: str) -> None:
    _recover(directory, manifest)
    entries = dict(_read_manifest(os.path.join(directory, manifest)) or {})
    entries = {name: entry for name, entry in entries.items()
               if os.path.isfile(os.path.join(directory, name)) and name not in files}
    staging = _staging(directory, manifest)
    os.mkdir(staging)
    for name, data in files.items():
        if data is not None:
            _write_synced(os.path.join(staging, name), data)
            entries[name] = _digest(data)
    # written last, and whole or not at all (a torn staged manifest would hide the complete set
    # in place, and the next save's recovery would move it into place): from here on the staged
    # set is complete and is the one read_file_set returns
    atomic_write_bytes(os.path.join(staging, manifest), json_bytes({"format": MANIFEST_FORMAT, "files": entries}))
    _finish_swap(directory, staging, manifest)
    for name, data in files.items():
        if data is None:  # no manifest names it now (a kill before this leaves a stray file, unread)
            try:
                os.remove(os.path.join(directory, name))
            except FileNotFoundError:
                pass


def _newest_set(directory: str, manifest: str):
    """(manifest entries or None for a set written before manifests, staged, stamp) of the
    newest complete set: the staged one when a swap was cut short (or is under way), else the one
    in place. `stamp` identifies the manifest file read, so that two snapshots compare equal only
    where no save came between them (a save of the same content makes a new file)."""
    staging = _staging(directory, manifest)
    if os.path.isdir(staging):
        staged, stamp = _read_stamped_manifest(os.path.join(staging, manifest))
        if staged is not None:
            return staged, True, stamp
    entries, stamp = _read_stamped_manifest(os.path.join(directory, manifest))
    return entries, False, stamp


class FileSet:
    """One complete set, open for reading and checked against its manifest: `data` (name ->
    bytes) of the files read whole, `handles` (name -> binary file at offset 0) of the scanned
    ones (a reader memory-maps them: the open file is the one checked, whatever a later save
    puts in its place). Close it (or use it in a `with`) to close the handles."""

    def __init__(self):
        self.data: Dict[str, bytes] = {}
        self.handles: Dict[str, BinaryIO] = {}
        self.errors: Dict[str, StorageError] = {}  # optional members that failed their check

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()

    def __enter__(self) -> "FileSet":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# how many times a reader starts again when a save replaces the set while it is read (each
# time a whole save must fall between the reader's reading of the manifest and of the files)
_READ_ATTEMPTS = 50
_BLOCK = 1 << 20


def open_file_set(directory: str, names: Iterable[str], optional: Iterable[str] = (),
                  manifest: str = MANIFEST_FILE, scan: Optional[Dict[str, Callable[[int, bytes], None]]] = None
                  ) -> FileSet:
    """`names` and those of `optional` that the set holds, all of one complete set (the newest:
    see _newest_set), each checked against its manifest entry (StorageError when one of `names`
    differs; MissingFiles when one is absent). An optional member that fails its check is left
    out, its error kept in `errors` for a caller that turns out to need it (a model that uses no
    pretrained table loads whatever became of an old one's file).

    A save may replace the files while they are read (its renames fall between this reader's
    opening of the manifest and of the files): the set read then fails its check, the manifest
    has changed, and the newer set is read instead; so a reader racing a save gets the old set
    or the new one, never a mix and never an error.

    scan: name -> function called with (offset, block) for each block of that file, in order,
    as it is checked (e.g. a value check fused with the hashing pass); offset 0 starts a
    pass over the file again. A scanned file is not kept in `data`, its handle is."""
    names, scan = list(names), dict(scan or {})
    optional = [name for name in optional if name not in names]
    for _ in range(_READ_ATTEMPTS):
        snapshot = _newest_set(directory, manifest)
        entries, staged, _ = snapshot
        try:
            files = _open_set(directory, names, optional, manifest, entries, staged, scan)
        except StorageError:  # MissingFiles too
            if _newest_set(directory, manifest) == snapshot:
                raise  # damaged, not replaced
            continue
        if not files.errors or _newest_set(directory, manifest) == snapshot:
            return files
        files.close()
    raise StorageError(f"{directory!r} was replaced by {_READ_ATTEMPTS} saves in a row while it was read")


def _open_set(directory: str, names, optional, manifest: str, entries, staged: bool, scan) -> FileSet:
    staging = _staging(directory, manifest)

    def open_member(name: str) -> Optional[BinaryIO]:
        # a staged file may be moved into place between a look and the open: try both
        for folder in ((staging, directory) if staged else (directory,)):
            try:
                return open(os.path.join(folder, name), "rb")
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                continue
        return None

    files = FileSet()
    try:
        missing = []
        for name in names + optional:
            handle = open_member(name) if entries is None or name in entries else None
            if handle is not None:
                files.handles[name] = handle  # closed with the set, whatever happens next
            elif name in names:
                missing.append(name)
            elif entries is not None and name in entries:
                files.errors[name] = MissingFiles(directory, [name])
        if missing:
            raise MissingFiles(directory, missing)
        for name, handle in list(files.handles.items()):
            entry = None if entries is None else entries[name]
            try:
                if name in scan:
                    _check_stream(handle, entry, scan[name], os.path.join(directory, name), manifest)
                    continue
                files.data[name] = _check(handle.read(), entry, os.path.join(directory, name), manifest)
            except StorageError as err:
                if name in names:
                    raise
                files.errors[name] = err
            del files.handles[name]
            handle.close()
    except BaseException:
        files.close()
        raise
    return files


def _differs(path: str, manifest: str) -> StorageError:
    return StorageError(f"{path} differs from what {manifest} records "
                        "(altered or partly overwritten after it was saved)")


def _check(data: bytes, entry: Optional[dict], path: str, manifest: str) -> bytes:
    if entry is not None and _digest(data) != {"sha256": entry.get("sha256"), "size": entry.get("size")}:
        raise _differs(path, manifest)
    return data


def _check_stream(handle: BinaryIO, entry: Optional[dict], scan, path: str, manifest: str) -> None:
    digest, offset = hashlib.sha256(), 0
    block = handle.read(_BLOCK)
    scan(0, block)  # even an empty file starts a pass
    while block:
        digest.update(block)
        offset += len(block)
        block = handle.read(_BLOCK)
        if block:
            scan(offset, block)
    if entry is not None and {"sha256": digest.hexdigest(), "size": offset} != {"sha256": entry.get("sha256"),
                                                                                 "size": entry.get("size")}:
        raise _differs(path, manifest)
    handle.seek(0)


def read_file_set(directory: str, names: Iterable[str], manifest: str = MANIFEST_FILE) -> Dict[str, bytes]:
    """The bytes of `names` from the newest complete set in `directory` (open_file_set)."""
    with open_file_set(directory, names, manifest=manifest) as files:
        return files.data
