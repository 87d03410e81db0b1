"""Byte tokenizer: exact round-trips and streaming decode that never splits a character."""
import random

from h2q import tokenizer
from h2q.tokenizer import EOT, PAD, VOCAB_SIZE, StreamDecoder, decode, decode_bytes, encode

MIXED_TEXT = "ascii, é ß (2 bytes), € 中文 (3 bytes), 🙂 𝄞 (4 bytes), end\n"


def test_ids_are_bytes_then_specials():
    assert (EOT, PAD, VOCAB_SIZE) == (256, 257, 258)
    assert encode("A€") == [65, 0xE2, 0x82, 0xAC]
    assert decode_bytes([104, EOT, 105, PAD]) == b"hi"


def test_random_bytes_round_trip_including_invalid_utf8():
    rng = random.Random(0)
    for length in (0, 1, 7, 1000):
        data = bytes(rng.randrange(256) for _ in range(length))
        ids = encode(data)
        assert all(0 <= i < 256 for i in ids)
        assert decode_bytes(ids) == data
    invalid = b"\xff\xfe\xc3(\xed\xa0\x80\xf0\x28\x8c\xbc"
    assert decode_bytes(encode(invalid)) == invalid


def test_text_round_trip():
    assert decode(encode(MIXED_TEXT)) == MIXED_TEXT


def test_stream_decoder_byte_by_byte_never_emits_partial_characters():
    data = MIXED_TEXT.encode("utf-8")
    decoder = StreamDecoder()
    emitted = ""
    for i, byte in enumerate(data):
        piece = decoder.feed(byte)
        emitted += piece
        assert "\ufffd" not in piece
        assert MIXED_TEXT.startswith(emitted)
        # whatever is out is exactly the characters whose last byte has arrived
        assert emitted.encode("utf-8") == data[: len(emitted.encode("utf-8"))]
        assert len(data[: i + 1]) - len(emitted.encode("utf-8")) < 4
    emitted += decoder.flush()
    assert emitted == MIXED_TEXT == decode(encode(MIXED_TEXT))


def test_stream_decoder_holds_back_until_last_byte():
    decoder = StreamDecoder()
    four = "🙂".encode()
    assert [decoder.feed(b) for b in four] == ["", "", "", "🙂"]
    assert decoder.feed([0xE2, 0x82]) == ""
    assert decoder.feed([0xAC, EOT, 0x41]) == "€A"  # special ids are not text


def test_stream_decoder_invalid_bytes_become_replacement_characters():
    bad = bytes([0x61, 0xFF, 0x62, 0xC3, 0x28, 0xED, 0xA0, 0x80, 0x63])
    decoder = StreamDecoder()
    streamed = "".join(decoder.feed(b) for b in bad) + decoder.flush()
    assert streamed == decode(list(bad)) == bad.decode("utf-8", errors="replace")
    assert streamed.startswith("a\ufffdb\ufffd(") and streamed.endswith("c")


def test_stream_decoder_flush_ends_an_unfinished_character():
    decoder = StreamDecoder()
    assert decoder.feed(list("中".encode()[:2])) == ""
    assert decoder.flush() == "\ufffd"
    assert decoder.flush() == ""
    assert StreamDecoder().flush() == ""


def test_stream_decoder_chunked_equals_whole_decode():
    rng = random.Random(1)
    data = bytes(rng.randrange(256) for _ in range(500)) + MIXED_TEXT.encode("utf-8")
    decoder = StreamDecoder()
    out, i = "", 0
    while i < len(data):
        n = rng.randrange(1, 6)
        out += decoder.feed(list(data[i:i + n]))
        i += n
    assert out + decoder.flush() == tokenizer.decode(list(data))
