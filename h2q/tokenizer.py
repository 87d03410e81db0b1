"""Byte-level tokenizer: ids 0..255 are the bytes themselves, a few special ids sit above.

Any byte string round-trips exactly, valid UTF-8 or not (there is nothing to learn or store, which
is why the model's checkpoint can name its tokenizer with one string). `StreamDecoder` turns a stream
of ids into text for streaming output without ever splitting a multi-byte character; bytes that can
never decode become U+FFFD instead of raising.
"""
from __future__ import annotations

import codecs

EOT = 256  # end of text: separates documents and ends generations
PAD = 257  # filler for ragged batches; never predicted, never attended to
VOCAB_SIZE = 258
NAME = "bytes-v1"  # stored in checkpoint metadata


def encode(text: str | bytes) -> list[int]:
    """Text (UTF-8, with lone surrogates escaped) or raw bytes -> ids."""
    if isinstance(text, str):
        text = text.encode("utf-8", errors="surrogatepass")
    return list(text)


def decode_bytes(ids) -> bytes:
    """ids -> the exact bytes; special ids are dropped."""
    return bytes(int(i) for i in ids if 0 <= int(i) < 256)


def decode(ids) -> str:
    """ids -> text; invalid UTF-8 becomes U+FFFD."""
    return decode_bytes(ids).decode("utf-8", errors="replace")


class StreamDecoder:
    """Incremental UTF-8 decoding: feed ids one (or a few) at a time, get printable text back.

    A multi-byte character is held back until its last byte arrives; an impossible sequence
    yields U+FFFD as soon as it is known to be impossible.
    """

    def __init__(self):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, ids) -> str:
        if isinstance(ids, int):
            ids = [ids]
        return self._decoder.decode(decode_bytes(ids))

    def flush(self) -> str:
        """End of stream: an unfinished character becomes U+FFFD."""
        return self._decoder.decode(b"", final=True)
