"""The `fastner` command: train, evaluate, tag, convert, export, demo, serve, info, bench.

User mistakes (a missing file, a malformed line, an incompatible model directory) print one
`fastner: error: ...` line and exit with status 2; no traceback. The commands are here; their
options and argument types are in fastner.cli_parser.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Optional, Sequence

from fastner.cli_parser import EXIT_USAGE, build_parser


class UsageError(Exception):
    """A mistake in what the user asked for; printed without a traceback."""


def _user_errors():
    from fastner.data.textfiles import DataFormatError
    from fastner.embeddings import EmbeddingsError
    from fastner.tagger import TaggerLoadError

    # FloatingPointError: training diverged (the message says to lower --lr)
    return (UsageError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
            DataFormatError, EmbeddingsError, TaggerLoadError, FloatingPointError, ValueError)


def _allocation_failure(err: BaseException) -> Optional[str]:
    """What a failed allocation asked for, or None when `err` is something else. Sizes the user
    chose cause it (`train --hidden 99999999999` asked for 193,715 GiB): a usage error, not a crash.
    torch raises a plain RuntimeError for the CPU allocator, OutOfMemoryError for CUDA's."""
    import re

    import torch

    text = str(err)
    if not (isinstance(err, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in text):
        return None
    asked = re.search(r"tried to allocate (\d+) bytes", text)
    return f"{int(asked.group(1)) / 2**30:,.1f} GiB at once" if asked else (text.splitlines() or ["?"])[0][:200]


def _set_threads(threads: Optional[int]) -> None:
    """--threads N, else OMP_NUM_THREADS when set, else 1.

    One thread by default: a tagger's ops are small (batches of 10 sentences), so a second
    thread gains little, and on a machine whose cores are busy every parallel region waits for
    a descheduled thread: measured 100x slower training with 2 threads on a loaded 2-core host.
    """
    import torch

    threads = threads if threads is not None else default_threads()
    if threads is not None:
        torch.set_num_threads(threads)


def default_threads() -> Optional[int]:
    """The torch threads of a command without --threads: None where OMP_NUM_THREADS is set (torch
    has read it), else 1 (see _set_threads)."""
    return None if os.environ.get("OMP_NUM_THREADS") else 1


# (flag, attribute, the format it reads, its default): the format options of train, evaluate, convert
_FORMAT_OPTIONS = (("--word-column", "word_column", "CoNLL", 0), ("--tag-column", "tag_column", "CoNLL", -1),
                   ("--misaligned", "misaligned", "JSONL", "reject"))


def _check_format_options(args, paths: Sequence[str]) -> None:
    """A format option given where no input file is of its format would be silently ignored
    (`--word-column 2` on a JSONL file): a usage error naming the option and the files."""
    from fastner.data.jsonl import is_jsonl

    formats = {"JSONL" if os.path.isfile(path) and is_jsonl(path) else "CoNLL" for path in paths}
    for flag, name, kind, _ in _FORMAT_OPTIONS:
        if getattr(args, name) is not None and kind not in formats:
            files = ", ".join(paths)
            raise UsageError(f"{flag} applies to {kind} files only, and {files} {'is' if len(paths) == 1 else 'are'} "
                             f"{formats.pop()}")


def _read(path: str, args, max_sentences: Optional[int] = None):
    """A CoNLL file or a JSONL file of character-offset spans (fastner.data.jsonl.is_jsonl)."""
    from fastner.data.jsonl import read_data

    options = {name: default if getattr(args, name) is None else getattr(args, name)
               for _, name, _, default in _FORMAT_OPTIONS}
    sentences = read_data(path, max_sentences=max_sentences, entity_tags=True, **options)
    if not sentences:
        raise UsageError(f"{path}: no sentences found")
    return sentences


# ---- train ---------------------------------------------------------------------------------

# flag -> TrainConfig field; flags left out keep the --config file's value, else the default
_RECIPE_FLAGS = ("epochs", "batch_size", "optimizer", "lr", "momentum", "lr_decay", "clip", "patience", "seed",
                 "scheme", "embeddings", "word_dim", "digits_to_zero", "device")
_MODEL_FLAGS = ("encoder", "head", "hidden", "layers", "dropout", "use_chars")


def train_config(args):
    """The recipe: TrainConfig's defaults (with --resume: the saved run's settings), then the
    --config file, then the flags given. A resumed run refuses flags that contradict it."""
    from fastner.train import TrainConfig, read_config, saved_settings

    base = {}
    if args.resume and args.out is not None:
        base = dict(saved_settings(args.out) or {})
    if args.config:
        recipe = read_config(args.config)
        try:  # the file alone first: its mistakes name it, a flag's do not
            TrainConfig.from_json(recipe)
        except (TypeError, ValueError) as err:
            raise UsageError(f"{args.config}: {err}") from None
        base.update(recipe)
    flags = {name: getattr(args, name) for name in _RECIPE_FLAGS if getattr(args, name) is not None}
    model = {name: getattr(args, name) for name in _MODEL_FLAGS if getattr(args, name) is not None}
    if "lr" in base and "lr" not in flags and "optimizer" in flags and flags["optimizer"] != base.get("optimizer", "sgd"):
        flags["lr"] = None  # a new optimizer takes its own default learning rate, not the file's
    try:
        return TrainConfig.from_json(base, model=model, **flags)
    except (TypeError, ValueError) as err:
        raise UsageError(str(err)) from None


def cmd_train(args) -> int:
    from fastner.train import train

    if args.resume and args.overwrite:
        raise UsageError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    if args.out is not None and os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} exists and is not a directory")
    config = train_config(args)
    if args.print_config:
        print(json.dumps(config.to_json(), indent=1))
        return 0
    for flag in ("train", "dev", "out"):
        if getattr(args, flag) is None:
            raise UsageError(f"train: --{flag} is required")
    _check_format_options(args, [path for path in (args.train, args.dev, args.test) if path])
    from fastner.devices import resolve_device

    resolve_device(config.device)  # before the data is read: `--device foo` came after reading eng.train
    _set_threads(args.threads)
    train_data = _read(args.train, args, args.max_sentences)
    dev_data = _read(args.dev, args, args.max_sentences)
    test_data = _read(args.test, args, args.max_sentences) if args.test else None
    from fastner.distributed import is_main_process

    main_process = is_main_process()  # under torchrun only rank 0 reports
    if main_process:
        print(f"train: {len(train_data)} sentences from {args.train}; dev: {len(dev_data)} from {args.dev}", file=sys.stderr)
    created = not os.path.exists(args.out)
    try:
        summary = train(train_data, dev_data, args.out, config, test_data=test_data, resume=args.resume,
                        overwrite=args.overwrite)
    except BaseException:
        # a run that failed before saving anything (--resume with no checkpoint, a missing
        # --embeddings file, a model too big) leaves no empty --out folder behind
        try:
            if created and not os.listdir(args.out):
                os.rmdir(args.out)
        except OSError:
            pass
        raise
    result = {"out": args.out, "best_epoch": summary["best_epoch"], "best_dev_f1": round(summary["best_dev_f1"], 2)}
    if "test" in summary:
        result["test_f1"] = round(summary["test"]["f1"], 2)
    if main_process:
        print(json.dumps(result))
    return 0


def _load_tagger(args):
    """The tagger of `args.model` on --device in --precision; a precision the device or this
    build cannot run is a usage error."""
    from fastner.tagger import Tagger

    try:
        return Tagger.load(args.model, device=args.device, precision=args.precision)
    except ValueError as err:
        if str(err).startswith("precision"):
            raise UsageError(f"--{err}") from None
        raise


# ---- evaluate ------------------------------------------------------------------------------

def cmd_evaluate(args) -> int:
    from fastner.metrics import conlleval, format_conlleval
    from fastner.tag_io import check_output, conll_token, output_file

    _check_format_options(args, [args.file])
    _set_threads(args.threads)
    if args.output:
        check_output(args.output, "--output")  # before the model loads
    tagger = _load_tagger(args)
    sentences = _read(args.file, args)
    pred = tagger.tag_like_gold(sentences, batch_size=args.batch_size)  # JSONL gold is IOB2, a CoNLL file any scheme
    if args.output:
        with output_file(args.output, "--output") as out:
            for sentence, tags in zip(sentences, pred):
                # one column a token, as conlleval reads the file (a JSONL token may hold a space)
                out.writelines(f"{conll_token(token)} {gold} {guess}\n"
                               for token, gold, guess in zip(sentence.tokens, sentence.tags, tags))
                out.write("\n")
    print(format_conlleval(conlleval([s.tags for s in sentences], pred)))
    return 0


# ---- tag -----------------------------------------------------------------------------------

def cmd_tag(args) -> int:
    from fastner.tag_io import STDIN, Writer, check_output, output_file, read_items, tag_stream

    if args.inputs.count(STDIN) > 1:  # the second read found stdin spent: an extra, empty document
        raise UsageError("tag: stdin (-) given more than once")
    if args.out not in (None, STDIN):
        check_output(args.out)  # before the model loads
    if args.word_column is not None and args.input != "conll":
        # it was ignored: text and JSONL documents have no columns, tokens lines one token a column
        raise UsageError(f"--word-column applies to --input conll only, got --input {args.input}")
    if args.nbest is not None and args.output not in ("json", "jsonl"):
        # conll and spans lines have no place for alternatives: they would be dropped unsaid
        raise UsageError(f"--nbest needs --output json or jsonl, got --output {args.output}")
    _set_threads(args.threads)
    tagger = _load_tagger(args)
    items = read_items(args.inputs, args.input, word_column=args.word_column or 0)
    progress = args.progress if args.progress is not None else sys.stderr.isatty()
    with output_file(args.out) as out:
        tag_stream(tagger, items, Writer(out, args.output), args.batch_size, args.nbest, progress)
    return 0


# ---- convert -------------------------------------------------------------------------------

def cmd_convert(args) -> int:
    from fastner.data.conll import write_conll
    from fastner.data.jsonl import is_jsonl, jsonl_records
    from fastner.tag_io import output_file

    _check_format_options(args, [args.source])
    to_jsonl = args.to == "jsonl" if args.to else not is_jsonl(args.source)
    if args.to is None and args.out.lower().endswith((".jsonl", ".json", ".ndjson")) != to_jsonl:
        raise UsageError(f"cannot tell the output format from {args.out}; pass --to conll or --to jsonl")
    sentences = _read(args.source, args)
    with output_file(args.out) as out:
        if to_jsonl:
            for record in jsonl_records(sentences):
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            write_conll(out, sentences)
    print(json.dumps({"in": args.source, "out": args.out, "sentences": len(sentences),
                      "format": "jsonl" if to_jsonl else "conll"}), file=sys.stderr)
    return 0


# ---- demo ----------------------------------------------------------------------------------

DEMO_ARTICLES = [
    "Shares of Kestrel Pharma jumped 4.2% in Frankfurt on Tuesday after Ingrid Lindqvist raised the outlook. "
    "Altamira Holdings agreed to buy Crescent Logistics for $3.2 billion, chief executive Omar Haddad said.",
    "The European Central Bank will decide on 12 June 2025 whether to lend 40 billion euros to Norway.",
]


def cmd_demo(args) -> int:
    import tempfile

    from fastner.data.jsonl import sentences_from_text
    from fastner.demo import generate_article_corpus
    from fastner.metrics import format_conlleval
    from fastner.tagger import Tagger
    from fastner.train import TrainConfig, train

    _set_threads(args.threads)
    if args.out and os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} exists and is not a directory")  # was a FileExistsError traceback
    if args.out and os.path.isdir(args.out) and os.listdir(args.out):
        raise UsageError(f"--out {args.out} already holds a saved run or other files; choose another --out "
                         "(the demo never overwrites)")
    started = time.perf_counter()
    # raw articles with character-offset gold spans, tokenized like any JSONL training file
    train_articles, held_articles = generate_article_corpus(max(1, args.sentences // 3),
                                                            max(1, args.sentences // 12), seed=args.seed)

    def sentences(articles, name):
        return [s for number, (text, spans) in enumerate(articles)
                for s in sentences_from_text(text, spans, f"{name} article {number}")]

    train_data, held_out = sentences(train_articles, "training"), sentences(held_articles, "held-out")
    dev_size = max(1, len(train_data) // 10)
    dev_data, train_data = train_data[:dev_size], train_data[dev_size:]
    print(f"demo: generated {len(train_articles) + len(held_articles)} raw financial-news articles: "
          f"{len(train_data)} training, {len(dev_data)} dev and {len(held_out)} held-out sentences "
          "(PER, ORG, LOC, DATE, MONEY)", file=sys.stderr)
    config = TrainConfig(epochs=args.epochs, batch_size=16, optimizer="adam", lr=0.01, seed=args.seed,
                         word_dim=50, patience=args.epochs,
                         model={"hidden": 64, "encoder": args.encoder, "head": "crf", "dropout": 0.3})
    with tempfile.TemporaryDirectory(prefix="fastner-demo-") as scratch:
        out_dir = args.out or scratch
        train(train_data, dev_data, out_dir, config)
        tagger = Tagger.load(out_dir, device="cpu")
        result = tagger.evaluate(held_out)
        print(f"\nheld-out ({len(held_out)} sentences, names partly unseen in training):")
        print(format_conlleval(result))
        for article, prediction in zip(DEMO_ARTICLES, tagger.predict(DEMO_ARTICLES)):
            print(f"\n{article}")
            for entity in prediction["entities"]:
                print(f"    [{entity['start']:>3d}, {entity['end']:>3d})  {entity['label']:<6s} "
                      f"{entity['text']:<32s} p={entity['score']:.3f}")
    print(f"\ndemo finished in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


# ---- export --------------------------------------------------------------------------------

def cmd_export(args) -> int:
    from fastner.export import export_tagger

    _set_threads(args.threads)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"{args.out} exists and is not a directory")
    tagger = _load_tagger(args)
    meta = export_tagger(tagger, args.out, max_length=args.max_length)
    print(json.dumps({"out": args.out, "fixed_length": meta["fixed_length"], "fastner_ops": meta["fastner_ops"]}))
    return 0


# ---- serve ---------------------------------------------------------------------------------

def cmd_serve(args) -> int:
    from fastner.serve.server import run

    try:
        return run(args)
    except ImportError as err:
        raise UsageError(str(err)) from None


# ---- info ----------------------------------------------------------------------------------

def cmd_info(args) -> int:
    import platform

    import numpy
    import torch

    import fastner
    from fastner.embeddings import glove_available

    info = {
        "fastner": fastner.__version__,
        "backend": fastner.backend(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        # what tag, train, evaluate ... run on without --threads (torch's own default, which the
        # Python API keeps, is torch_threads: reporting only that misled)
        "threads": default_threads() or torch.get_num_threads(),
        "torch_threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "glove": "installed" if glove_available() else "missing (pip install fastner[glove])",
    }
    if args.json:
        print(json.dumps(info))
    else:
        for key, value in info.items():
            print(f"{key:>16s}: {value}")
    return 0


# what `fastner COMMAND` runs (`bench` goes to fastner.bench before the parser)
COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "tag": cmd_tag, "convert": cmd_convert, "export": cmd_export,
            "demo": cmd_demo, "serve": cmd_serve, "info": cmd_info}


def main(argv: Optional[Sequence[str]] = None) -> int:
    from fastner import _extension

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        _extension.forced_reference()  # a bad FASTNER_BACKEND value: said up front, before any import uses it
    except ValueError as err:
        print(f"fastner: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    if argv[:1] == ["bench"]:
        from fastner.bench import main as bench_main

        return bench_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["demo"] + argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("fastner: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `fastner tag ... | head`: the reader left; not an error of ours
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except _user_errors() as err:
        print(f"fastner: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (MemoryError, RuntimeError) as err:
        asked = _allocation_failure(err)
        if asked is None:
            raise
        print(f"fastner: error: not enough memory ({asked}); choose smaller sizes (--hidden, --word-dim, --layers, "
              "--batch-size)", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
