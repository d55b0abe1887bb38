"""Drop-in modules: CRF (for torchcrf.CRF), LSTM/GRU/RNN (for torch.nn), convert(), quantize()."""
from fastner.nn.crf import *  # noqa: F401,F403
from fastner.nn.rnn import *  # noqa: F401,F403
from fastner.nn.convert import convert  # noqa: F401
from fastner.nn.quantize import quantize  # noqa: F401
