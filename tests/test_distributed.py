"""Multi-process runs on 127.0.0.1: subprocesses with their own virtual CPU devices.

Every subprocess has a bounded timeout; the launcher stops its processes when one fails or
its own timeout passes, and `subprocess.run` kills the launcher if that ever hangs.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxinfer.errors import InputError
from jaxinfer.generate import Request, generate_ids
from jaxinfer.parallel import distributed
from jaxinfer.parallel.cli_support import tiny_model
from jaxinfer.sampling import Sampling

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(ROOT / "scripts" / "generate_sharded.py")
PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [10, 11], [12]]
NEW_TOKENS = 6


def _env(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gen_args() -> list[str]:
    args = ["--model", "tiny", "--max-new-tokens", str(NEW_TOKENS), "--json"]
    for p in PROMPTS:
        args += ["--prompt-ids", ",".join(map(str, p))]
    return args


def test_two_processes_match_one_process():
    model = tiny_model(seed=0)
    req = Request(prompts=PROMPTS, sampling=[Sampling()] * len(PROMPTS),
                  max_new_tokens=NEW_TOKENS, stop_token_ids=())
    ref = [c.token_ids for c in generate_ids(model, req)]
    cmd = [sys.executable, str(ROOT / "scripts" / "launch_local.py"), "-n", "2",
           "--cpu-devices", "2", "--timeout", "150", "--", sys.executable, SCRIPT,
           *_gen_args(), "--mesh", "data=2,model=2", "--distributed-timeout", "60"]
    out = subprocess.run(cmd, env=_env(2), capture_output=True, text=True, timeout=200)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, out.stdout  # only process 0 prints
    res = json.loads(lines[0])
    assert res["placement"] == {"mesh": {"data": 2, "model": 2}, "num_devices": 4,
                                "num_processes": 2, "pmap": False}
    assert [o["token_ids"] for o in res["outputs"]] == ref


def _run_alone(*flags, timeout_s=3):
    """One process of a 2-process run whose peer never comes: the error and the time taken."""
    cmd = [sys.executable, SCRIPT, *_gen_args(), "--distributed-timeout", str(timeout_s), *flags]
    t0 = time.monotonic()
    out = subprocess.run(cmd, env=_env(2), capture_output=True, text=True, timeout=60)
    return out, time.monotonic() - t0


def test_unreachable_coordinator_times_out_clearly():
    addr = f"127.0.0.1:{_free_port()}"  # nothing listens there
    out, took = _run_alone("--coordinator", addr, "--num-processes", "2", "--process-id", "1")
    assert out.returncode == 2
    assert f"error: could not reach the coordinator at {addr} within 3 s" in out.stderr
    assert took < 30


def test_missing_processes_time_out_clearly():
    addr = f"127.0.0.1:{_free_port()}"
    out, took = _run_alone("--coordinator", addr, "--num-processes", "2", "--process-id", "0")
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.startswith("error: not all 2 processes joined the run within 3 s")
    assert took < 30


def test_inconsistent_process_count_across_processes():
    """Process 1 is told there are 3 processes; the run has 2: it stops with an InputError."""
    env = dict(_env(2), JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}")
    base = [sys.executable, SCRIPT, *_gen_args(), "--mesh", "data=2", "--distributed-timeout",
            "30"]
    p0 = subprocess.Popen(base + ["--num-processes", "2", "--process-id", "0"], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        p1 = subprocess.run(base + ["--num-processes", "3", "--process-id", "1"], env=env,
                            capture_output=True, text=True, timeout=90)
    finally:
        p0.kill()  # its peer is gone: it cannot finish (only the process started here)
        p0.communicate(timeout=30)
    assert p1.returncode == 2, p1.stderr[-2000:]
    assert ("error: inconsistent process counts: this process was given --num-processes 3, "
            "but the run at") in p1.stderr


@pytest.mark.parametrize("kwargs,msg", [
    (dict(coordinator="127.0.0.1:1234", num_processes=2, process_id=2),
     "--process-id 2 is inconsistent with --num-processes 2"),
    (dict(coordinator="127.0.0.1:1234", num_processes=2, process_id=-1),
     "--process-id -1 is inconsistent"),
    (dict(coordinator="127.0.0.1:1234", num_processes=0, process_id=0), "must be >= 1"),
    (dict(coordinator="127.0.0.1", num_processes=2, process_id=0), "HOST:PORT"),
    (dict(num_processes=2, process_id=0), "missing: --coordinator"),
])
def test_inconsistent_settings(kwargs, msg):
    with pytest.raises(InputError, match=msg):
        distributed.settings_from(**kwargs, env={})


def test_settings_from_environment():
    env = {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:5000", "JAX_NUM_PROCESSES": "4",
           "JAX_PROCESS_ID": "3"}
    s = distributed.settings_from(env=env)
    assert (s.coordinator, s.num_processes, s.process_id) == ("127.0.0.1:5000", 4, 3)
    assert distributed.settings_from(process_id=1, env=env).process_id == 1  # flags win
    assert distributed.settings_from(env={}) is None
    with pytest.raises(InputError, match="JAX_PROCESS_ID must be an integer"):
        distributed.settings_from(env=dict(env, JAX_PROCESS_ID="x"))
