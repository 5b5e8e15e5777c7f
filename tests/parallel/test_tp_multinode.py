"""Two "nodes" of one rank each, joined by torchrun's c10d rendezvous on loopback: the engine starts
node 0, this test starts node 1 with the command the engine's configuration gives for other nodes.
The ranks all-reduce through the process group (gloo), as ranks on several hosts do."""
import os
import subprocess

from paged import LLM, EngineConfig, SamplingParams
from paged.parallel.launch_spec import remote_node_command
from tp_helpers import free_port, subprocess_env, wait_gone
from tp_reference import HFReference, compare_greedy

PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n\n" * 3, "x"]


def test_two_node_rendezvous_on_loopback_gives_the_single_device_tokens(tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("PAGED_TP_AUTHKEY", os.urandom(32).hex())
    settings = dict(block_size=16, num_kv_blocks=32, max_num_batched_tokens=32, dtype="float32")
    two_nodes = dict(tensor_parallel_size=2, tensor_parallel_nnodes=2,
                     tensor_parallel_rdzv_endpoint=f"127.0.0.1:{free_port()}",
                     tensor_parallel_engine_address=f"tcp:127.0.0.1:{free_port()}")
    env, argv = remote_node_command(EngineConfig(model=str(tiny_llama_dir), **two_nodes, **settings))
    other_node = subprocess.Popen(argv, env={**subprocess_env(), **env})
    llm = None
    try:
        llm = LLM(str(tiny_llama_dir), **two_nodes, **settings)
        group = llm.engine.performance_info()["tensor_parallel"]
        assert group["nnodes"] == 2 and [r["all_reduce"] for r in group["ranks"]] == ["gloo", "gloo"]
        params = SamplingParams(max_tokens=16, temperature=0.0)
        got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
        want = [o.outputs[0].token_ids for o in LLM(str(tiny_llama_dir), **settings).generate(PROMPTS, params,
                                                                                           use_tqdm=False)]
        compare_greedy(HFReference(tiny_llama_dir), PROMPTS, got, want)
        pids = [r["pid"] for r in group["ranks"]]
        llm.close()
        assert other_node.wait(timeout=60) == 0
        assert wait_gone(pids, 20) == []
    finally:
        if llm is not None:
            llm.close()
        if other_node.poll() is None:
            other_node.kill()
