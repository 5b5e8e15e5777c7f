"""The engine <-> rank link and the shared segments, in one process (no ranks)."""
import os
import threading

import pytest
import torch

from paged.parallel.channel import ChannelClosed, Listener, connect
from paged.parallel.executor import TensorParallelExecutor, WorkerGroupSpec
from paged.parallel.shared_segment import SegmentInfo, SharedSegment

KEY = b"k" * 32


@pytest.fixture(params=["unix", "abstract", "tcp"])
def address(request, tmp_path):
    return {"unix": f"unix:{tmp_path / 'engine.sock'}", "abstract": f"unix:@paged-tp-test-{os.getpid()}",
            "tcp": "tcp:127.0.0.1:0"}[request.param]


def accept_in_background(listener):
    accepted = {}

    def target():
        try:
            accepted["conn"] = listener.accept(timeout=10)
        except Exception as exc:  # noqa: BLE001 - handed to the test
            accepted["error"] = exc
    thread = threading.Thread(target=target)
    thread.start()
    return thread, accepted


def test_messages_and_raw_frames_cross_in_order(address):
    listener = Listener(address, KEY)
    thread, accepted = accept_in_background(listener)
    client = connect(listener.address, KEY, timeout=10)
    thread.join()
    server = accepted["conn"]
    payload = os.urandom(200_000)  # above the size that is sent in one write
    server.send({"plan": [1, 2, 3]})
    server.send_bytes(payload)
    assert client.recv() == {"plan": [1, 2, 3]}
    assert client.recv_bytes() == payload
    client.close()
    with pytest.raises(ChannelClosed):
        server.recv()
    server.close()
    listener.close()


def test_a_peer_with_the_wrong_key_is_refused_before_anything_is_unpickled(address):
    listener = Listener(address, KEY)
    thread, accepted = accept_in_background(listener)
    with pytest.raises((ConnectionError, OSError)):
        connect(listener.address, b"x" * 32, timeout=10)
    thread.join()
    assert isinstance(accepted.get("error"), ConnectionError)
    listener.close()


def test_segment_maps_the_same_memory_in_another_mapping():
    segment = SharedSegment.create(64, "test")
    other = SharedSegment.attach(segment.info)
    other.payload[:4] = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)
    assert segment.payload[:4].tolist() == [1, 2, 3, 4]
    segment.release_fd()


def test_segment_with_another_nonce_is_not_attached():
    segment = SharedSegment.create(64, "test")
    info = segment.info
    assert SharedSegment.attach(SegmentInfo(info.pid, info.fd, info.nonce + 1, info.payload_bytes)) is None
    segment.release_fd()


def test_unsplittable_model_is_refused_before_any_process_starts(tiny_llama_dir):
    spec = WorkerGroupSpec(model=str(tiny_llama_dir), world_size=3, num_blocks=4, num_cpu_blocks=0,
                           block_size=16, max_logits_rows=1)
    with pytest.raises(ValueError, match="8 attention heads do not divide by tensor_parallel_size 3"):
        TensorParallelExecutor(spec)


def test_multi_node_spec_needs_an_engine_address_and_a_shared_key(tiny_llama_dir):
    with pytest.raises(ValueError, match="engine_address"):
        WorkerGroupSpec(model=str(tiny_llama_dir), world_size=2, num_blocks=4, num_cpu_blocks=0, block_size=16,
                        max_logits_rows=1, nnodes=2, rdzv_endpoint="127.0.0.1:1")


def test_engine_spec_takes_its_sizes_from_the_engine_config(tiny_llama_dir):
    from paged.config import EngineConfig

    config = EngineConfig(model=str(tiny_llama_dir), tensor_parallel_size=2, max_num_seqs=32, block_size=8, seed=3)
    spec = WorkerGroupSpec.for_engine(config, num_blocks=100, num_cpu_blocks=10, heartbeat_timeout_s=9.0)
    assert (spec.world_size, spec.max_logits_rows, spec.block_size, spec.num_blocks, spec.num_cpu_blocks,
            spec.seed, spec.heartbeat_timeout_s) == (2, 32, 8, 100, 10, 3, 9.0)
