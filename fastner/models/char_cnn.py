"""Character CNN word features: char embeddings -> conv over the word -> max-pool (Ma & Hovy)."""
from __future__ import annotations

import torch
from torch import nn

from fastner import ops
from fastner._extension import use_fused
from fastner.models.dropout import Dropout

# A traced graph's table bound (its batch size is symbolic there): 1,024 characters make a table
# of 1024*W*F*I multiply-adds (2.8M at the default 3 x 30 x 30, ~30 us a call); a larger alphabet
# keeps the convolution in exported programs.
TRACED_TABLE_ROWS = 1024


class CharCNN(nn.Module):
    def __init__(self, num_chars: int, char_dim: int = 30, filters: int = 30, window: int = 3,
                 dropout: float = 0.5, pad_id: int = 0):
        super().__init__()
        if window % 2 != 1:
            raise ValueError(f"char CNN window must be odd (the output keeps the word's length), got {window}")
        self.pad_id = pad_id
        self.filters = filters
        self.embedding = nn.Embedding(num_chars, char_dim, padding_idx=pad_id)
        self.dropout = Dropout(dropout)
        self.conv = nn.Conv1d(char_dim, filters, window, padding=window // 2)
        scale = (3.0 / char_dim) ** 0.5
        nn.init.uniform_(self.embedding.weight, -scale, scale)
        with torch.no_grad():
            self.embedding.weight[pad_id].zero_()

    def forward(self, chars: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """chars: [B, T, C] char ids; mask: [B, T] bool (real tokens) -> [B, T, filters].

        Only real tokens go through the CNN (batches are mostly padding); the max-pool ignores
        the padding chars of each word, and padding tokens get zeros.
        """
        batch, time_len, char_len = chars.shape
        if self._by_table(chars):
            # One op over every token: the embedding lookup, convolution and max-pool through a
            # [W, V, F] table (ops.char_embed_conv_max: why), padding tokens skipped.
            return ops.char_embed_conv_max(chars, mask.bool(), self.embedding.weight, self.conv.weight,
                                           self.conv.bias, self.pad_id)
        words = chars[mask]  # [N, C]
        x = self.dropout(self.embedding(words))  # [N, C, char_dim]
        # conv over each word's characters, max over its real ones (0 for a word without any):
        # one op (csrc/cpu/char_cnn.cpp) where conv1d + masked max + their backward were ~10.
        x, _ = ops.char_conv_max(x, words != self.pad_id, self.conv.weight, self.conv.bias)  # [N, filters]
        out = x.new_zeros(batch, time_len, self.filters)
        out[mask] = x
        return out

    def _by_table(self, chars: torch.Tensor) -> bool:
        """Whether forward runs ops.char_embed_conv_max: in inference (eval mode: no dropout on
        the embeddings; no gradient: the op has none), when the table's V rows cost at most what
        the convolution would: V <= the batch's character positions in eager mode (a one-word
        call to a model of thousands of characters keeps the convolution); under torch.compile /
        torch.export, where that size is symbolic, V <= TRACED_TABLE_ROWS and the fused op
        present (one graph node; the reference's data-dependent indexing stays out of traced
        graphs)."""
        if self.training or torch.is_grad_enabled():
            return False
        rows = self.embedding.num_embeddings
        if torch.compiler.is_compiling():
            return rows <= TRACED_TABLE_ROWS and use_fused("char_embed_conv_max", chars.device)
        return rows <= chars.numel()
