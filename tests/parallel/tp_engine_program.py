"""An engine process: builds an LLMEngine with tensor_parallel_size=2, prints the pids of its
torchrun agent and ranks as one JSON line, then waits.

test_tp_lifecycle.py SIGKILLs this process and checks that the group dies with it.
"""
import json
import sys
import time

from paged import EngineConfig, LLMEngine


def main(model_dir: str) -> None:
    engine = LLMEngine(EngineConfig(model=model_dir, tensor_parallel_size=2, num_kv_blocks=16, dtype="float32"))
    group = engine.performance_info()["tensor_parallel"]
    print(json.dumps({"agent": group["agent_pid"], "ranks": [r["pid"] for r in group["ranks"]]}), flush=True)
    while True:
        time.sleep(60)


if __name__ == "__main__":
    main(sys.argv[1])
