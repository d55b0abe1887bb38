"""fastner.Tagger: a trained tagger saved in one directory, loaded back to tag text.

The directory holds config.json (model and data settings), vocab.json (word, char and tag
vocabularies) and weights.pt (the model's state_dict, read with torch.load(weights_only=True)).
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Dict, List, Optional, Sequence, Union

import torch

from fastner.data.conll import Sentence
from fastner.data.schemes import canonical_scheme, convert_tags
from fastner.data.vocab import Vocab
from fastner.models.tagger import ModelConfig, SequenceTagger

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.json"
WEIGHTS_FILE = "weights.pt"


class TaggerLoadError(ValueError):
    """A tagger directory that is missing, incomplete or written by an incompatible version."""


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write `data` to `path` so that a reader sees the old file or the new one, never a torn one:
    a temp file in the same directory, fsync, then os.replace."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        # mkstemp makes the file private (0600); give it the permissions a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def atomic_torch_save(obj, path: str) -> None:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def atomic_write_json(obj, path: str) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """The device to run on; None picks CUDA when available. A CUDA device without CUDA is an error."""
    if device is None:
        return default_device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but this torch has no CUDA device available")
    return resolved


class Tagger:
    """A trained model with its vocabularies.

    >>> tagger = fastner.Tagger.load("runs/conll")
    >>> tagger.predict("Apple hired Tim Cook in Cupertino.")["entities"]
    [{'start': 0, 'end': 5, 'label': 'ORG', 'text': 'Apple', 'score': 0.99}, ...]
    """

    def __init__(self, model: SequenceTagger, words: Vocab, chars: Vocab, tags: Vocab,
                 output_scheme: str = "IOB2", digits_to_zero: bool = False,
                 device: Union[str, torch.device, None] = None):
        self.model = model
        self.words, self.chars, self.tags = words, chars, tags
        self.output_scheme = canonical_scheme(output_scheme)
        self.digits_to_zero = digits_to_zero
        self.device = resolve_device(device)
        self.model.to(self.device).eval()

    # ---- persistence -----------------------------------------------------------------------

    def config_json(self) -> dict:
        import fastner

        return {
            "format_version": FORMAT_VERSION,
            "fastner_version": fastner.__version__,
            "model": self.model.config.to_json(),
            "output_scheme": self.output_scheme,
            "digits_to_zero": self.digits_to_zero,
        }

    def save(self, path: str, state_dict: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """Write the directory (each file atomically). `state_dict` overrides the live weights."""
        os.makedirs(path, exist_ok=True)
        atomic_write_json(self.config_json(), os.path.join(path, CONFIG_FILE))
        vocab = {"words": self.words.to_json(), "chars": self.chars.to_json(), "tags": self.tags.to_json()}
        atomic_write_json(vocab, os.path.join(path, VOCAB_FILE))
        weights = state_dict if state_dict is not None else self.model.state_dict()
        atomic_torch_save({k: v.detach().cpu() for k, v in weights.items()}, os.path.join(path, WEIGHTS_FILE))

    @classmethod
    def load(cls, path: str, device: Union[str, torch.device, None] = None) -> "Tagger":
        if not os.path.isdir(path):
            raise TaggerLoadError(f"no tagger directory at {path!r}")
        files = {name: os.path.join(path, name) for name in (CONFIG_FILE, VOCAB_FILE, WEIGHTS_FILE)}
        missing = [name for name, full in files.items() if not os.path.isfile(full)]
        if missing:
            raise TaggerLoadError(
                f"{path!r} is not a complete fastner tagger directory: missing {', '.join(missing)} "
                f"(expected {CONFIG_FILE}, {VOCAB_FILE} and {WEIGHTS_FILE}, as written by `fastner train`)"
            )
        try:
            with open(files[CONFIG_FILE], encoding="utf-8") as handle:
                config = json.load(handle)
            with open(files[VOCAB_FILE], encoding="utf-8") as handle:
                vocab = json.load(handle)
        except (OSError, json.JSONDecodeError) as err:
            raise TaggerLoadError(f"{path!r}: cannot read the config or vocabulary: {err}") from None
        version = config.get("format_version") if isinstance(config, dict) else None
        if version != FORMAT_VERSION:
            raise TaggerLoadError(
                f"{path!r} holds tagger format {version!r}; this fastner reads format {FORMAT_VERSION}"
            )
        try:
            model_config = ModelConfig.from_json(config["model"])
            words = Vocab.from_json(vocab["words"])
            chars = Vocab.from_json(vocab["chars"])
            tags = Vocab.from_json(vocab["tags"])
            if tags.itos != list(model_config.tags):
                raise ValueError("the tag vocabulary differs from the model's tags")
            if len(words) != model_config.num_words or len(chars) != model_config.num_chars:
                raise ValueError("the vocabulary sizes differ from the model's")
            model = SequenceTagger(model_config)
        except (KeyError, TypeError, ValueError) as err:
            raise TaggerLoadError(f"{path!r}: incompatible config or vocabulary: {err}") from None
        try:
            state = torch.load(files[WEIGHTS_FILE], map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except (RuntimeError, OSError, EOFError, ValueError) as err:
            raise TaggerLoadError(f"{path!r}: the weights do not fit the model in config.json: {err}") from None
        return cls(model, words, chars, tags, config.get("output_scheme", "IOB2"),
                   bool(config.get("digits_to_zero", False)), device)

    # ---- tagging ---------------------------------------------------------------------------

    def analyser(self) -> "Analyser":
        """The sentence analyser over this tagger's model (SequenceTagger.infer)."""
        from fastner.inference import Analyser

        self.model.eval()
        return Analyser(self.model.infer, self.words, self.chars, self.tags, self.digits_to_zero,
                        self.model.transition_scores(), self.device)

    def tag(self, sentences: Sequence[List[str]], batch_size: int = 64) -> List[List[str]]:
        """Tags only, in the output scheme (the scheme of the training file)."""
        analyses = self.analyser().analyse([list(s) for s in sentences], batch_size, scores=False)
        return [convert_tags(a.tags, self.output_scheme) for a in analyses]

    def predict(self, x, batch_size: int = 64, nbest: Optional[int] = None):
        """Tag raw documents or pre-tokenized sentences (see fastner.documents).

        predict("Apple rose 3% on Monday.") -> {"entities": [{"start", "end", "label", "text",
        "score"}], "sentences": [...]}, character offsets into the document and `score` the
        posterior probability of exactly that span under the model; a list of documents gives a
        list, an iterable (generator, file) a generator with bounded read-ahead; a list of token
        lists gives per sentence {"tokens", "tags", "spans"} as before. nbest=k adds the k best
        analyses of each sentence with their probabilities.
        """
        from fastner.documents import predict

        return predict(self.analyser(), x, self.output_scheme, batch_size, nbest)

    def evaluate(self, sentences: Sequence[Sentence], batch_size: int = 64) -> dict:
        """conlleval() of the predicted tags (output scheme) against the sentences' gold tags."""
        from fastner.metrics import conlleval

        pred = self.tag([s.tokens for s in sentences], batch_size)
        return conlleval([s.tags for s in sentences], pred)
