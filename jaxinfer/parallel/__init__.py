"""Parallel inference: meshes and logical-axis sharding rules, pmap, multi-process runs.

See docs/PARALLEL.md. Main entry points:

  Placement(mesh=(data, model) | None, pmap=False, strict=False).apply(model) -> model
  shard_params(params, config, mesh), make_mesh(data, model), RULES, spec_for(...)
  distributed.initialize(coordinator, num_processes, process_id)
  cli_support: add_parallel_args(parser), setup_parallel(args), devices_command(args)
"""

from jaxinfer.parallel.placement import PlacedModel, Placement, place_model
from jaxinfer.parallel.sharding import (
    DATA,
    MODEL,
    RULES,
    Report,
    StateSharding,
    cache_specs,
    default_mesh_shape,
    make_mesh,
    param_shardings,
    shard_params,
    spec_for,
)

__all__ = [
    "DATA", "MODEL", "RULES", "PlacedModel", "Placement", "Report", "StateSharding",
    "cache_specs", "default_mesh_shape", "make_mesh", "param_shardings", "place_model",
    "shard_params", "spec_for",
]
