"""What Tagger.predict and the exported runtime share: reading a batch of sentences and turning
predicted tags into the result records. Light on imports, so the exported runtime stays free of
the model and training code."""
from __future__ import annotations

from typing import List, Sequence

from fastner.data.schemes import convert_tags, tags_to_spans


def check_batch_size(batch_size) -> int:
    """batch_size as an int >= 1, else ValueError (a bool, float or negative count is a mistake)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    return batch_size


def token_lists(batch) -> List[List[str]]:
    """A list of token lists or whitespace-tokenised strings -> a list of token lists."""
    if isinstance(batch, str):
        raise TypeError("predict() takes a list of sentences; wrap a single string in a list")
    sentences = []
    for number, item in enumerate(batch):
        if isinstance(item, str):
            sentences.append(item.split())
        elif isinstance(item, (list, tuple)) and all(isinstance(t, str) for t in item):
            sentences.append(list(item))
        else:
            raise TypeError(f"sentence {number}: expected a string or a list of token strings, got {type(item).__name__}")
    return sentences


def prediction(tokens: List[str], model_tags: List[str], confidence: Sequence[float], output_scheme: str) -> dict:
    """{'tokens', 'tags' (output scheme), 'spans'}; a span's confidence is the smallest
    confidence of its tokens' predicted tags."""
    spans = [
        {
            "start": start,
            "end": end,
            "type": kind,
            "text": " ".join(tokens[start:end]),
            "confidence": round(float(min(confidence[start:end])), 6),
        }
        for start, end, kind in tags_to_spans(model_tags)
    ]
    return {"tokens": tokens, "tags": convert_tags(model_tags, output_scheme), "spans": spans}
