"""The engine <-> rank link and the shared segments, in one process (no ranks)."""
import os
import threading

import pytest
import torch

from paged.config import EngineConfig
from paged.parallel.channel import ChannelClosed, Listener, connect
from paged.parallel.executor import TensorParallelExecutor
from paged.parallel.launch_spec import WorkerGroupSpec
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
    spec = WorkerGroupSpec(EngineConfig(model=str(tiny_llama_dir), tensor_parallel_size=3, dtype="float32"), num_blocks=4,
                           num_cpu_blocks=0)
    with pytest.raises(ValueError, match="8 attention heads do not divide by tensor_parallel_size 3"):
        TensorParallelExecutor(spec)


def multi_node_config(model_dir) -> EngineConfig:
    return EngineConfig(model=str(model_dir), tensor_parallel_size=2, tensor_parallel_nnodes=2,
                        tensor_parallel_rdzv_endpoint="127.0.0.1:1", tensor_parallel_engine_address="tcp:127.0.0.1:2", dtype="float32")


def test_multi_node_spec_needs_the_shared_key_from_the_environment(tiny_llama_dir, monkeypatch):
    monkeypatch.delenv("PAGED_TP_AUTHKEY", raising=False)
    with pytest.raises(ValueError, match="PAGED_TP_AUTHKEY"):
        WorkerGroupSpec(multi_node_config(tiny_llama_dir), num_blocks=4, num_cpu_blocks=0)
    monkeypatch.setenv("PAGED_TP_AUTHKEY", "ab" * 32)
    spec = WorkerGroupSpec(multi_node_config(tiny_llama_dir), num_blocks=4, num_cpu_blocks=0)
    env, argv = spec.remote_node_command()
    assert env == {"PAGED_TP_ADDRESS": "tcp:127.0.0.1:2", "PAGED_TP_AUTHKEY": "ab" * 32}
    assert "--nnodes=2" in argv and "--rdzv-endpoint=127.0.0.1:1" in argv


def test_spec_takes_its_sizes_from_the_engine_config(tiny_llama_dir):
    config = EngineConfig(model=str(tiny_llama_dir), tensor_parallel_size=2, max_num_seqs=32, block_size=8, seed=3,
                          tensor_parallel_heartbeat_timeout_s=9.0, dtype="float32")
    spec = WorkerGroupSpec(config, num_blocks=100, num_cpu_blocks=10)
    assert (spec.world_size, spec.nnodes, spec.max_logits_rows, spec.num_blocks, spec.num_cpu_blocks,
            spec.heartbeat_timeout_s) == (2, 1, 32, 100, 10, 9.0)
