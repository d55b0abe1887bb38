"""Character CNN word features: char embeddings -> conv over the word -> max-pool (Ma & Hovy)."""
from __future__ import annotations

import torch
from torch import nn

from fastner.models.dropout import Dropout


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
        words = chars[mask]  # [N, C]
        char_mask = words != self.pad_id  # [N, C]
        x = self.dropout(self.embedding(words)).transpose(1, 2)  # [N, char_dim, C]
        x = self.conv(x)  # [N, filters, C]
        x = x.masked_fill(~char_mask[:, None, :], float("-inf")).amax(dim=2)  # [N, filters]
        x = torch.where(torch.isfinite(x), x, torch.zeros_like(x))  # words without chars
        out = x.new_zeros(batch, time_len, self.filters)
        out[mask] = x
        return out
