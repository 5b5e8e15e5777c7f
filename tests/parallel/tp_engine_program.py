"""A stand-in engine process: starts a 2-rank group, prints its pids as one JSON line, waits.

test_tp_lifecycle.py SIGKILLs this process and checks that the group dies with it.
"""
import json
import sys
import time

from paged.parallel.executor import TensorParallelExecutor, WorkerGroupSpec


def main(model_dir: str) -> None:
    executor = TensorParallelExecutor(WorkerGroupSpec(model=model_dir, world_size=2, num_blocks=16,
                                                      num_cpu_blocks=0, block_size=16, max_logits_rows=4))
    print(json.dumps({"agent": executor.agent_pid, "ranks": [r["pid"] for r in executor.describe()]}), flush=True)
    while True:
        time.sleep(60)


if __name__ == "__main__":
    main(sys.argv[1])
