"""Tokenizer (from the bundle's ``tokenizer.json`` via ``tokenizers``) and the token embedding table."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.bundle_files import BundleFiles, printable
from runtime.errors import BundleError, InputError, require

MAX_TOKENIZER_BYTES = 64 << 20  # published tokenizer.json files are 2-20 MB

# Control characters other than whitespace carry no meaning in a prompt and would reach the model as junk.
_CONTROL = {c for c in range(32) if chr(c) not in "\t\n\r"} | {127}


class TextTokenizer:
    """``tokenizers`` over a bundle's ``tokenizer.json``. ``source``: a path, or the file's bytes as already
    read and checked (``BundleFiles.read``); ``vocab_limit``: ids the model can embed (encode refuses others)."""

    def __init__(self, source: str | Path | bytes | bytearray, *, name: str = "tokenizer.json",
                 vocab_limit: int | None = None):
        tokenizers = require("tokenizers", "cpu")
        if isinstance(source, (str, Path)):
            name = Path(source).name
            source = BundleFiles(Path(source).parent, verify=False).read(
                name, None, limit=MAX_TOKENIZER_BYTES, what="tokenizer")
        if len(source) > MAX_TOKENIZER_BYTES:
            raise BundleError(f"tokenizer {printable(name)} is {len(source)} bytes, over the "
                              f"{MAX_TOKENIZER_BYTES}-byte limit for it")
        try:
            self._tk = tokenizers.Tokenizer.from_str(bytes(source).decode("utf-8"))
        except Exception as e:  # noqa: BLE001 - tokenizers raises bare Exceptions
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise BundleError(f"cannot read tokenizer {printable(name)}: {printable(first)[:200]}") from None
        self._tk.no_padding()
        self._tk.no_truncation()
        self.vocab_limit = vocab_limit

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise InputError(f"prompt must be a string, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates (e.g. undecodable bytes kept by surrogateescape)
            raise InputError(f"prompt is not valid Unicode text: {e.reason} at character {e.start}") from None
        if any(ord(ch) in _CONTROL for ch in text):
            text = "".join(" " if ord(ch) in _CONTROL else ch for ch in text)
        ids = list(self._tk.encode(text, add_special_tokens=add_special_tokens).ids)
        if self.vocab_limit is not None and any(i >= self.vocab_limit for i in ids):
            bad = max(ids)
            raise BundleError(f"the bundle's tokenizer gives token id {bad}, outside the model's embedding table of "
                              f"{self.vocab_limit} rows", hint="the tokenizer does not belong to this model: "
                                                               "re-export the bundle")
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)


def load_embeddings(source: str | Path | bytes | bytearray, *, name: str = "embed_tokens.npy",
                    shape: tuple[int, int] | None = None) -> np.ndarray:
    """The LLM's input embedding table [vocab, hidden] (no pickle is ever loaded).

    ``source``: a path, or the ``.npy`` file's bytes as read and checked (``BundleFiles.read``): the table
    is a read-only view of those private bytes, never a live map of a file others can write, and costs no
    second copy. ``shape``: (rows at least, columns exactly) from the model facts."""
    if isinstance(source, (str, Path)):
        name = Path(source).name
        source = BundleFiles(Path(source).parent, verify=False).read(name, None, what="embedding table")
    import io

    try:
        f = io.BytesIO(memoryview(source)[:1 << 16])  # the header is at most 64 KiB
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            hdr_shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version in ((2, 0), (3, 0)):
            hdr_shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unknown .npy version {version}")
        offset = f.tell()
    except (ValueError, OSError, SyntaxError) as e:
        raise BundleError(f"cannot read embedding table {printable(name)}: {printable(str(e))[:200]}") from None
    if dtype.hasobject or len(hdr_shape) != 2 or dtype.kind != "f" or fortran:
        raise BundleError(f"embedding table {printable(name)} must be a 2-D C-order float array, got {dtype} "
                          f"of shape {hdr_shape}")
    rows, cols = (int(d) for d in hdr_shape)
    if shape is not None and (rows < shape[0] or cols != shape[1]):
        raise BundleError(f"embedding table {printable(name)} is {rows}x{cols}; the model facts need at least "
                          f"{shape[0]} rows of {shape[1]}", hint="re-export the bundle")
    if offset + rows * cols * dtype.itemsize != len(source):
        raise BundleError(f"embedding table {printable(name)} holds {len(source) - offset} bytes of data for "
                          f"{rows}x{cols} {dtype} values", hint="re-export the bundle")
    table = np.frombuffer(source, dtype=dtype, count=rows * cols, offset=offset).reshape(rows, cols)
    table.flags.writeable = False
    return table


def load_table(files: BundleFiles, manifest, role: str) -> np.ndarray | None:
    """The embedding table of file role ``role`` (None if the bundle has none), from its checked bytes."""
    if role not in manifest.files:
        return None
    m, e = manifest.model, manifest.files[role]
    limit = (1 << 16) + m.vocab_size * 2 * m.llm_hidden * 8  # header + up to twice the rows, float64
    return load_embeddings(files.read(e.file, e.sha256, e.bytes, limit=limit, what="embedding table"),
                           name=e.file, shape=(m.vocab_size, m.llm_hidden))


def table_role(manifest, precision: str | None = None) -> str:
    """The files role of the input embedding table ``precision`` reads: its own (``embed_tokens.<p>``, e.g. a
    float16 table for int4) where the bundle has one, else the shared ``embed_tokens``."""
    own = f"embed_tokens.{precision}"
    return own if precision is not None and own in manifest.files else "embed_tokens"


def load_text(bundle: Path, manifest, verify: bool = True, precision: str | None = None):
    """(tokenizer, embedding table or None) from the bytes of the bundle's files, read once and checked.
    ``precision``: read that precision's own table where the bundle has one (:func:`table_role`)."""
    files = BundleFiles(bundle, verify=verify)
    rec = manifest.files["tokenizer"]
    tok_bytes = files.read(rec.file, rec.sha256, rec.bytes, limit=MAX_TOKENIZER_BYTES, what="tokenizer")
    embed = load_table(files, manifest, table_role(manifest, precision))
    return TextTokenizer(tok_bytes, name=rec.file, vocab_limit=None if embed is None else embed.shape[0]), embed
