"""The optax optimizer: Adam(W), warm-up + cosine decay, freezing by regex, lr / wd multipliers.

Which parameters train is decided by `config.schedule`, with big_vision's semantics: a dict is
one schedule for every parameter; a list of `(path regex, schedule dict or None)` gives each
parameter the schedule of the first regex that fully matches its path (`encoder/block1/...`), and
`None` freezes it. The three regimes of the paper are then

  * DDeP (§4):      schedule = [('encoder/.*', None), ('.*', dict(decay_type='cosine', ...))]
  * DeP (§3):       schedule = dict(decay_type='cosine', ...)    (everything, denoising objective)
  * fine-tuning:    schedule = dict(decay_type='cosine', ...)    (everything, cross-entropy)

Frozen parameters are masked out of every transformation with `optax.masked`, so they carry no
optimizer state (no Adam moments) and receive exactly zero updates (`optax.set_to_zero`). The
train step additionally differentiates only the trainable partition (see `train_step.py`).

The update of a trainable parameter `w` with gradient `g` at step t is

  'adamw':  w -= s_t * (lr * lr_mult * adam(g) + wd * wd_mult * w)
  'adam':   w -= s_t * lr * lr_mult * adam(g + wd * wd_mult * w)

where s_t in [0, mult] is the parameter's schedule (linear warm-up, then cosine / linear decay or
constant). The AdamW weight decay is decoupled from the learning rate as in big_vision (it follows
the schedule's shape but not `lr`), which is why fine-tuning sweeps `lr` and `wd` over the same
range [1e-5, 3e-4] (§5.1). `wd_mults` defaults to kernels only: no decay on biases, norms or
embeddings. 'adam' with wd > 0 is classic L2 regularisation (PyTorch's `Adam(weight_decay=)`).
"""

import re
from typing import Any, Callable, NamedTuple, Sequence

import jax
import ml_collections
from ml_collections import config_dict
import optax

from ddep_jax import config_fields

OPTIMIZERS = ('adam', 'adamw')
DECAY_TYPES = ('cosine', 'linear', 'constant')


def default_config() -> ml_collections.ConfigDict:
  """Fields owned by this module (paper §5.1: Adam, cosine decay; DDeP lr 6e-5 for 1×).

  `schedule` is kept in its list form, `((regex, dict | None), ...)`, so that configs can
  override it with another list (ConfigDict does not let a dict field become a list).
  """
  return ml_collections.ConfigDict(dict(
      optimizer=dict(name='adam', b1=0.9, b2=0.999, eps=1e-8),
      lr=6e-5,
      wd=0.0,
      wd_mults=(('.*/kernel$', 1.0),),
      lr_mults=(),
      grad_clip_norm=config_dict.placeholder(float),  # None: no clipping.
      schedule=(('.*', dict(decay_type='cosine', warmup_steps=0)),),
  ))


def default_schedule() -> ml_collections.ConfigDict:
  """One schedule entry (a `config.schedule` dict), locked: the defaults of the keys it omits.

  `decay_type` ('cosine', 'linear' or 'constant'); `warmup_steps` of linear warm-up from 0;
  `mult`, a per-group factor on the learning rate; `end_mult`, the factor reached at
  `total_steps`.
  """
  c = ml_collections.ConfigDict(dict(decay_type='cosine', warmup_steps=0, mult=1.0, end_mult=0.0))
  c.lock()
  return c


class Optimizer(NamedTuple):
  """What `make_optimizer` returns.

  tx: the optax transformation over the full parameter tree.
  trainable_mask: pytree of Python bools like the params; False = frozen (`schedule` None).
  learning_rate_fn: step -> learning rate of the first trained group (`lr` * its schedule), for
    logging.
  schedule_fns: step -> schedule factor s_t, one per trained group (in `config.schedule` order).
  """
  tx: optax.GradientTransformation
  trainable_mask: Any
  learning_rate_fn: Callable[[jax.Array], jax.Array]
  schedule_fns: tuple


# ------------------------------------------------------------------------------------------------
# Parameter paths and regex rules (shared with sharding.py).
# ------------------------------------------------------------------------------------------------


def _key_name(key) -> str:
  for attr in ('key', 'name', 'idx'):  # DictKey, GetAttrKey, SequenceKey
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_name(path: Sequence[Any]) -> str:
  """'encoder/block1/unit1/conv1/kernel' for a `jax.tree_util` key path."""
  return '/'.join(_key_name(k) for k in path)


def tree_path_names(tree: Any) -> Any:
  """A pytree like `tree` whose leaves are their '/'-joined paths."""
  return jax.tree_util.tree_map_with_path(lambda p, _: path_name(p), tree)


def match_rules(tree: Any, rules: Sequence[tuple], config_key: str,
                require_all_matched: bool = True, require_all_used: bool = True) -> Any:
  """Index of the first rule whose regex fully matches each leaf's path (-1 if none).

  Args:
    tree: pytree with dict keys (parameters, possibly abstract).
    rules: sequence of `(regex, value)` pairs.
    config_key: name of the config field, for error messages.
    require_all_matched: raise if some leaf matches no rule.
    require_all_used: raise if some rule is the first match of no leaf (a typo, or a rule shadowed
      by an earlier, broader one).
  Returns:
    A pytree of ints like `tree`.
  """
  rules = list(rules)
  for i, rule in enumerate(rules):
    if not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str):
      raise ValueError(f'config.{config_key}[{i}]={rule!r}: expected a (regex, value) pair.')
    if rule[0].startswith('/'):
      raise ValueError(f'config.{config_key}[{i}]: regex {rule[0]!r} starts with "/"; parameter '
                       "paths look like 'encoder/block1/unit1/conv1/kernel'.")
  try:
    patterns = [re.compile(regex) for regex, _ in rules]
  except re.error as e:
    raise ValueError(f'config.{config_key}: invalid regex {e.pattern!r}: {e}.') from e

  def first_match(name):
    return next((i for i, p in enumerate(patterns) if p.fullmatch(name)), -1)

  names = tree_path_names(tree)
  indices = jax.tree.map(first_match, names)
  flat_names, flat_indices = jax.tree.leaves(names), jax.tree.leaves(indices)
  if require_all_matched:
    unmatched = [n for n, i in zip(flat_names, flat_indices) if i < 0]
    if unmatched:
      raise ValueError(
          f'config.{config_key}: {len(unmatched)} parameter(s) match no rule, e.g. '
          f'{unmatched[:3]}. Add a rule for them, e.g. a final (".*", ...) catch-all.')
  if require_all_used:
    used = set(flat_indices)
    for i, (regex, _) in enumerate(rules):
      if i not in used:
        raise ValueError(
            f'config.{config_key}[{i}]: regex {regex!r} is the first match of no parameter (a '
            f'typo, or shadowed by an earlier rule). Parameter paths look like '
            f'{flat_names[:2]}; regexes must match the whole path.')
  return indices


def _masks(indices: Any, count: int) -> list:
  return [jax.tree.map(lambda i, k=k: i == k, indices) for k in range(count)]


def _as_rule_list(schedule) -> list:
  if schedule is None:
    raise ValueError('config.schedule is None; to freeze everything there is nothing to train. '
                     'Use a dict, or a list of (regex, dict or None).')
  if isinstance(schedule, (tuple, list)):
    return [(regex, sched) for regex, sched in schedule]
  return [('.*', schedule)]


# ------------------------------------------------------------------------------------------------
# Schedules.
# ------------------------------------------------------------------------------------------------


def make_schedule(schedule: dict, total_steps: int,
                  where: str = 'A config.schedule entry') -> optax.Schedule:
  """step -> factor: linear warm-up from 0 to `mult`, then cosine / linear decay or constant.

  `schedule` holds some of the keys of `default_schedule()`, which gives the others; `where`
  names it in errors.
  """
  schedule = config_fields.fill(schedule, default_schedule(), where,
                                'ddep_jax.optimizer.default_schedule()')
  decay_type = schedule['decay_type']
  warmup_steps = int(schedule['warmup_steps'])
  mult = float(schedule['mult'])
  end_mult = float(schedule['end_mult'])
  if decay_type not in DECAY_TYPES:
    raise ValueError(f'config.schedule decay_type={decay_type!r}: expected one of {DECAY_TYPES}.')
  if not total_steps or total_steps <= 0:
    raise ValueError(f'total_steps={total_steps}: the schedule needs a positive number of steps '
                     '(set config.total_steps, or pass total_steps computed from total_epochs).')
  if not 0 <= warmup_steps < total_steps:
    raise ValueError(f'config.schedule warmup_steps={warmup_steps} must lie in [0, total_steps='
                     f'{total_steps}).')
  decay_steps = total_steps - warmup_steps
  if decay_type == 'cosine':
    decay = optax.cosine_decay_schedule(mult, decay_steps, alpha=end_mult / mult if mult else 0.)
  elif decay_type == 'linear':
    decay = optax.linear_schedule(mult, end_mult, decay_steps)
  else:
    decay = optax.constant_schedule(mult)
  if warmup_steps == 0:
    return decay
  warmup = optax.linear_schedule(0.0, mult, warmup_steps)
  return optax.join_schedules([warmup, decay], [warmup_steps])


# ------------------------------------------------------------------------------------------------
# The optimizer.
# ------------------------------------------------------------------------------------------------


def make_optimizer(config: ml_collections.ConfigDict, params: Any,
                   total_steps: int | None = None) -> Optimizer:
  """Builds the optax chain for `params` (arrays or `jax.ShapeDtypeStruct`s; only paths matter).

  Args:
    config: experiment config with `optimizer`, `lr`, `wd`, `wd_mults`, `lr_mults`,
      `grad_clip_norm`, `schedule` and `total_steps`.
    params: the parameter tree (`{'encoder', 'decoder', 'head'}`).
    total_steps: overrides `config.total_steps` (e.g. when the loop derives it from epochs).
  Returns:
    An `Optimizer(tx, trainable_mask, learning_rate_fn, schedule_fns)`.
  """
  opt = config.optimizer
  if opt.name not in OPTIMIZERS:
    raise ValueError(f'config.optimizer.name={opt.name!r}: expected one of {OPTIMIZERS}.')
  total_steps = total_steps if total_steps is not None else config.total_steps
  if config.lr is None or config.lr <= 0:
    raise ValueError(f'config.lr={config.lr} must be > 0; freeze parameters with a None schedule.')

  # Freezing: first matching schedule rule per parameter; None freezes (big_vision).
  rules = _as_rule_list(config.schedule)
  indices = match_rules(params, rules, 'schedule')
  group_masks = _masks(indices, len(rules))
  trainable = jax.tree.map(lambda i: rules[i][1] is not None, indices)
  frozen = jax.tree.map(lambda t: not t, trainable)
  if not any(jax.tree.leaves(trainable)):
    raise ValueError('config.schedule freezes every parameter: nothing would train.')
  groups = [i for i, (_, sched) in enumerate(rules) if sched is not None]
  listed = isinstance(config.schedule, (tuple, list))
  schedule_fns = tuple(
      make_schedule(rules[i][1], total_steps,
                    f'config.schedule[{i}] ({rules[i][0]!r}, ...)' if listed else 'config.schedule')
      for i in groups)
  schedule_txs = [optax.masked(optax.scale_by_schedule(fn), group_masks[i])
                  for fn, i in zip(schedule_fns, groups)]

  # Per-group learning-rate multipliers; freezing is done by the schedule, not by a 0 multiplier.
  lr_txs = [optax.scale(config.lr)]
  if config.lr_mults:
    lr_indices = match_rules(params, config.lr_mults, 'lr_mults', require_all_matched=False)
    lr_masks = _masks(lr_indices, len(config.lr_mults))
    for k, (_, mult) in enumerate(config.lr_mults):
      if not mult > 0:
        raise ValueError(f'config.lr_mults[{k}] = {mult}: multipliers must be > 0; freeze with '
                         'a None entry in config.schedule instead.')
      lr_txs.append(optax.masked(optax.scale(mult), lr_masks[k]))

  # Weight decay on the parameters picked by `wd_mults` (kernels by default), never on frozen ones.
  wd_txs = []
  if config.wd:
    wd_mults = config.wd_mults
    wd_indices = match_rules(params, wd_mults, 'wd_mults', require_all_matched=False)
    for k, (_, mult) in enumerate(wd_mults):
      mask = jax.tree.map(lambda i, t, k=k: i == k and t, wd_indices, trainable)
      wd_txs.append(optax.add_decayed_weights(config.wd * mult, mask))

  # Adam moments exist only for trainable parameters.
  adam = optax.masked(optax.scale_by_adam(b1=opt.b1, b2=opt.b2, eps=opt.eps), trainable)
  # 'adam': coupled L2, the decay enters Adam's moments; 'adamw': decoupled, added after lr.
  coupled_wd, decoupled_wd = (wd_txs, []) if opt.name == 'adam' else ([], wd_txs)
  clip = (optax.masked(optax.clip_by_global_norm(config.grad_clip_norm), trainable)
          if config.grad_clip_norm else optax.identity())
  tx = optax.chain(
      clip,
      *coupled_wd,
      adam,
      *lr_txs,
      *decoupled_wd,
      *schedule_txs,
      # Frozen parameters: exact zeros whatever came before (their gradients are not computed).
      optax.masked(optax.set_to_zero(), frozen),
      optax.scale(-1.0),
  )
  lr, first_schedule = float(config.lr), schedule_fns[0]
  learning_rate_fn = lambda step: lr * first_schedule(step)
  return Optimizer(tx, trainable, learning_rate_fn, schedule_fns)
