"""The model in a child process of its own: what `fastner serve` runs by default.

Why: in one process the event loop (HTTP parsing, validation, JSON answers) and the model
worker (tokenizing, the model, the Analyser's spans: mostly Python) share one GIL, so the server
used about one core whatever the machine had: `py-spy record --gil` under load at 32 clients
put the model thread at ~70% of the GIL-held time and the event loop at ~30%, and batched
serving reached 57-71% of the direct model call's documents/s. In a child process the model
holds a GIL of its own; the server's batcher thread only sends each batch's texts down a pipe
and waits (the wait releases the GIL), so the loop answers HTTP on another core meanwhile.

The child loads the tagger itself (the server process never holds the model), sets its torch
threads, ignores SIGINT and SIGTERM (the server owns shutdown: it answers what is in flight,
then closes the pipe, and the child exits on the closed pipe, so a Ctrl-C in a terminal, sent
to the whole process group, cannot kill the model under in-flight requests), and exits when
the pipe closes, so a server killed outright leaves no model process behind. A child that dies
(a crash, the kernel's OOM killer) fails the batch it was running (its requests get 500) and
is started again before the next batch.
"""
from __future__ import annotations

import logging
import multiprocessing
import pickle
import signal
import threading
from typing import Callable, List, Optional, Sequence

log = logging.getLogger("fastner.serve")
START_TIMEOUT_S = 300.0  # loading a model with a 400k-word vocabulary takes seconds; a hung child is a failure


class ModelProcessError(RuntimeError):
    """The model process failed to start, or exited while it held a batch."""


def _child(connection, model: str, device: str, precision: str, threads: int) -> None:
    """The child's whole life: load, report, then answer batches until the pipe closes. Its
    environment is the server's (ONEDNN_PRIMITIVE_CACHE_CAPACITY: fastner.serve.server)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        import gc

        import torch

        from fastner.serve.model import describe, load_tagger, predict_documents

        torch.set_num_threads(threads)
        tagger = load_tagger(model, device, precision)
        info = describe(tagger)
        gc.collect()
        gc.freeze()  # what is loaded lives as long as the process (fastner.serve.app says why)
    except BaseException as err:  # noqa: BLE001 - the server reports why its model did not load
        connection.send(("error", _portable(err)))
        return
    connection.send(("ready", info))
    while True:
        try:
            texts, nbest = connection.recv()
        except (EOFError, OSError):  # the server closed the pipe, or is gone
            return
        try:
            answer = ("ok", predict_documents(tagger, texts, nbest))
        except Exception as err:  # noqa: BLE001 - the batch's requests hear about it
            answer = ("error", f"{type(err).__name__}: {err}")
        connection.send(answer)


def _portable(err: BaseException) -> BaseException:
    """`err` if it survives pickling unchanged in kind and words (TaggerLoadError, OSError ...:
    the server raises it as an in-process load would, so `fastner serve` says what `fastner tag`
    says), else a ModelProcessError with its type and message."""
    try:
        copy = pickle.loads(pickle.dumps(err))
        if type(copy) is type(err) and str(copy) == str(err):
            return err
    except Exception:  # noqa: BLE001 - not picklable: its words travel instead
        pass
    return ModelProcessError(f"{type(err).__name__}: {err}")


class ModelProcess:
    """`process(texts, nbest)` -> fastner.serve.model.predict_documents(tagger, texts, nbest), run
    by a child process that loaded MODEL (`start()` first). One caller at a time: the batcher's
    worker thread."""

    # what the child runs: (connection, model, device, precision, threads)
    child_main = staticmethod(_child)

    def __init__(self, model: str, device: str = "cpu", precision: str = "fp32", threads: int = 1):
        self.model, self.device, self.precision, self.threads = model, device, precision, threads
        self.info: dict = {}  # fastner.serve.model.describe(tagger), from the child
        self.starts = 0  # children started so far: 1 unless one died
        self._context = multiprocessing.get_context("spawn")  # no fork of a process holding threads
        self._process = None
        self._connection = None
        self._lock = threading.Lock()

    @property
    def pid(self) -> Optional[int]:
        return None if self._process is None else self._process.pid

    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    def start(self) -> "ModelProcess":
        """Start the child and wait until its model is loaded. A model that does not load raises
        what Tagger.load raised in the child; a child that exits or hangs while loading,
        ModelProcessError."""
        with self._lock:
            self._start()
        return self

    def _start(self) -> None:
        parent, child = self._context.Pipe()
        process = self._context.Process(target=self.child_main, name="fastner-model", daemon=True,
                                        args=(child, self.model, self.device, self.precision, self.threads))
        process.start()
        child.close()  # the child's end lives in the child only: its exit closes the pipe
        try:
            if not parent.poll(START_TIMEOUT_S):
                raise ModelProcessError(f"the model process did not load {self.model!r} within {START_TIMEOUT_S:.0f} s")
            kind, payload = parent.recv()
        except (EOFError, OSError):
            process.join(5)
            raise ModelProcessError(f"the model process exited while loading {self.model!r} "
                                    f"(exit status {process.exitcode})") from None
        except ModelProcessError:
            process.kill()
            process.join()
            raise
        if kind != "ready":  # payload: why the tagger did not load, as Tagger.load raised it
            process.join(5)
            raise payload
        self.info, self._process, self._connection = payload, process, parent
        self.starts += 1

    def __call__(self, texts: Sequence[str], nbest: int = 1) -> List[dict]:
        return self.start_batch(texts, nbest)()

    def start_batch(self, texts: Sequence[str], nbest: int = 1) -> Callable[[], List[dict]]:
        """Send a batch to the child and return the call that waits for its results (one per
        text, in order), so that the caller can do other work while the child runs it: the
        batcher posts the previous batch's answers meanwhile (fastner.serve.batcher). One batch
        at a time: the pipe is held from here until that call returns (call it exactly once)."""
        self._lock.acquire()
        try:
            if not self.alive():
                self._discard(grace=0.0)
                log.warning("fastner serve: starting the model process again")
                self._start()
        except BaseException:
            self._lock.release()
            raise
        try:
            self._connection.send((list(texts), nbest))
        except (EOFError, OSError):  # the child is gone (BrokenPipeError is an OSError)
            self._lost()
        except BaseException:
            self._lock.release()
            raise
        return self._results

    def _results(self) -> List[dict]:
        try:
            kind, payload = self._connection.recv()  # blocks in C, the GIL released
        except (EOFError, OSError):
            self._lost()
        else:
            self._lock.release()
        if kind != "ok":
            raise ModelProcessError(payload)
        return payload

    def _lost(self) -> None:
        """The child died with a batch (the lock is held; released here): raise for that batch."""
        try:
            self._process.join(5)
            code = self._process.exitcode
            self._discard(grace=0.0)
        finally:
            self._lock.release()
        raise ModelProcessError(f"the model process exited during this batch (exit status {code}); "
                                "it is started again for the next") from None

    def _discard(self, grace: float) -> None:
        """Close the pipe (a live child exits when it sees that), give the child `grace` seconds,
        then kill it if it is still there (the lock is held)."""
        if self._process is None:
            return
        self._connection.close()
        self._process.join(grace)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._process = self._connection = None

    def stop(self, timeout: float = 30.0) -> None:
        """Close the pipe and wait up to `timeout` seconds for the child to exit; kill it if it
        does not. A second stop does nothing."""
        with self._lock:
            self._discard(grace=timeout)
