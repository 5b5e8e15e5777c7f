"""Reading TorchServe 0.12 backend response messages back, as the frontend does (for the framing tests)."""
from __future__ import annotations

import struct
from dataclasses import dataclass


@dataclass
class Prediction:
    request_id: str
    content_type: str
    status: int
    phrase: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Message:
    code: int
    message: str
    predictions: list[Prediction]


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def int(self) -> int:
        (value,) = struct.unpack_from("!i", self.data, self.pos)
        self.pos += 4
        return value

    def bytes(self) -> bytes:
        n = self.int()
        assert n >= 0 and self.pos + n <= len(self.data), "a length runs past the message"
        value = self.data[self.pos:self.pos + n]
        self.pos += n
        return value

    def str(self) -> str:
        return self.bytes().decode("utf-8")


def decode_messages(data: bytes) -> list[Message]:
    """Every message in ``data`` (a byte stream of whole messages, as written to the socket)."""
    reader, out = _Reader(data), []
    while reader.pos < len(data):
        code, message = reader.int(), reader.str()
        predictions = []
        while True:
            n = reader.int()
            if n == -1:
                break
            reader.pos -= 4
            rid, ctype, status, phrase = reader.str(), reader.str(), reader.int(), reader.str()
            headers = {reader.str(): reader.str() for _ in range(reader.int())}
            predictions.append(Prediction(rid, ctype, status, phrase, headers, reader.bytes()))
        out.append(Message(code, message, predictions))
    return out
