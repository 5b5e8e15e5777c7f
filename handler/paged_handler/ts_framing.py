"""TorchServe 0.12's backend response message, built from bytes without a request context.

One response message from the worker to the frontend (what ``create_predict_response`` in
TorchServe's ``ts/protocol/otf_message_handler.py`` writes and the frontend's response decoder
reads; every int is a big-endian int32)::

    code | len, message | prediction* | -1
    prediction = len, request id | len, content type | http status | len, reason phrase
                 | header count, (len, key, len, value)* | len, body

A message may carry predictions of several requests: the frontend (asyncCommunication mode)
looks each one up by its request id and hands its body to that request's client, in the order
they appear. That is what lets one message carry a whole engine step (handler/paged_handler/
backend_writer.py). Everything from the request id to the headers depends only on the request
and is the same for every intermediate chunk of a stream, so ``prediction_head`` is built once per
stream and each chunk costs one length and its body.

Invariants: ``encode_message`` of one prediction is byte for byte what TorchServe writes for the
same request, status, content type and headers; ``pack_messages`` keeps the predictions' order
(within a message and across messages) and puts a prediction in exactly one message.
"""
from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

END_OF_LIST = struct.pack("!i", -1)
INTERMEDIATE = "Intermediate"
STREAM_NEXT_HEADER = "ts_stream_next"
CONTENT_TYPE_HEADER = "content-type"
_MESSAGE_OVERHEAD = 3 * 4  # code, message length, end of list (plus the message text itself)

Prediction = tuple[bytes, bytes]  # (prediction_head(...), body)


def _string(value: str | bytes) -> bytes:
    data = value.encode("utf-8") if isinstance(value, str) else value
    return struct.pack("!i", len(data)) + data


def prediction_head(request_id: str, content_type: str | None, status: int = 200, phrase: str = "",
                    headers: dict[str, str] | None = None) -> bytes:
    """The bytes of one prediction before its body: request id, content type, status, phrase, headers.

    An empty or None content type is sent as length 0 (the frontend then keeps its default).
    """
    headers = headers or {}
    parts = [_string(request_id), _string(content_type or ""), struct.pack("!i", status), _string(phrase),
             struct.pack("!i", len(headers))]
    for key, value in headers.items():
        parts.append(_string(key))
        parts.append(_string(value))
    return b"".join(parts)


def stream_head(request_id: str, content_type: str | None) -> bytes:
    """The head of an intermediate chunk: status 200, ``ts_stream_next: true`` (the job stays open).

    The content type travels twice, as TorchServe sends it: in its field and as a ``content-type``
    header (TorchServe's context keeps it among the response headers)."""
    headers = {CONTENT_TYPE_HEADER: content_type} if content_type else {}
    headers[STREAM_NEXT_HEADER] = "true"
    return prediction_head(request_id, content_type, 200, "", headers)


def prediction_size(prediction: Prediction) -> int:
    head, body = prediction
    return len(head) + 4 + len(body)


def encode_message(predictions: Iterable[Prediction], code: int = 200, message: str = INTERMEDIATE) -> bytes:
    """One backend message carrying ``predictions`` in order (bodies as UTF-8 bytes)."""
    parts = [struct.pack("!i", code), _string(message)]
    for head, body in predictions:
        parts.append(head)
        parts.append(struct.pack("!i", len(body)))
        parts.append(body)
    parts.append(END_OF_LIST)
    return b"".join(parts)


def pack_messages(predictions: Sequence[Prediction], max_message_bytes: int, code: int = 200,
                  message: str = INTERMEDIATE) -> list[bytes]:
    """``predictions`` as few messages as the size limit allows, in order.

    Each message stays within ``max_message_bytes`` (the frontend's ``max_response_size``, above
    which it drops the worker), except a prediction that alone is larger: it travels alone, as it
    would have without coalescing (the stream loop bounds chunks to the limit before they get here).
    """
    if max_message_bytes <= 0:
        raise ValueError(f"max_message_bytes must be > 0, got {max_message_bytes}")
    base = _MESSAGE_OVERHEAD + len(message.encode("utf-8"))
    messages: list[bytes] = []
    batch: list[Prediction] = []
    size = base
    for prediction in predictions:
        grow = prediction_size(prediction)
        if batch and size + grow > max_message_bytes:
            messages.append(encode_message(batch, code, message))
            batch, size = [], base
        batch.append(prediction)
        size += grow
    if batch:
        messages.append(encode_message(batch, code, message))
    return messages
