"""Precision rows (group 'precision'): the recurrent layers at int8 and bf16 against torch's
int8 (quantize_dynamic) and bf16 (autocast) peers; the rows themselves live in rnn_rows.py
beside the fp32 ones they share their shapes and helpers with."""
from fastner.bench.rnn_rows import PRECISION_TITLE as TITLE  # noqa: F401
from fastner.bench.rnn_rows import run_precision as run  # noqa: F401
