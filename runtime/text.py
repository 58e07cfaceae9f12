"""Tokenizer (from the bundle's ``tokenizer.json`` via ``tokenizers``) and the token embedding table."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.errors import BundleError, InputError, require

# Control characters other than whitespace carry no meaning in a prompt and would reach the model as junk.
_CONTROL = {c for c in range(32) if chr(c) not in "\t\n\r"} | {127}


class TextTokenizer:
    def __init__(self, path: str | Path):
        tokenizers = require("tokenizers", "cpu")
        try:
            self._tk = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - tokenizers raises bare Exceptions
            raise BundleError(f"cannot read tokenizer {Path(path).name}: {e}") from None
        self._tk.no_padding()
        self._tk.no_truncation()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise InputError(f"prompt must be a string, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates (e.g. undecodable bytes kept by surrogateescape)
            raise InputError(f"prompt is not valid Unicode text: {e.reason} at character {e.start}") from None
        if any(ord(ch) in _CONTROL for ch in text):
            text = "".join(" " if ord(ch) in _CONTROL else ch for ch in text)
        return list(self._tk.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)


def load_embeddings(path: str | Path) -> np.ndarray:
    """The LLM's input embedding table [vocab, hidden], memory-mapped (no pickle is ever loaded)."""
    try:
        table = np.load(str(path), mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise BundleError(f"cannot read embedding table {Path(path).name}: {e}") from None
    if not isinstance(table, np.ndarray):  # an .npz archive
        raise BundleError(f"embedding table {Path(path).name} is not a single .npy array")
    if table.ndim != 2 or table.dtype.kind != "f":
        raise BundleError(f"embedding table {Path(path).name} must be a 2-D float array, got {table.dtype} "
                          f"of shape {table.shape}")
    return table
