"""The TorchServe adapter's pieces without a server: request classification, secrets in logs, the
locked backend socket and the parent watchdog."""
from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import textwrap
import threading

import psutil
import pytest

from paged_handler.errors import RequestError
from paged_handler.ts_adapter import LockedSocket, body_of, is_describe, is_rest, redacted, route_of, \
    serialize_backend_writes

HTTP = {"Host": "127.0.0.1:8080", "Content-Length": "20", "url_path": "", "explain": "False"}


# ---- describe: only the management API's call ---------------------------------------------------
def test_the_management_describe_call_is_recognized():
    assert is_describe({"describe": "True", "Host": "127.0.0.1:8081", "User-Agent": "curl"}, {})
    assert is_describe({"describe": "True"}, {})  # gRPC management


@pytest.mark.parametrize("headers, row", [
    ({**HTTP, "describe": "True"}, {"body": b"{}"}),                     # /predictions with the header
    ({"Host": "h", "describe": "True"}, {"body": b""}),                  # /invocations with a body
    ({"Host": "h", "describe": "True"}, {"model_name": b"llm"}),          # query parameters
    ({"Host": "h", "describe": "True", "Content-Type": "application/x-www-form-urlencoded"}, {}),
    ({"Host": "h", "describe": "True", "content-type": "multipart/form-data; boundary=x"}, {}),
    ({"Host": "h", "Describe": "True"}, {}),                             # not the frontend's spelling
    ({"Host": "h", "describe": "true"}, {}),
])
def test_an_inference_request_carrying_a_describe_header_is_not_a_describe(headers, row):
    assert not is_describe(headers, row)


def test_rest_and_grpc_requests_are_told_apart_by_their_http_headers():
    assert is_rest(HTTP) and is_rest({"Host": "x"}) and is_rest({"content-length": "0"})
    assert not is_rest({}) and not is_rest({"data": {"content-type": None}})


@pytest.mark.parametrize("path, route", [("", "native"), ("predictions", "native"), ("v1/completions", "completions"),
                                         ("v1/chat/completions", "chat"), ("v1/models", "models"),
                                         ("/v1/completions/", "completions")])
def test_routes(path, route):
    assert route_of({"url_path": path}, rest=True) == route
    assert route_of({}, rest=False) == "grpc"


def test_an_unknown_route_is_a_404():
    with pytest.raises(RequestError) as info:
        route_of({"url_path": "v1/embeddings"}, rest=True)
    assert info.value.status == 404


def test_only_json_bodies_are_accepted_over_rest():
    assert body_of({"body": {"prompt": "x"}}, {"body": {"content-type": "application/json"}}, rest=True)
    assert body_of({"body": b"{}"}, {"body": {"content-type": ""}}, rest=True) == b"{}"
    for row, headers in (({"body": "x"}, {"body": {"content-type": "text/plain"}}), ({"prompt": b"x"}, {})):
        with pytest.raises(RequestError) as info:
            body_of(row, headers, rest=True)
        assert info.value.status == 400 and "Content-Type" in info.value.message
    assert body_of({"data": b"{}"}, {}, rest=False) == b"{}"


def test_credentials_never_reach_the_log():
    headers = {"Authorization": "Bearer s3cret", "X-Api-Key": "k", "Cookie": "c", "proxy-authorization": "p",
               "x-auth-token": "t", "Host": "h", "url_path": "v1/completions"}
    shown = redacted(headers)
    assert "s3cret" not in repr(shown) and {shown[k] for k in headers if k not in ("Host", "url_path")} == \
        {"<redacted>"}
    assert shown["Host"] == "h" and shown["url_path"] == "v1/completions"


# ---- one writer at a time on the backend socket ---------------------------------------------------
def test_concurrent_writes_through_the_locked_socket_never_interleave():
    a, b = socket.socketpair()
    locked = LockedSocket(a)
    size, per_thread = 1 << 20, 4
    received = bytearray()
    reader = threading.Thread(target=lambda: received.extend(_read_all(b, 2 * per_thread * (4 + size))))
    reader.start()

    def write(tag: bytes):
        for _ in range(per_thread):
            locked.sendall(struct.pack("!i", size) + tag * size)
    writers = [threading.Thread(target=write, args=(t,)) for t in (b"A", b"B")]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    reader.join(60)
    a.close()
    b.close()
    pos, frames = 0, []
    while pos < len(received):
        (n,) = struct.unpack("!i", received[pos:pos + 4])
        body = bytes(received[pos + 4:pos + 4 + n])
        assert len(set(body)) == 1, "two messages interleaved on the socket"
        frames.append(body[:1])
        pos += 4 + n
    assert sorted(frames) == [b"A"] * per_thread + [b"B"] * per_thread


def _read_all(sock, total: int) -> bytes:
    data = bytearray()
    while len(data) < total:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        data.extend(chunk)
    return bytes(data)


def test_torchserve_hands_every_writer_the_locked_socket():
    from ts.service import Service

    serialize_backend_writes()
    serialize_backend_writes()  # idempotent
    service = Service.__new__(Service)
    a, b = socket.socketpair()
    try:
        service.set_cl_socket(a)
        assert isinstance(service.cl_socket, LockedSocket) and service.cl_socket.fileno() == a.fileno()
    finally:
        a.close()
        b.close()


# ---- the worker does not outlive its parent -------------------------------------------------------
ORPHAN = textwrap.dedent("""
    import os, subprocess, sys, time
    if sys.argv[1] == "parent":
        child = subprocess.Popen([sys.executable, __file__, "child"])
        time.sleep(600)
    else:
        sys.path.insert(0, {root!r})
        import threading
        from paged_handler.lifecycle import ParentWatchdog
        ParentWatchdog(interval_s=0.2).start()
        threading.Thread(target=lambda: time.sleep(600)).start()  # a non-daemon thread, like the engine's
        print(os.getpid(), flush=True)  # (through the parent's stdout) the watchdog runs
        time.sleep(600)
""")


def test_the_watchdog_ends_a_process_whose_parent_died(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = tmp_path / "orphan.py"
    script.write_text(ORPHAN.format(root=root))
    parent = subprocess.Popen([sys.executable, str(script), "parent"], stdout=subprocess.PIPE, text=True)
    try:
        child = psutil.Process(int(parent.stdout.readline()))
        parent.kill()
        parent.wait(30)
        child.wait(60)  # TimeoutExpired if the child outlives its parent
    finally:
        parent.kill()
