"""Device mesh, parameter / state sharding rules and multi-host batch assembly.

Everything is expressed with `jax.jit` + `NamedSharding` over one `Mesh` built from `config.mesh`:

  * `('data', n)`: data parallelism; the batch's leading axis is split over it.
  * `('fsdp', m)` (optional): FSDP / ZeRO-3 style. The batch is split over it too, and parameters
    whose path matches an `'fsdp'` rule in `config.sharding_rules` are split over it along their
    largest dimension divisible by `m` (for the 2× / 3× decoders, §4.3); XLA inserts the
    all-gathers and reduce-scatters.

Optimizer state leaves that mirror a parameter (Adam's `mu` / `nu`) get that parameter's sharding;
everything else (step, counters) is replicated.

Multi-host: call `initialize_distributed(config)` before anything else touches JAX, feed each
process its slice of the global batch, and `global_batch` assembles the global `jax.Array`s.
"""

import math
from typing import Any, Mapping

from absl import logging
import jax
import ml_collections
from ml_collections import config_dict
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from ddep_jax import optimizer as optimizer_lib

MESH_AXES = ('data', 'fsdp')
RULES = ('replicate', 'fsdp')


def default_config() -> ml_collections.ConfigDict:
  """Fields owned by this module: `mesh`, `sharding_rules`, `distributed`.

  For a 2× / 3× decoder on many devices, e.g. mesh=(('data', -1), ('fsdp', 4)) and
  sharding_rules=(('decoder/.*', 'fsdp'), ('.*', 'replicate')).
  """
  return ml_collections.ConfigDict(dict(
      mesh=(('data', -1),),
      sharding_rules=(('.*', 'replicate'),),
      # Typed placeholders (None unless set), so `--config.distributed.process_id=1` works.
      distributed=dict(initialize=False,
                       coordinator_address=config_dict.placeholder(str),
                       num_processes=config_dict.placeholder(int),
                       process_id=config_dict.placeholder(int)),
  ))


def initialize_distributed(config: ml_collections.ConfigDict) -> bool:
  """Calls `jax.distributed.initialize` if `config.distributed.initialize`; returns whether it did.

  Must run before any other JAX call. On Cloud TPU (and SLURM / Open MPI clusters) leave the
  coordinator settings None: JAX detects them. Elsewhere set `coordinator_address`
  ('host:port' of process 0), `num_processes` and `process_id` together.
  """
  dist = config.distributed
  if not dist.initialize:
    return False
  explicit = {k: dist[k] for k in ('coordinator_address', 'num_processes', 'process_id')}
  given = [k for k, v in explicit.items() if v is not None]
  if given and len(given) != len(explicit):
    missing = sorted(set(explicit) - set(given))
    raise ValueError(f'config.distributed sets {given} but not {missing}: set all three '
                     '(coordinator_address, num_processes, process_id) or none (auto-detect).')
  jax.distributed.initialize(**explicit)
  logging.info('jax.distributed: process %d of %d, %d local / %d global devices.',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


def make_mesh(config: ml_collections.ConfigDict, devices=None) -> Mesh:
  """The device mesh described by `config.mesh`, e.g. `(('data', -1), ('fsdp', 2))`.

  One axis size may be -1 (all remaining devices). `devices` defaults to `jax.devices()`.
  """
  devices = list(jax.devices() if devices is None else devices)
  axes = [(str(name), int(size)) for name, size in config.mesh]
  names = [name for name, _ in axes]
  unknown = [n for n in names if n not in MESH_AXES]
  if unknown or len(set(names)) != len(names) or 'data' not in names:
    raise ValueError(f'config.mesh={config.mesh}: axis names must be distinct, include "data", and '
                     f'come from {MESH_AXES}.')
  sizes = [size for _, size in axes]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f'config.mesh={config.mesh}: sizes must be positive, with at most one -1.')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f'config.mesh={config.mesh}: {len(devices)} devices are not divisible by '
                       f'the fixed axis sizes (product {known}).')
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f'config.mesh={config.mesh} needs {math.prod(sizes)} devices but '
                     f'{len(devices)} are present; use -1 for the data axis size.')
  # Auto axes: GSPMD propagates shardings through the model, which needs no sharding annotations.
  return jax.make_mesh(tuple(sizes), tuple(names), axis_types=(AxisType.Auto,) * len(names),
                       devices=devices)


def check_batch_sizes(config: ml_collections.ConfigDict, device_count: int,
                      process_count: int = 1, *, where: str = 'this job',
                      include_train: bool = True) -> None:
  """Refuses, before any step, a train or eval batch that cannot be split over the devices.

  Every batch is split evenly over all devices (the data and fsdp axes), each process reading
  its share; an eval batch that does not fit would otherwise fail only at the first evaluation,
  after hours of training. The error gives the command-line overrides that fit.
  """
  if device_count % process_count:
    raise ValueError(f'{device_count} devices cannot be split evenly over {process_count} '
                     'processes.')

  def fitting(batch_size: int) -> int:
    return max(device_count, -(-batch_size // device_count) * device_count)

  problems = []
  batches = [('config.input.batch_size', int(config.input.batch_size))] if include_train else []
  evals = config.evals
  batches += [(f'config.evals.{name}.batch_size', int(evals[name].batch_size))
               for name in sorted(evals)]
  for key, batch_size in batches:
    if batch_size <= 0 or batch_size % device_count:
      problems.append((key, batch_size))
  if problems:
    found = ', '.join(f'{key}={size}' for key, size in problems)
    overrides = ' '.join(f'--{key}={fitting(size)}' for key, size in problems)
    note = (' A larger train batch changes the optimisation (the paper\'s schedule); or run on a '
            'slice whose device count divides it.' if problems[0][0] == 'config.input.batch_size'
            else ' The eval batch size does not change the results.')
    processes = f'{process_count} process' + ('es' if process_count != 1 else '')
    raise ValueError(f'{found}: every global batch must be a multiple of the {device_count} '
                     f'devices of {where} ({processes}). Pass {overrides}.{note}')


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every mesh axis (FSDP is data-parallel too)."""
  return NamedSharding(mesh, P(mesh.axis_names))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict:
  """Assembles this process's slice of the batch into global `jax.Array`s sharded on the batch.

  Every process passes arrays with the same per-process batch size; the global batch is their
  concatenation in process order.
  """
  sharding = batch_sharding(mesh)
  local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
  out = {}
  for key, value in local_batch.items():
    value = np.asarray(value)
    if value.ndim == 0 or value.shape[0] % local_devices:
      raise ValueError(
          f'batch[{key!r}] has shape {value.shape}: its leading (batch) size must be divisible by '
          f'the {local_devices} devices of this process. Make input.batch_size a multiple of '
          f'{jax.device_count()} (all devices).')
    out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out


def _fsdp_spec(shape: tuple, axis_size: int) -> P:
  """Splits the largest dimension divisible by `axis_size` over 'fsdp' (None if there is none).

  Ties go to the later dimension (the output features of Dense / Conv kernels).
  """
  for dim in sorted(range(len(shape)), key=lambda d: (-shape[d], -d)):
    if shape[dim] % axis_size == 0 and shape[dim] >= axis_size:
      spec = [None] * len(shape)
      spec[dim] = 'fsdp'
      return P(*spec)
  return None


def param_shardings(params: Any, mesh: Mesh, config: ml_collections.ConfigDict) -> Any:
  """NamedSharding per parameter from `config.sharding_rules` (first full regex match wins)."""
  rules = list(config.sharding_rules)
  for i, (regex, rule) in enumerate(rules):
    if rule not in RULES:
      raise ValueError(f'config.sharding_rules[{i}]=({regex!r}, {rule!r}): rule must be one of '
                       f'{RULES}.')
    if rule == 'fsdp' and 'fsdp' not in mesh.axis_names:
      raise ValueError(f'config.sharding_rules[{i}] asks for "fsdp" but config.mesh={config.mesh} '
                       "has no 'fsdp' axis; e.g. mesh=(('data', -1), ('fsdp', 2)).")
  indices = optimizer_lib.match_rules(params, rules, 'sharding_rules')

  def sharding_for(name, index, leaf):
    if rules[index][1] == 'fsdp':
      spec = _fsdp_spec(tuple(leaf.shape), mesh.shape['fsdp'])
      if spec is not None:
        return NamedSharding(mesh, spec)
      logging.info('sharding: %s %s has no dimension divisible by fsdp=%d; replicated.', name,
                   tuple(leaf.shape), mesh.shape['fsdp'])
    return replicated(mesh)

  names = optimizer_lib.tree_path_names(params)
  return jax.tree.map(sharding_for, names, indices, params)


def state_shardings(abstract_state: Mapping[str, Any], mesh: Mesh,
                    config: ml_collections.ConfigDict) -> dict:
  """Shardings for a train state `{'step', 'params', 'opt_state'}` (abstract or concrete).

  Optimizer-state leaves whose path ends with a parameter's path and whose shape equals it take
  that parameter's sharding; all other leaves are replicated.
  """
  params_sh = param_shardings(abstract_state['params'], mesh, config)
  by_name = {}
  for (path, sh), leaf in zip(jax.tree_util.tree_flatten_with_path(params_sh)[0],
                              jax.tree.leaves(abstract_state['params'])):
    by_name[optimizer_lib.path_name(path)] = (sh, tuple(leaf.shape))

  def mirror(path, leaf):
    parts = optimizer_lib.path_name(path).split('/')
    for start in range(len(parts)):
      match = by_name.get('/'.join(parts[start:]))
      if match is not None and match[1] == tuple(np.shape(leaf)):
        return match[0]
    return replicated(mesh)

  out = {key: jax.tree.map(lambda _: replicated(mesh), value)
         for key, value in abstract_state.items() if key not in ('params', 'opt_state')}
  out['params'] = params_sh
  out['opt_state'] = jax.tree_util.tree_map_with_path(mirror, abstract_state['opt_state'])
  return out
