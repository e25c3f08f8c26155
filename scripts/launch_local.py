"""Start N local processes of one command as a multi-process JAX run on 127.0.0.1.

    python scripts/launch_local.py -n 2 --cpu-devices 2 -- \
        python scripts/generate_sharded.py --model tiny --prompt-ids 1,2,3 --mesh data=2,model=2

Each process gets JAX_COORDINATOR_ADDRESS (127.0.0.1 and a free port), JAX_NUM_PROCESSES and
JAX_PROCESS_ID, which `--coordinator/--num-processes/--process-id` default to. --cpu-devices K
runs on CPU with K virtual devices per process (GPUs: --gpus-per-process G gives process i the
devices i*G .. i*G+G-1). If a process fails or --timeout passes, the others are stopped.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", "--num-processes", type=int, default=2)
    p.add_argument("--cpu-devices", type=int, default=None, help="virtual CPU devices per process")
    p.add_argument("--gpus-per-process", type=int, default=None)
    p.add_argument("--timeout", type=float, default=600, help="seconds before all are stopped")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- command and its arguments")
    args = p.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd or args.num_processes < 1:
        p.error("give -n >= 1 and a command after --")
    addr = f"127.0.0.1:{free_port()}"
    procs = []
    for i in range(args.num_processes):
        env = dict(os.environ, JAX_COORDINATOR_ADDRESS=addr,
                   JAX_NUM_PROCESSES=str(args.num_processes), JAX_PROCESS_ID=str(i))
        if args.cpu_devices:
            env["JAX_PLATFORMS"] = "cpu"
            env["XLA_FLAGS"] = " ".join(
                [f for f in env.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
                + [f"--xla_force_host_platform_device_count={args.cpu_devices}"])
        if args.gpus_per_process:
            g = args.gpus_per_process
            env["JAX_LOCAL_DEVICE_IDS"] = ",".join(str(i * g + k) for k in range(g))
        procs.append(subprocess.Popen(cmd, env=env))
    deadline = time.monotonic() + args.timeout
    status = 0
    try:
        while any(q.poll() is None for q in procs):
            failed = [q.returncode for q in procs if q.returncode not in (None, 0)]
            if failed or time.monotonic() > deadline:
                status = failed[0] if failed else 124
                print("launch_local: " + (f"a process exited with {status}" if failed else
                      f"timed out after {args.timeout:.0f} s") + "; stopping the others",
                      file=sys.stderr)
                break
            time.sleep(0.1)
    finally:
        for q in procs:  # only the processes started here, by handle
            if q.poll() is None:
                q.terminate()
        for q in procs:
            try:
                q.wait(10)
            except subprocess.TimeoutExpired:
                q.kill()
                q.wait()
    return status or next((q.returncode for q in procs if q.returncode), 0)


if __name__ == "__main__":
    sys.exit(main())
