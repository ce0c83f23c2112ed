"""CLIP's text tokenizer: a Hugging Face `tokenizer.json` run by the `tokenizers` library.

    tokenizer = CLIPTokenizer.from_folder("clip-vit-large-patch14-336/")
    ids, mask = tokenizer(["a photo of a cat", "a dog"])   # (2, 77) int32 each
    tokens = tokenizer(texts); tokens.truncated             # indices of texts that were cut

Gives the ids of HF's `CLIPTokenizerFast(texts, padding="max_length", truncation=True,
max_length=context_length)`: BOS, the BPE tokens, EOS, then padding with the tokenizer's pad
token (CLIP's is `<|endoftext|>`, the EOS itself). Texts longer than the context length are
cut to keep BOS ... EOS (a warning says which); empty or whitespace-only texts raise.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from sam_jax.files import read_json

DEFAULT_CONTEXT_LENGTH = 77
DEFAULT_EOS = "<|endoftext|>"
DEFAULT_BOS = "<|startoftext|>"


@dataclasses.dataclass(frozen=True)
class TokenizedText:
    """A tokenized batch. Unpacks as `ids, mask = tokenizer(texts)`.

    input_ids (B, L) int32, attention_mask (B, L) int32 (1: token, 0: padding), and
    `truncated`: the indices of the texts that were longer than L and were cut.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    truncated: tuple[int, ...] = ()

    def __iter__(self) -> Iterator[np.ndarray]:
        yield self.input_ids
        yield self.attention_mask


def _read_optional_json(path: str) -> dict[str, Any]:
    """The object of a JSON file of a CLIP folder, {} where the folder has no such file."""
    return read_json(path) if os.path.exists(path) else {}


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class CLIPTokenizer:
    """Fixed-length CLIP tokenization with a `tokenizers.Tokenizer` (CLIP's BPE `tokenizer.json`)."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        pad_token: str | None = None,
        eos_token: str = DEFAULT_EOS,
    ):
        """`tokenizer`: a `tokenizers.Tokenizer` whose post-processor adds BOS and EOS;
        `pad_token`: the padding token (None: the EOS, as CLIP pads)."""
        if context_length < 3:
            raise ValueError(
                f"CLIPTokenizer: context_length must be at least 3 (BOS, a token, EOS); got {context_length}"
            )
        self.context_length = int(context_length)
        self.eos_id = tokenizer.token_to_id(eos_token)
        if self.eos_id is None:
            raise ValueError(f"CLIPTokenizer: the EOS token {eos_token!r} is not in the vocabulary")
        pad_token = pad_token or eos_token
        self.pad_id = tokenizer.token_to_id(pad_token)
        if self.pad_id is None:
            raise ValueError(f"CLIPTokenizer: the pad token {pad_token!r} is not in the vocabulary")
        self.pad_token = pad_token
        model = tokenizer.model
        # CLIP's BPE marks word ends with "</w>"; its decoder leaves them in (HF replaces them by spaces).
        self._end_of_word = getattr(model, "end_of_word_suffix", None) or None
        tokenizer = _copy(tokenizer)
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=self.context_length)  # room for BOS/EOS kept, right side cut
        tokenizer.enable_padding(length=self.context_length, pad_id=self.pad_id, pad_token=pad_token)
        self._tokenizer = tokenizer
        probe = tokenizer.encode("a")
        last = probe.ids[sum(probe.attention_mask) - 1]
        if last != self.eos_id:
            raise ValueError(f"CLIPTokenizer: the tokenizer's post-processor must end each text with EOS {eos_token!r}")

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, *, context_length: int | None = None) -> CLIPTokenizer:
        """Load `folder/tokenizer.json`. The context length is `context_length`, else the
        folder's config.json `text_config.max_position_embeddings`, else 77; the pad and EOS
        tokens come from tokenizer_config.json / special_tokens_map.json (pad: else the EOS)."""
        from tokenizers import Tokenizer

        folder = os.fspath(folder)
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"CLIPTokenizer.from_folder: no tokenizer.json in {folder}")
        tokenizer = Tokenizer.from_file(path)
        if context_length is None:
            text_config = _read_optional_json(os.path.join(folder, "config.json")).get("text_config") or {}
            context_length = int(text_config.get("max_position_embeddings") or DEFAULT_CONTEXT_LENGTH)
        special = {
            **_read_optional_json(os.path.join(folder, "special_tokens_map.json")),
            **_read_optional_json(os.path.join(folder, "tokenizer_config.json")),
        }
        eos = _token_content(special.get("eos_token")) or DEFAULT_EOS
        pad = _token_content(special.get("pad_token"))
        if pad is None and tokenizer.padding:  # tokenizer.json's own padding settings
            pad = tokenizer.padding.get("pad_token")
        return cls(tokenizer, context_length=context_length, pad_token=pad, eos_token=eos)

    def __call__(self, texts: str | Sequence[str]) -> TokenizedText:
        """texts (a string or B strings) -> `TokenizedText` (input_ids, attention_mask: (B, L) int32).

        Raises ValueError for an empty or whitespace-only text (naming its index); cuts texts
        longer than L (the EOS stays last) with a warning, and lists them in `.truncated`.
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            raise ValueError("CLIPTokenizer: no texts")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"CLIPTokenizer: texts[{i}] must be a string; got {type(text).__name__}")
            if not text.strip():
                raise ValueError(f"CLIPTokenizer: texts[{i}] is empty or whitespace-only")
        encodings = self._tokenizer.encode_batch(texts)
        ids = np.asarray([e.ids for e in encodings], np.int32)
        mask = np.asarray([e.attention_mask for e in encodings], np.int32)
        for i, e in enumerate(encodings):  # e.g. only control characters: nothing left but BOS/EOS
            if not any(a and not s for a, s in zip(e.attention_mask, e.special_tokens_mask)):
                raise ValueError(f"CLIPTokenizer: texts[{i}] has no tokens ({texts[i]!r})")
        truncated = tuple(i for i, e in enumerate(encodings) if e.overflowing)
        if truncated:
            warnings.warn(
                f"CLIPTokenizer: {len(truncated)} text(s) longer than the context length {self.context_length} "
                f"were truncated (indices {list(truncated)})",
                stacklevel=2,
            )
        return TokenizedText(ids, mask, truncated)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str | list[str]:
        """Token ids (L,) -> the text (up to the first EOS, special tokens dropped); (B, L) -> B texts.

        As HF's `decode(ids, skip_special_tokens=True)` of the unpadded ids: the text as the
        tokenizer normalized it (lowercased, whitespace collapsed), words separated by spaces.
        """
        ids = np.asarray(ids)
        if ids.ndim == 2:
            return [self.decode(row) for row in ids]
        if ids.ndim != 1:
            raise ValueError(f"CLIPTokenizer.decode: ids must be (L,) or (B, L); got shape {ids.shape}")
        ids = [int(i) for i in ids]
        if self.eos_id in ids[1:]:  # the text ends at its EOS: whatever the pad token, padding is dropped
            ids = ids[: ids.index(self.eos_id, 1)]
        text = self._tokenizer.decode(ids, skip_special_tokens=True)
        if self._end_of_word:
            text = text.replace(self._end_of_word, " ")
        return text.strip()

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)


def _copy(tokenizer: Any) -> Any:
    """An independent copy of a `tokenizers.Tokenizer` (its padding/truncation are changed here)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer.to_str())
