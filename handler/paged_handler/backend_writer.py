"""One backend message per engine step: the streams' intermediate chunks, coalesced.

The engine thread hands each step's outputs to the event loop in one callback
(paged/engine_thread.py), which wakes every stream that advanced; they all run in the next turn of
the loop and each queues its chunk here. The first chunk of a turn schedules ``flush`` with
``call_soon``, so it runs after that turn: by then every stream of the step has queued, and one
message (handler/paged_handler/ts_framing.py) carries them all to the frontend, instead of one
message per stream and token. Two chunks of one stream in the same turn (the chat route's opening
chunk and its first text, or a delta cut to fit the response limit) travel as one prediction,
their bodies joined: NDJSON lines and server-sent events stay valid when concatenated.

Invariants (all methods run on the event loop's thread, the only one that queues or flushes):
- per request, bodies reach the socket in the order ``send`` was called: one pending list in
  call order, flushed whole, packed in order, written under the socket's lock by one thread;
- ``RequestChannel.flush`` returns only once every chunk that request queued is written, so the
  final message TorchServe sends after ``handle`` returns always comes after them;
- a chunk is written exactly once; the only loss is a write to a frontend that is gone (the
  socket raised), which is logged: no client could receive it any more;
- a message stays within ``max_message_bytes`` unless one chunk alone is larger (the stream loop
  cuts chunks to that size first), and joining never makes a prediction outgrow it.
"""
from __future__ import annotations

import asyncio
import logging

from paged_handler.ts_framing import pack_messages, prediction_size, stream_head

logger = logging.getLogger(__name__)


class _Pending:
    """One queued prediction: a stream's head and the bodies joined into it."""

    __slots__ = ("head", "bodies", "size")

    def __init__(self, head: bytes, body: bytes):
        self.head = head
        self.bodies = [body]
        self.size = prediction_size((head, body))

    def prediction(self) -> tuple[bytes, bytes]:
        body = self.bodies[0] if len(self.bodies) == 1 else b"".join(self.bodies)
        return self.head, body


class BackendWriter:
    """Collects the intermediate chunks of every stream of one worker and writes them coalesced.

    ``messages`` (backend messages written), ``predictions`` (their predictions) and ``chunks``
    (``send`` calls) count what went out, for describe and ``make bench-serve``.
    """

    def __init__(self, max_message_bytes: int):
        if max_message_bytes <= 0:
            raise ValueError(f"max_message_bytes must be > 0, got {max_message_bytes}")
        self.max_message_bytes = max_message_bytes
        self.messages = 0
        self.predictions = 0
        self.chunks = 0
        self._pending: list[_Pending] = []
        self._socket = None
        self._batch = 0            # +1 at every flush: tells a channel its last entry is gone
        self._flush_scheduled = False

    def channel(self, socket, request_id: str) -> "RequestChannel":
        """The writer's end for one request, whose chunks go to ``socket`` (the backend socket)."""
        return RequestChannel(self, socket, request_id)

    def _queue(self, socket, entry: _Pending) -> None:
        if self._socket is not socket and self._pending:
            self.flush()  # a new backend connection: what was queued for the old one goes first
        self._socket = socket
        self._pending.append(entry)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self.flush()

    def flush(self) -> None:
        """Write everything queued now, as few messages as the size limit allows."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        self._batch += 1
        predictions = [entry.prediction() for entry in pending]
        try:
            for message in pack_messages(predictions, self.max_message_bytes):
                self._socket.sendall(message)
                self.messages += 1
        except OSError as exc:
            logger.error("writing %d stream chunks to the frontend failed (%r); the frontend is gone, "
                         "its clients with it", len(predictions), exc)
            return
        self.predictions += len(predictions)


class RequestChannel:
    """One request's intermediate chunks, through its worker's ``BackendWriter``."""

    __slots__ = ("writer", "socket", "request_id", "_heads", "_entry", "_entry_batch")

    def __init__(self, writer: BackendWriter, socket, request_id: str):
        self.writer = writer
        self.socket = socket
        self.request_id = request_id
        self._heads: dict[str | None, bytes] = {}  # by content type: a stream keeps one
        self._entry: _Pending | None = None       # this request's last queued prediction
        self._entry_batch = -1                    # the writer's batch it was queued in

    def send(self, chunk: str, content_type: str | None) -> None:
        """Queue one intermediate chunk (the stream stays open); it goes out after this loop turn."""
        writer = self.writer
        body = chunk.encode("utf-8")
        head = self._heads.get(content_type)
        if head is None:
            head = self._heads[content_type] = stream_head(self.request_id, content_type)
        writer.chunks += 1
        entry = self._entry
        if entry is not None and self._entry_batch == writer._batch and entry.head is head \
                and entry.size + len(body) <= writer.max_message_bytes:
            entry.bodies.append(body)  # still queued: join (one prediction per stream and step)
            entry.size += len(body)
            return
        entry = _Pending(head, body)
        writer._queue(self.socket, entry)
        self._entry, self._entry_batch = entry, writer._batch

    def flush(self) -> None:
        """Return once every chunk of this request is written (call before its final message)."""
        if self._entry is not None and self._entry_batch == self.writer._batch:
            self.writer.flush()
