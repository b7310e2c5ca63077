"""CLIP's byte-level BPE, read from the model's own vocab.json and merges.txt (every layout has them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import CLIPTokenizer


@dataclass(frozen=True)
class Tokens:
    ids: np.ndarray  # (max_length,) int64, padded
    dropped: str  # the prompt's tail that did not fit, "" when all of it did


class Tokenizer:
    def __init__(self, folder: Path, pad_token: str | None = None) -> None:
        padding = {} if pad_token is None else {"pad_token": pad_token}
        self._clip = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True, **padding)
        self.max_length = min(int(self._clip.model_max_length), 77)

    def encode(self, text: str) -> Tokens:
        full = self._clip(text, truncation=False, return_offsets_mapping=True, verbose=False)
        ids = self._clip(text, padding="max_length", max_length=self.max_length, truncation=True).input_ids
        # The text encoder sees start + (max_length - 2) tokens + end; the text from there on is dropped.
        first_dropped = self.max_length - 1
        dropped = ""
        if len(full.input_ids) > self.max_length:
            dropped = text[full.offset_mapping[first_dropped][0] :]
        return Tokens(np.asarray(ids, dtype=np.int64), dropped)
