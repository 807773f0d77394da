"""The sans-I/O reply reader (pop3lite.ReplyReader) on its own: no sockets.

Every input is fed whole, one byte at a time, split at every position into two pieces, and
with the next pipelined reply (or surplus bytes) after it; the events must be the same. At the
end, the same through the client: random bodies arriving in random pieces.
"""

from __future__ import annotations

import io
import random
import warnings
from typing import Any

import pytest

import pop3lite
from conftest import SOAK, MiB, Peer, connect, message_top, scripted
from pop3lite import (
    NEED_DATA,
    BodyEnd,
    BodyPiece,
    Challenge,
    Expected,
    ReplyReader,
    StatusLine,
)

CRLF = b"\r\n"
MULTI = Expected(multiline=True)
SASL = Expected(sasl=True)


def drain(reader: ReplyReader) -> list[Any]:
    """Every event the reader can give now, whole bodies joined, until it needs data or
    expects nothing more."""
    events: list[Any] = []
    while reader.awaiting:
        event = reader.next_event()
        if event is NEED_DATA:
            break
        if isinstance(event, BodyPiece) and events and isinstance(events[-1], BodyPiece):
            events[-1] = BodyPiece(events[-1].data + event.data)  # pieces are cut anywhere
        else:
            events.append(event)
    return events


def read(pieces: list[bytes], *expected: Expected) -> list[Any]:
    reader = ReplyReader()
    for item in expected:
        reader.expect(item)
    events: list[Any] = []
    for piece in pieces:
        reader.feed(piece)
        for event in drain(reader):
            if events and isinstance(event, BodyPiece) and isinstance(events[-1], BodyPiece):
                events[-1] = BodyPiece(events[-1].data + event.data)
            else:
                events.append(event)
    assert reader.awaiting == 0, "the reply never completed"
    return events


def splits(raw: bytes) -> list[list[bytes]]:
    """The ways to deliver ``raw``: whole, byte by byte, and cut once at every position."""
    ways = [[raw], [raw[i : i + 1] for i in range(len(raw))]]
    ways += [[raw[:cut], raw[cut:]] for cut in range(1, len(raw))]
    return ways


# name: (raw bytes, what is expected, the events)
CASES = {
    "ok": (b"+OK 2 320\r\n", [Expected()], [StatusLine(True, b"2 320")]),
    "bare ok": (b"+OK\r\n", [Expected()], [StatusLine(True, b"")]),
    "err with code": (
        b"-ERR [IN-USE] locked\r\n",
        [MULTI],
        [StatusLine(False, b"[IN-USE] locked")],
    ),
    "multi-line": (
        b"+OK\r\n1 5954\r\n2 4226\r\n.\r\n",
        [MULTI],
        [StatusLine(True, b""), BodyPiece(b"1 5954\r\n2 4226\r\n"), BodyEnd(16)],
    ),
    "empty body": (b"+OK\r\n.\r\n", [MULTI], [StatusLine(True, b""), BodyEnd(0)]),
    "stuffed dots": (
        b"+OK\r\n..\r\n...x\r\nmid..dle\r\n..\r\n.\r\n",
        [MULTI],
        [StatusLine(True, b""), BodyPiece(b".\r\n..x\r\nmid..dle\r\n.\r\n"), BodyEnd(21)],
    ),
    "stuffed first line": (
        b"+OK\r\n..first\r\nsecond\r\n.\r\n",
        [MULTI],
        [StatusLine(True, b""), BodyPiece(b".first\r\nsecond\r\n"), BodyEnd(16)],
    ),
    "bare LF server": (
        b"+OK\na\n..b\n.\n",
        [MULTI],
        [StatusLine(True, b""), BodyPiece(b"a\r\n.b\r\n"), BodyEnd(7)],
    ),
    "sparse, then dense stuffing": (
        b"+OK\r\n" + b"line\r\n" * 30 + b"..s\r\n" * 70 + b".\r\n",
        [MULTI],
        [StatusLine(True, b""), BodyPiece(b"line\r\n" * 30 + b".s\r\n" * 70), BodyEnd(460)],
    ),
    "single dot lines": (
        b"+OK\r\n.a\r\nb\r\n.c\r\n.\r\n",
        [MULTI],
        [StatusLine(True, b""), BodyPiece(b".a\r\nb\r\n.c\r\n"), BodyEnd(11)],
    ),
    "SASL challenge": (b"+ dXNlcg==\r\n", [SASL], [Challenge(b"dXNlcg==")]),
    "SASL empty challenge": (b"+\r\n", [SASL], [Challenge(b"")]),
    "SASL final": (b"+OK logged in\r\n", [SASL], [StatusLine(True, b"logged in")]),
    "pipelined": (
        b"+OK\r\none\r\n.\r\n-ERR no such message\r\n+OK 3 octets\r\nab\r\n.\r\n",
        [MULTI, MULTI, MULTI],
        [
            StatusLine(True, b""), BodyPiece(b"one\r\n"), BodyEnd(5),
            StatusLine(False, b"no such message"),
            StatusLine(True, b"3 octets"), BodyPiece(b"ab\r\n"), BodyEnd(4),
        ],
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_every_delivery_gives_the_same_events(name: str) -> None:
    raw, expected, events = CASES[name]
    for pieces in splits(raw):
        assert read(pieces, *expected) == events, pieces


@pytest.mark.parametrize("name", list(CASES))
def test_the_next_reply_is_left_for_its_command(name: str) -> None:
    raw, expected, events = CASES[name]
    following = b"+OK next\r\n"
    for pieces in splits(raw + following):
        assert read(pieces, *expected, Expected()) == [*events, StatusLine(True, b"next")]


@pytest.mark.parametrize("name", [n for n in CASES if n != "SASL challenge"])
def test_bytes_nobody_asked_for_put_the_session_out_of_step(name: str) -> None:
    raw, expected, _ = CASES[name]
    reader = ReplyReader()
    for item in expected:
        reader.expect(item)
    reader.feed(raw + b"+OK surplus\r\n")
    with pytest.raises(pop3lite.ProtocolError, match="more than was asked") as caught:
        drain(reader)
    assert caught.value.reason == "surplus"


def test_a_server_that_does_not_wait_for_the_answer_to_its_challenge() -> None:
    reader = ReplyReader()
    reader.expect(SASL)
    reader.feed(b"+ VXNlcm5hbWU6\r\n+OK\r\n")
    with pytest.raises(pop3lite.ProtocolError, match="more than was asked"):
        drain(reader)


def test_after_the_last_reply_nothing_is_read() -> None:
    reader = ReplyReader()
    reader.expect(Expected(last=True))
    reader.feed(b"+OK bye\r\nwhatever follows\r\n")
    assert drain(reader) == [StatusLine(True, b"bye")]


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"+OKAY\r\n", pop3lite.ProtocolError),
        (b"+ok\r\n", pop3lite.ProtocolError),
        (b"-ERROR\r\n", pop3lite.ProtocolError),
        (b"+OK a\rb\r\n", pop3lite.ProtocolError),  # bare CR
        (b"+OK " + b"x" * pop3lite.MAX_RESPONSE_LINE + b"\r\n", pop3lite.LimitExceeded),
    ],
    ids=["+OKAY", "+ok", "-ERROR", "bare CR", "long line"],
)
def test_status_lines_that_are_not_pop3(raw: bytes, error: type) -> None:
    for pieces in ([raw], [raw[i : i + 1] for i in range(len(raw))]):
        reader = ReplyReader()
        reader.expect()
        with pytest.raises(error):
            for piece in pieces:
                reader.feed(piece)
                drain(reader)


def test_a_line_without_end_is_stopped_at_the_limit_not_at_the_end_of_memory() -> None:
    reader = ReplyReader()
    reader.expect()
    with pytest.raises(pop3lite.LimitExceeded):
        for _ in range(100):  # bounded: the limit is 8 KiB, this feeds up to 100 KiB
            reader.feed(b"+" * 1024)
            drain(reader)


def test_a_body_over_its_limit() -> None:
    reader = ReplyReader()
    reader.expect(Expected(multiline=True, limit=1000))
    reader.feed(b"+OK\r\n")
    assert drain(reader) == [StatusLine(True, b"")]
    with pytest.raises(pop3lite.LimitExceeded):
        for _ in range(10):
            reader.feed(b"x" * 198 + b"\r\n")
            drain(reader)


def test_a_streamed_body_comes_in_pieces_and_memory_stays_flat() -> None:
    reader = ReplyReader()
    reader.expect(Expected(multiline=True, limit=1, stream=True))  # limits don't apply
    reader.feed(b"+OK 99999999 octets\r\n")
    assert drain(reader) == [StatusLine(True, b"99999999 octets")]
    line = b"." * 999 + b"\r\n"  # every line stuffed
    got = 0
    pieces = 0
    for _ in range(4000):  # 4 MB
        reader.feed(line)
        while True:
            event = reader.next_event()
            if event is NEED_DATA:
                break
            assert isinstance(event, BodyPiece)
            assert event.data.startswith(b"." * 998 + b"\r\n")  # cut at a line end
            got += len(event.data)
            pieces += 1
        assert reader.capacity <= 4 * pop3lite.RECV_SIZE
    reader.feed(b".\r\n")
    rest = drain(reader)
    if isinstance(rest[0], BodyPiece):
        got += len(rest.pop(0).data)
    assert rest == [BodyEnd(4000 * 1000)]
    assert got == 4000 * 1000
    assert pieces > 4


def test_a_stream_cut_inside_a_long_line_keeps_its_dots() -> None:
    # A line longer than a piece is cut inside; a ".." later in it is data, not stuffing,
    # and a CR at the cut may begin the line end.
    body = b"a" * (pop3lite.STREAM_CHUNK + 10) + b"..b\r\n..c\r\n"
    raw = b"+OK\r\n" + body.replace(b"\r\n..", b"\r\n...") + b".\r\n"
    for size in (1000, 4096, pop3lite.STREAM_CHUNK + 7):
        reader = ReplyReader()
        reader.expect(Expected(multiline=True, stream=True))
        data = b""
        for start in range(0, len(raw), size):
            reader.feed(raw[start : start + size])
            for event in drain(reader):
                if isinstance(event, BodyPiece):
                    data += event.data
        assert data == body.replace(b"\r\n...", b"\r\n.."), size
        assert reader.awaiting == 0


def test_a_large_announced_body_is_received_into_one_buffer() -> None:
    size = 3 * pop3lite.RECV_SIZE
    body = b"y" * (size - 2) + b"\r\n"
    reader = ReplyReader()
    reader.expect(MULTI)
    reader.feed(b"+OK %d octets\r\n" % size)
    drain(reader)
    capacity = reader.capacity
    assert capacity >= size  # sized from the announcement before the body arrives
    with reader.receive_buffer() as space:
        space[: len(body)] = body
    reader.received(len(body))
    reader.feed(b".\r\n")
    assert reader.capacity == capacity  # never grown, never copied
    assert drain(reader) == [BodyPiece(body), BodyEnd(size)]


def test_single_lines_do_not_grow_the_buffer() -> None:
    reader = ReplyReader()
    capacity = reader.capacity
    for _ in range(2000):
        reader.expect()
        reader.feed(b"+OK " + b"n" * 400 + b"\r\n")
        assert drain(reader) == [StatusLine(True, b"n" * 400)]
    assert reader.capacity == capacity and reader.pending == 0


@pytest.mark.parametrize(
    ("raw", "error", "message"),
    [
        (b"", pop3lite.NetworkError, "^server closed the connection$"),
        (b"+OK par", pop3lite.TruncatedResponse, "in the middle"),
        (b"+OK\r\nbody\r\n", pop3lite.TruncatedResponse, "in the middle"),
    ],
    ids=["between replies", "in a status line", "in a body"],
)
def test_what_a_closed_connection_means(raw: bytes, error: type, message: str) -> None:
    reader = ReplyReader()
    reader.expect(MULTI)
    reader.feed(raw)
    drain(reader)
    closed = reader.connection_closed()
    assert type(closed) is error
    with pytest.raises(error, match=message):
        raise closed


def test_the_body_limit_is_on_the_message_however_the_bytes_arrive() -> None:
    # Ten lines "..x" are 40 octets once unstuffed: exactly the limit, in any delivery.
    raw = b"+OK\r\n" + b"..x\r\n" * 10 + b".\r\n"
    for pieces in splits(raw):
        events = read(pieces, Expected(multiline=True, limit=40))
        assert events[-1] == BodyEnd(40), pieces


def test_a_challenge_needs_its_space() -> None:
    reader = ReplyReader()
    reader.expect(SASL)
    reader.feed(b"+VXNlcm5hbWU6\r\n")  # not "+ ": not a continuation, and not +OK either
    with pytest.raises(pop3lite.ProtocolError, match="expected \\+OK or -ERR"):
        drain(reader)


def test_a_size_announced_for_a_body_already_here_allocates_nothing() -> None:
    reader = ReplyReader()
    capacity = reader.capacity
    for _ in range(50):
        reader.expect(MULTI)
        reader.feed(b"+OK 999999999999 octets\r\nhi\r\n.\r\n")
        assert drain(reader)[-1] == BodyEnd(4)
    assert reader.capacity == capacity


def test_closed_connection_errors_carry_a_reason() -> None:
    reader = ReplyReader()
    reader.expect()
    assert reader.connection_closed().reason == "closed"
    reader.feed(b"+OK")
    drain(reader)
    assert reader.connection_closed().reason == "truncated"


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"plain\r\n",
        b"..first\r\nsecond\r\n",
        b"a\r\n..b\r\n...c\r\n..\r\n",
        b"..\r\n" * 300,  # dense: the one-replace fallback
        b"x\r\n" + b"..y\r\n" * 100 + b"tail\r\n",
        b"..mid\r\n..line..\r\n",
    ],
    ids=["empty", "no dots", "first line", "mixed", "dense", "dense after a line", "inner dots"],
)
@pytest.mark.parametrize("eol", [b"\r\n", b"\n"], ids=["CRLF", "LF"])
def test_unstuff_slice_is_unstuff_of_the_slice(body: bytes, eol: bytes) -> None:
    body = body.replace(b"\r\n", eol)
    for at_line_start in (True, False):
        buf = bytearray(b"junk" + body + b"junk")  # the slice is overwritten
        want = pop3lite.unstuff(body, eol, at_line_start)
        assert pop3lite.unstuff_slice(buf, 4, 4 + len(body), eol, at_line_start) == want
        buf.extend(b"x")  # no view of the buffer is left behind: it can still be resized


# =============================================================================================
# Through the client: bodies split at any point on the wire
# =============================================================================================


def random_message(rng: random.Random, bare_lf: bool) -> bytes:
    """A CRLF message whose lines are the hard cases: dots, long lines, 8-bit and NUL, and
    (unless it will be sent with bare LF) CR or LF alone inside a line."""
    pieces = [b"", b".", b"..", b"...", b". ", b".x", b"x.", b"From x", b"\x00\xff\x80 \t",
              b"\xe3\x81\x82"]
    if not bare_lf:
        pieces += [b"a\rb", b"a\nb", b"x\r", b"\n.", b"\r\n.\r"[1:]]
    lines = [b"Subject: %d" % rng.randrange(10**6), b""]
    for _ in range(rng.randrange(0, 40)):
        if rng.random() < 0.1:
            lines.append(b"y" * rng.randrange(100, 3000))
        else:
            lines.append(b"".join(rng.choice(pieces) for _ in range(rng.randrange(1, 4))))
    return b"".join(line + CRLF for line in lines)


def on_the_wire(message: bytes, eol: bytes) -> bytes:
    """A message as a multi-line body: dot-stuffed, lines ended by ``eol``, the terminator."""
    lines = message.split(CRLF)[:-1]
    return b"".join((b"." + line if line.startswith(b".") else line) + eol for line in lines) + (
        b"." + eol
    )


@pytest.mark.parametrize("bare_lf", [False, True], ids=["CRLF", "bare LF"])
def test_bodies_split_at_any_point(monkeypatch: pytest.MonkeyPatch, bare_lf: bool) -> None:
    """With pop3lite receiving 1 to 13 octets at a time, streaming in pieces of 40 octets and
    taking its large-body path from 64 octets, random bodies sent in random pieces come back
    exactly as they were (retr, top, retr_to), with no size warning."""
    rng = random.Random(f"split/{bare_lf}")
    messages = [random_message(rng, bare_lf) for _ in range(40 * SOAK)]
    eol = b"\n" if bare_lf else CRLF

    def script(peer: Peer) -> None:
        pieces = random.Random(f"pieces/{bare_lf}")
        peer.send(b"+OK ready\r\n")
        for _ in range(len(messages) * 3 + 1):
            words = peer.line().split()
            if not words or words[0] == b"QUIT":
                peer.send(b"+OK\r\n")
                return
            message = messages[int(words[1]) - 1]
            if words[0] == b"TOP":
                message = message_top(message, int(words[2]))
            data = b"+OK %d octets" % len(message) + eol + on_the_wire(message, eol)
            view, index = memoryview(data), 0
            while index < len(data):  # random pieces; the client may still join them
                step = pieces.randrange(1, 200)
                peer.send(view[index : index + step])
                index += step

    for name, value in (("RECV_SIZE", 13), ("STREAM_CHUNK", 40)):
        monkeypatch.setattr(pop3lite, name, value)
    with scripted(script) as port, connect(port, max_message_size=MiB) as pop:
        with warnings.catch_warnings():
            warnings.simplefilter("error", pop3lite.SizeMismatchWarning)
            for number, message in enumerate(messages, 1):
                assert pop.retr(number) == message
                out = io.BytesIO()
                assert pop.retr_to(number, out) == len(message)
                assert out.getvalue() == message
                lines = rng.randrange(5)
                assert pop.top(number, lines) == message_top(message, lines)
