"""Backend response messages (handler/paged_handler/ts_framing.py) and the writer that coalesces the
streams' chunks into one message per loop turn (handler/paged_handler/backend_writer.py), without a server."""
from __future__ import annotations

import asyncio
import random

import pytest
from ts.context import Context, RequestProcessor
from ts.protocol.otf_message_handler import create_predict_response

from paged_handler.backend_writer import BackendWriter
from paged_handler.ts_framing import encode_message, pack_messages, prediction_head, stream_head
from ts_frames import decode_messages

NDJSON = "application/x-ndjson"
SSE = "text/event-stream"


class RecordingSocket:
    """A backend socket that keeps every message written (or fails every write, once closed)."""

    def __init__(self):
        self.writes: list[bytes] = []
        self.closed = False

    def sendall(self, data: bytes) -> None:
        if self.closed:
            raise BrokenPipeError("the frontend is gone")
        self.writes.append(bytes(data))

    def messages(self):
        return decode_messages(b"".join(self.writes))


def _torchserve_context(request_ids: list[str]) -> Context:
    ctx = Context("llm", ".", {}, 1, None, "0.12.0")
    ctx.request_ids = dict(enumerate(request_ids))
    ctx.request_processor = [RequestProcessor({}) for _ in request_ids]
    return ctx


# ---- the frame -------------------------------------------------------------------------------------
def test_one_stream_chunk_is_framed_byte_for_byte_as_torchserve_frames_it():
    ctx = _torchserve_context(["req-1"])
    ctx.set_response_content_type(0, NDJSON)
    theirs = create_predict_response(['{"text":"h\u00e9"}\n'], ctx.request_ids, "Intermediate", 200, ctx,
                                     ts_stream_next=True)
    ours = encode_message([(stream_head("req-1", NDJSON), '{"text":"h\u00e9"}\n'.encode())])
    assert ours == bytes(theirs)


def test_several_streams_in_one_message_match_torchserves_batch_framing():
    ids = ["a", "b-2", "c\u00e9"]
    bodies = ["one\n", "data: two\n\n", ""]
    types = [NDJSON, SSE, NDJSON]
    ctx = _torchserve_context(ids)
    for i, ctype in enumerate(types):
        ctx.set_response_content_type(i, ctype)
    theirs = create_predict_response(bodies, ctx.request_ids, "Intermediate", 200, ctx, ts_stream_next=True)
    ours = encode_message([(stream_head(r, t), b.encode()) for r, t, b in zip(ids, types, bodies)])
    assert ours == bytes(theirs)


def test_a_message_reads_back_with_every_field_of_every_prediction():
    head = prediction_head("r", "application/json", 404, "Not Found", {"x-a": "1", "ts_stream_next": "false"})
    [msg] = decode_messages(encode_message([(head, b"{}"), (stream_head("s", None), b"")], code=200, message="m"))
    assert (msg.code, msg.message) == (200, "m")
    first, second = msg.predictions
    assert (first.request_id, first.content_type, first.status, first.phrase, first.headers, first.body) == \
        ("r", "application/json", 404, "Not Found", {"x-a": "1", "ts_stream_next": "false"}, b"{}")
    assert (second.request_id, second.content_type, second.headers, second.body) == \
        ("s", "", {"ts_stream_next": "true"}, b"")


def test_packing_keeps_order_and_the_size_limit():
    rng = random.Random(0)
    preds = [(stream_head(f"r{i % 5}", NDJSON), bytes([65 + i % 26]) * rng.randint(0, 300)) for i in range(200)]
    limit = 2000
    messages = pack_messages(preds, limit)
    assert len(messages) > 1 and all(len(m) <= limit for m in messages)
    decoded = [p for m in decode_messages(b"".join(messages)) for p in m.predictions]
    assert [(p.request_id, p.body) for p in decoded] == [(f"r{i % 5}", b) for i, (_, b) in enumerate(preds)]


def test_a_prediction_larger_than_the_limit_travels_alone():
    big = (stream_head("big", NDJSON), b"x" * 5000)
    small = (stream_head("s", NDJSON), b"y")
    messages = pack_messages([small, big, small], 1000)
    assert [len(m.predictions) for m in decode_messages(b"".join(messages))] == [1, 1, 1]


def test_packing_refuses_a_limit_that_is_not_positive():
    with pytest.raises(ValueError, match="max_message_bytes"):
        pack_messages([], 0)


# ---- the writer -----------------------------------------------------------------------------------
def test_the_streams_of_one_loop_turn_leave_as_one_message():
    sock = RecordingSocket()

    async def main():
        writer = BackendWriter(1 << 20)
        channels = [writer.channel(sock, f"r{i}") for i in range(4)]
        for i, ch in enumerate(channels):  # one engine step: every stream queues its chunk
            ch.send(f"tok{i}\n", NDJSON)
        assert sock.writes == []          # nothing is written inside the turn
        await asyncio.sleep(0)
        return writer

    writer = asyncio.run(main())
    [msg] = sock.messages()
    assert [(p.request_id, p.body) for p in msg.predictions] == [(f"r{i}", f"tok{i}\n".encode()) for i in range(4)]
    assert all(p.headers["ts_stream_next"] == "true" and p.content_type == NDJSON for p in msg.predictions)
    assert (writer.messages, writer.predictions, writer.chunks) == (1, 4, 4)


def test_each_stream_gets_its_own_chunks_in_order_across_steps():
    sock = RecordingSocket()
    rng = random.Random(1)

    async def stream(writer, rid: str, n: int):
        ch = writer.channel(sock, rid)
        for k in range(n):
            ch.send(f"{rid}:{k}\n", NDJSON)
            await asyncio.sleep(0) if rng.random() < 0.7 else None

    async def main():
        writer = BackendWriter(512)
        await asyncio.gather(*(stream(writer, f"r{i}", 20 + i) for i in range(6)))
        await asyncio.sleep(0)

    asyncio.run(main())
    got: dict[str, bytes] = {}
    for msg in sock.messages():
        for p in msg.predictions:
            got[p.request_id] = got.get(p.request_id, b"") + p.body
    assert got == {f"r{i}": "".join(f"r{i}:{k}\n" for k in range(20 + i)).encode() for i in range(6)}


def test_two_chunks_of_one_stream_in_one_turn_are_joined_into_one_prediction():
    sock = RecordingSocket()

    async def main():
        writer = BackendWriter(1 << 20)
        ch = writer.channel(sock, "chat")
        ch.send("data: role\n\n", SSE)
        ch.send("data: text\n\n", SSE)
        await asyncio.sleep(0)

    asyncio.run(main())
    [msg] = sock.messages()
    assert [(p.request_id, p.body) for p in msg.predictions] == [("chat", b"data: role\n\ndata: text\n\n")]


def test_a_channel_flush_writes_its_chunks_before_the_final_message():
    sock = RecordingSocket()

    async def main():
        writer = BackendWriter(1 << 20)
        done, other = writer.channel(sock, "done"), writer.channel(sock, "other")
        other.send("o\n", NDJSON)
        done.send("last text\n", NDJSON)
        done.flush()                       # the adapter does this before handle returns the final
        sock.writes.append(encode_message([(prediction_head("done", NDJSON, 200, "", {"ts_stream_next": "false"}),
                                            b"closing\n")], message="Prediction success"))
        other.flush()                      # nothing left: no empty message
        await asyncio.sleep(0)             # the scheduled flush finds nothing either

    asyncio.run(main())
    msgs = sock.messages()
    assert len(msgs) == 2
    assert [p.request_id for p in msgs[0].predictions] == ["other", "done"]
    assert msgs[1].predictions[0].body == b"closing\n"


def test_a_write_to_a_frontend_that_is_gone_is_dropped_without_raising():
    sock = RecordingSocket()
    sock.closed = True

    async def main():
        writer = BackendWriter(1 << 20)
        ch = writer.channel(sock, "r")
        ch.send("x\n", NDJSON)
        ch.flush()
        ch.flush()  # already dropped: no second attempt
        return writer

    writer = asyncio.run(main())
    assert (writer.messages, writer.predictions, sock.writes) == (0, 0, [])


def test_joining_never_makes_a_prediction_outgrow_the_limit():
    sock = RecordingSocket()
    limit = 400

    async def main():
        writer = BackendWriter(limit)
        ch = writer.channel(sock, "r")
        for k in range(10):
            ch.send(chr(97 + k) * 100, NDJSON)
        await asyncio.sleep(0)

    asyncio.run(main())
    assert all(len(w) <= limit for w in sock.writes)
    body = b"".join(p.body for m in sock.messages() for p in m.predictions)
    assert body == b"".join(bytes([97 + k]) * 100 for k in range(10))


def test_the_writer_refuses_a_limit_that_is_not_positive():
    with pytest.raises(ValueError, match="max_message_bytes"):
        BackendWriter(0)
