"""Turn a file's bytes into text and an `ast`, or into one clear error."""

from __future__ import annotations

import ast
import codecs
import io
import tokenize
from dataclasses import dataclass


class SourceError(Exception):
    """A file that cannot be decoded or parsed; `code` is DBG900 or DBG901."""

    def __init__(self, code: str, message: str, line: int = 1, col: int = 1) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.line = line
        self.col = col


@dataclass(frozen=True)
class Decoded:
    """A file's text (BOM removed) and what is needed to write it back byte for byte."""

    text: str
    encoding: str
    bom: bool


def _position(data: bytes, offset: int) -> tuple[int, int]:
    line = data.count(b"\n", 0, offset) + 1
    col = offset - (data.rfind(b"\n", 0, offset) + 1) + 1
    return line, col


def decode(data: bytes) -> Decoded:
    """Decode source bytes as Python does (BOM, coding cookie, else UTF-8).

    Raises:
        SourceError: DBG901 for a binary file, an unknown encoding or bytes not in the encoding.
    """
    nul = data.find(b"\0")
    if nul >= 0:
        line, col = _position(data, nul)
        raise SourceError("DBG901", "binary file (contains a NUL byte), not checked", line, col)
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
    except SyntaxError as err:
        if "unknown encoding" in str(err):
            raise SourceError("DBG901", f"cannot decode: {err}") from None
        encoding = "utf-8"  # bad bytes in the first two lines: located below
    bom = data.startswith(codecs.BOM_UTF8)
    body = data[len(codecs.BOM_UTF8) :] if bom else data
    encoding = "utf-8" if encoding == "utf-8-sig" else encoding
    try:
        return Decoded(body.decode(encoding), encoding, bom)
    except UnicodeDecodeError as err:
        line, col = _position(data, err.start + (3 if bom else 0))
        message = f"not valid {encoding} (byte 0x{body[err.start]:02x}), not checked"
        raise SourceError("DBG901", message, line, col) from None


def encode(text: str, decoded: Decoded) -> bytes:
    """Encode text as the original file was (same encoding, same BOM)."""
    return (codecs.BOM_UTF8 if decoded.bom else b"") + text.encode(decoded.encoding)


def parse(text: str, filename: str) -> ast.Module:
    """Parse with Python's `ast`; fall back to libcst for syntax newer than this interpreter.

    Raises:
        SourceError: DBG900 when neither parser accepts the text.
    """
    try:
        return ast.parse(text, filename)
    except SyntaxError as err:
        error = SourceError("DBG900", f"syntax error: {err.msg}", err.lineno or 1, err.offset or 1)
    except (ValueError, RecursionError, MemoryError) as err:
        raise SourceError("DBG900", f"cannot parse: {type(err).__name__}") from None
    from moe_devkit.lint.downgrade import downgrade  # libcst is imported only when needed

    newer = downgrade(text)
    if newer is None:
        raise error
    try:
        return ast.parse(newer, filename)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise error from None
