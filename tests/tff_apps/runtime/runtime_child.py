"""Child process for test_runtime.py: python runtime_child.py SCENARIO [LOG_PATH].

Each `with Runtime()` session checks x+1 on the worker, prints the worker pid
and, once the block is left, whether the worker was already gone (stopped by
__exit__, not by PDEATHSIG when this process dies) and SIGTERM restored.
Scenarios (few processes: each spends ~8 s importing TF):
  exit     blocks left normally, by a ValueError (caught outside the block),
           then by SIGTERM, which ends this process with code 143
  signals  a block left by SIGINT (KeyboardInterrupt caught outside), then one
           waiting to be SIGKILLed
"""

import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import tensorflow_federated as tff

from tff_apps.runtime.context import Runtime

add_one = tff.tensorflow.computation(lambda x: x + 1.0, np.float32)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def session(action: str, log_path: Path | None = None) -> None:
    pid = None
    try:
        with Runtime(log_path=log_path) as runtime:
            pid = runtime.worker_pid
            print(f"WORKER_PID {pid} RESULT {add_one(np.float32(41.0))}", flush=True)
            if action == "raise":
                raise ValueError("boom inside the runtime")
            while action == "wait":
                time.sleep(0.05)
    finally:
        if pid is not None:
            restored = signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
            print(f"AFTER_EXIT {pid} gone={_gone(pid)} sigterm_restored={restored}", flush=True)


def main() -> None:
    scenario = sys.argv[1]
    if scenario == "exit":
        session("return", Path(sys.argv[2]) if len(sys.argv) > 2 else None)
        try:
            session("raise")
        except ValueError:
            print("CAUGHT ValueError", flush=True)
        session("wait")
    elif scenario == "signals":
        try:
            session("wait")
        except KeyboardInterrupt:
            print("CAUGHT KeyboardInterrupt", flush=True)
        session("wait")
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")


if __name__ == "__main__":
    main()
