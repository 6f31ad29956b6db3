"""The CLIP BPE tokenizer every method and the evaluator share."""

from __future__ import annotations

from typing import Any

import numpy as np
import open_clip
import torch


class Tokenizer(open_clip.tokenizer.SimpleTokenizer):
    """open_clip's CLIP BPE tokenizer, giving the same ids in about half the time.

    Three shortcuts, each exact (a test compares with open_clip on random text):
    - the ids of a word (byte-level mapping, BPE merges, vocabulary lookup: a pure function of
      the word) are computed once per word instead of once per occurrence;
    - printable ASCII text without ``&`` skips ftfy and HTML unescaping, which leave such text
      unchanged (ftfy mends mojibake, control characters and Unicode forms; unescaping needs
      ``&``), and goes straight to whitespace folding and lower-casing;
    - the batch is filled through numpy instead of one small tensor per caption.
    Together: 10 instead of 35 us per built-in caption (2-core CPU).
    """

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        if self.reduction_fn is not None or self.clean_fn is not open_clip.tokenizer._clean_lower:
            raise ValueError("Tokenizer supports open_clip's default clean='lower', no reduction")
        self._word_ids: dict[str, list[int]] = {}

    def _clean(self, text: str) -> str:
        if text.isascii() and text.isprintable() and "&" not in text:
            return " ".join(text.split()).lower()
        return self.clean_fn(text)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for word in self.pat.findall(self._clean(text)):
            cached = self._word_ids.get(word)
            if cached is None:
                mapped = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
                cached = [self.encoder[piece] for piece in self.bpe(mapped).split(" ")]
                self._word_ids[word] = cached
            ids.extend(cached)
        return ids

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        """Ids padded with zeros to ``context_length``; a longer text is cut and ends in EOT."""
        texts = [texts] if isinstance(texts, str) else texts
        length = context_length or self.context_length
        out = np.zeros((len(texts), length), dtype=np.int64)
        for row, text in zip(out, texts, strict=True):
            ids = [self.sot_token_id, *self.encode(text)][: length - 1]
            ids.append(self.eot_token_id)
            row[: len(ids)] = ids
        return torch.from_numpy(out)
