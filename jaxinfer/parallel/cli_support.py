"""Command-line support for parallel runs, wired into `jaxinfer.cli` and the scripts.

    add_parallel_args(parser)      --mesh, --pmap, --strict-mesh, --coordinator, --num-processes,
                                   --process-id, --distributed-timeout, --all-processes-print
    placement = setup_parallel(args)   # before loading: joins jax.distributed, checks --mesh
    model = placement.apply(model)     # after loading: shards params (default mesh from shapes)
    out["placement"] = placement.info()
    devices_command(args)          # `jaxinfer devices`: devices, processes, the mesh chosen
"""

from __future__ import annotations

import argparse
import functools
import json

from jaxinfer.errors import InputError
from jaxinfer.parallel import distributed
from jaxinfer.parallel.sharding import DATA, MESH_AXES, MODEL


def add_parallel_args(parser: argparse.ArgumentParser) -> None:
    """The parallel flags (generate, bench, eval, devices and the scripts)."""
    g = parser.add_argument_group("parallel")
    g.add_argument("--mesh", default=None, metavar="data=D,model=M",
                   help="device mesh: D-way data parallel (batch) x M-way tensor parallel "
                        "(heads, MLP, vocabulary); an axis left out is 1 (default: chosen from "
                        "the devices and the model's shapes)")
    g.add_argument("--pmap", action="store_true",
                   help="data parallel with jax.pmap over the local devices, params replicated "
                        "(--mesh data=D picks D devices)")
    g.add_argument("--strict-mesh", action="store_true",
                   help="fail when a model dimension does not divide its mesh axis "
                        "(default: replicate that dimension and say so)")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help=f"multi-process run: process 0's address (or ${distributed.ENV_COORDINATOR})")
    g.add_argument("--num-processes", type=int, default=None,
                   help=f"multi-process run: number of processes (or ${distributed.ENV_NUM_PROCESSES})")
    g.add_argument("--process-id", type=int, default=None,
                   help=f"multi-process run: this process, 0..N-1 (or ${distributed.ENV_PROCESS_ID})")
    g.add_argument("--distributed-timeout", type=float, default=distributed.DEFAULT_TIMEOUT_S,
                   metavar="SECONDS", help="how long to wait for the coordinator and the other "
                                           "processes (default %(default)s)")
    g.add_argument("--all-processes-print", action="store_true",
                   help="in a multi-process run, every process prints (default: process 0 only)")


def parse_mesh(text: str) -> tuple[int, int]:
    """'data=2,model=4' -> (2, 4); an axis left out is 1. InputError on bad syntax."""
    sizes = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep:
            raise InputError(f"--mesh: expected AXIS=SIZE, got {part!r} (e.g. data=2,model=4)")
        if name not in MESH_AXES:
            raise InputError(f"--mesh: unknown axis {name!r} (axes: {', '.join(MESH_AXES)})")
        if name in sizes:
            raise InputError(f"--mesh: axis {name!r} given twice")
        if not value.strip().isdigit() or int(value) < 1:
            raise InputError(f"--mesh: size of {name!r} must be a positive integer, got {value!r}")
        sizes[name] = int(value)
    if not sizes:
        raise InputError(f"--mesh: no axis given in {text!r} (e.g. data=2,model=4)")
    return sizes.get(DATA, 1), sizes.get(MODEL, 1)


def setup_parallel(args):
    """Validate the parallel flags, join a multi-process run, and return the Placement
    (resolved against the model's shapes by `placement.apply(model)`). Call before loading.

    `placement.prints` is False on processes other than 0 unless --all-processes-print:
    commands print their results only where it is True.
    """
    from jaxinfer.parallel.placement import Placement

    mesh = parse_mesh(args.mesh) if getattr(args, "mesh", None) else None
    if getattr(args, "pmap", False) and mesh is not None and mesh[1] != 1:
        raise InputError("--pmap is data parallel only: use --mesh data=D with it (model=1)")
    distributed.initialize(getattr(args, "coordinator", None),
                           getattr(args, "num_processes", None), getattr(args, "process_id", None),
                           timeout_s=getattr(args, "distributed_timeout",
                                             distributed.DEFAULT_TIMEOUT_S))
    prints = distributed.is_primary() or getattr(args, "all_processes_print", False)
    return Placement(mesh, pmap=getattr(args, "pmap", False),
                     strict=getattr(args, "strict_mesh", False), prints=prints)


def devices_report(placement, config) -> dict:
    """Devices, processes and the placement that would be used for `config`."""
    import jax

    placement.check(config)
    return {
        "devices": [{"id": d.id, "platform": d.platform, "kind": d.device_kind,
                     "process": d.process_index} for d in jax.devices()],
        "num_devices": jax.device_count(), "local_devices": jax.local_device_count(),
        "num_processes": jax.process_count(), "process_index": jax.process_index(),
        "placement": placement.info(), "notes": placement.notes,
    }


def devices_command(args) -> int:
    """`jaxinfer devices`: print the devices, processes and the mesh that would be chosen."""
    from jaxinfer.loading import load_config

    placement = setup_parallel(args)
    config = load_config(args.model)
    rep = devices_report(placement, config)
    from jaxinfer import kernels

    rep["cpu_kernels"] = kernels.describe()
    if getattr(args, "json", False):
        lines = [json.dumps(rep)]
    else:
        lines = [f"{rep['num_devices']} devices over {rep['num_processes']} process(es) "
                 f"(this is process {rep['process_index']}, {rep['local_devices']} local "
                 "devices):"]
        lines += [f"  {d['id']:>3}  {d['platform']:<5} {d['kind']:<20} process {d['process']}"
                  for d in rep["devices"]]
        lines += [f"{args.model}: heads {config.n_heads}, kv heads {config.n_kv_heads}, "
                  f"mlp {config.d_ff}, vocab {config.vocab_size}", placement.describe(),
                  rep["cpu_kernels"]]
    if placement.prints:
        print("\n".join(lines))
    return 0


@functools.cache
def _jitted_init():
    """models.init_params as one jitted call (eager init runs op by op: slow, above all in a
    multi-process run)."""
    import jax

    import models

    return jax.jit(models.init_params, static_argnums=0)


def tiny_model(seed: int = 0, **overrides):
    """A tiny random Llama (`models.LlamaConfig.tiny`, params from `seed`), no tokenizer: the
    same on every process, for multi-process tests and demos."""
    import jax

    import models
    from jaxinfer.model import Model

    config = models.LlamaConfig.tiny(**overrides)
    params = _jitted_init()(config, jax.random.key(seed))
    return Model(config=config, params=params, tokenizer=None, source=f"tiny(seed={seed})")
