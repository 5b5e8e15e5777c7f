"""The engine <-> rank link: length-prefixed frames over a Unix or TCP socket, mutually authenticated.

Every rank holds one connection to the engine. The engine writes each step's pickled plan to all
of them (one pickle, N socket writes: tens of microseconds for a decode step); the ranks answer on
the same connection. A closed connection is how either side learns that the other died: a rank
blocked in ``recv`` gets EOF the moment the engine's process is gone, and the engine sees EOF the
moment a rank's process is.

Both ends prove they know the group's secret key (HMAC-SHA256 over a random challenge, each way)
before anything is unpickled, so a stranger that reaches a TCP port cannot feed pickles to
either side.

Addresses are ``unix:<path>``, ``unix:@<name>`` (Linux abstract namespace) or ``tcp:<host>:<port>``.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import pickle
import socket
import struct
import threading

_HEADER = struct.Struct("!Q")
_CHALLENGE_BYTES = 32
_COALESCE_BYTES = 1 << 16
MAX_FRAME_BYTES = 1 << 34  # a corrupt length must not make us allocate the machine


class ChannelClosed(ConnectionError):
    """The peer closed the connection (its process exited or was killed)."""


def _parse(address: str) -> tuple[int, object]:
    kind, _, rest = address.partition(":")
    if kind == "unix" and rest:
        # "@name" is Linux's abstract namespace: no file, so nothing is left behind when the
        # engine is killed (the key, not file permissions, keeps other local users out).
        return socket.AF_UNIX, "\0" + rest[1:] if rest.startswith("@") else rest
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        if host and port.isdigit():
            return socket.AF_INET6 if ":" in host else socket.AF_INET, (host.strip("[]"), int(port))
    raise ValueError(f"channel address must be 'unix:<path>' or 'tcp:<host>:<port>', got {address!r}")


class Connection:
    """One framed, authenticated socket. ``send*`` may be called from several threads."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._send_lock = threading.Lock()

    def fileno(self) -> int:
        return self.sock.fileno()

    def send_bytes(self, payload: bytes | bytearray | memoryview) -> None:
        header = _HEADER.pack(len(payload))
        with self._send_lock:
            if len(payload) < _COALESCE_BYTES:  # one syscall (and one TCP segment) for small frames
                self.sock.sendall(header + bytes(payload))
            else:
                self.sock.sendall(header)
                self.sock.sendall(payload)

    def send(self, message: object) -> None:
        self.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))

    def _recv_exact(self, n: int) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            chunk = self.sock.recv_into(view[got:])
            if chunk == 0:
                raise ChannelClosed("connection closed by the peer")
            got += chunk
        return buf

    def recv_bytes(self) -> bytearray:
        (length,) = _HEADER.unpack(self._recv_exact(_HEADER.size))
        if length > MAX_FRAME_BYTES:
            raise ConnectionError(f"frame of {length} bytes exceeds the limit: corrupt stream")
        return self._recv_exact(length)

    def recv(self) -> object:
        return pickle.loads(self.recv_bytes())

    def settimeout(self, seconds: float | None) -> None:
        self.sock.settimeout(seconds)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def _digest(key: bytes, challenge: bytes) -> bytes:
    return hmac.new(key, challenge, hashlib.sha256).digest()


def _prove_and_verify(conn: Connection, key: bytes, server: bool) -> None:
    """Mutual challenge-response; raises ConnectionError when the peer does not know ``key``."""
    def challenge_peer() -> None:
        challenge = os.urandom(_CHALLENGE_BYTES)
        conn.send_bytes(challenge)
        if not hmac.compare_digest(bytes(conn.recv_bytes()), _digest(key, challenge)):
            raise ConnectionError("peer failed authentication (wrong tensor-parallel key)")

    def answer_peer() -> None:
        challenge = conn.recv_bytes()
        if len(challenge) != _CHALLENGE_BYTES:
            raise ConnectionError("malformed authentication challenge")
        conn.send_bytes(_digest(key, bytes(challenge)))

    first, second = (challenge_peer, answer_peer) if server else (answer_peer, challenge_peer)
    first()
    second()


def _tune(sock: socket.socket) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Listener:
    """The engine's end: ranks connect here. ``address`` is the resolved address (real port)."""

    def __init__(self, address: str, key: bytes, backlog: int = 64):
        family, where = _parse(address)
        self.key = key
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        if family != socket.AF_UNIX:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(where)
        self.sock.listen(backlog)
        if family == socket.AF_UNIX:
            self.address = address
        else:
            host, port = self.sock.getsockname()[:2]
            self.address = f"tcp:{where[0]}:{port}"

    def accept(self, timeout: float) -> Connection:
        """The next authenticated connection; TimeoutError when none arrives within ``timeout``."""
        self.sock.settimeout(timeout)
        sock, _ = self.sock.accept()
        sock.settimeout(timeout)  # a peer that stalls mid-handshake must not stall us
        _tune(sock)
        conn = Connection(sock)
        try:
            _prove_and_verify(conn, self.key, server=True)
        except (OSError, ConnectionError):
            conn.close()
            raise
        sock.settimeout(None)
        return conn

    def close(self) -> None:
        family = self.sock.family
        self.sock.close()
        path = _parse(self.address)[1]
        if family == socket.AF_UNIX and not path.startswith("\0"):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def connect(address: str, key: bytes, timeout: float) -> Connection:
    """Connect to the engine at ``address`` and authenticate both ways."""
    family, where = _parse(address)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(where)
    _tune(sock)
    conn = Connection(sock)
    _prove_and_verify(conn, key, server=False)
    sock.settimeout(None)
    return conn
