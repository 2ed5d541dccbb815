"""Optimizers: the lecture's presets, any optax transformation, and hyperparameters as data.

    Schedule             the lecture's stepped learning rate, as plain (hashable) data
    schedule_from_flags  `--lr` / `--lr-boundaries` over a stage's schedule
    make_schedule        a Schedule (or any optax schedule) as an optax schedule
    make_optimizer       a TrainConfig's transformation: "sgd" / "adam" on its schedule, or the
                         user's own `optax.GradientTransformation`, as given
    check_optimizer      ConfigError for an optimizer or schedule jaxmlp cannot train with
    RecordedOptimizer    a custom optimizer as run.json knows it: recognisable, not rebuildable
    fingerprint          what run.json records of a custom optimizer (its state's structure)
    tunable              a preset with its learning rate in the optimizer state
    get_hyperparams / set_hyperparams   the injected hyperparameters of (stacked) states
    scale_updates        a learning-rate multiplier carried as data
    optimizer_slots      optimizer state per parameter, for the memory estimate

Hyperparameters as data: `optax.inject_hyperparams` keeps numeric hyperparameters (learning
rate, weight decay, ...) as arrays in the optimizer state. Runs that differ only in them then
differ only in their initial state, so one compiled program trains them all, vmapped and
sharded like seeds (`jaxmlp.sweep.grid_states`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxmlp import limits
from jaxmlp.errors import ConfigError, RunError

PRESETS = ("sgd", "adam")


@dataclass(frozen=True)
class Schedule:
    """Stepped learning rate: `learning_rates[i]` from step `boundaries[i-1]` on."""

    learning_rates: tuple[float, ...] = (0.1, 0.01)
    boundaries: tuple[int, ...] = (100_000,)


@dataclass(frozen=True)
class RecordedOptimizer:
    """A custom optimizer as a run.json records it: the structure of its state (optax's state
    classes, e.g. "(EmptyState, (ScaleByAdamState, ...))") and a SHA-256 of that structure with
    every leaf's shape and dtype. Enough to check that an optimizer given again on resume is
    the run's; not enough to rebuild it."""

    state: str
    sha256: str


def is_transformation(x) -> bool:
    """An optax GradientTransformation (or anything with its `init` and `update`)."""
    return callable(getattr(x, "init", None)) and callable(getattr(x, "update", None))


def is_custom(config) -> bool:
    """Whether run.json cannot rebuild `config`'s optimizer (not a preset on a Schedule)."""
    return not (isinstance(config.optimizer, str) and isinstance(config.schedule, Schedule))


def check_optimizer(config) -> None:
    """ConfigError for a schedule or optimizer that a TrainConfig cannot hold."""
    opt, schedule = config.optimizer, config.schedule
    if isinstance(schedule, Schedule):
        lrs, bounds = schedule.learning_rates, schedule.boundaries
        if len(lrs) != len(bounds) + 1:
            raise ConfigError(f"a schedule needs one more learning rate than boundaries, got "
                              f"{len(lrs)} rates and {len(bounds)} boundaries")
        limits.check_learning_rates(lrs)
        if list(bounds) != sorted(set(bounds)) or any(
                not isinstance(b, int) or not 1 <= b <= limits.MAX_STEPS for b in bounds):
            raise ConfigError(f"schedule boundaries must be positive and increasing steps (at "
                              f"most {limits.MAX_STEPS:,}), got {list(bounds)}")
    elif not callable(schedule):
        raise ConfigError(f"schedule must be a jaxmlp Schedule, a number or an optax schedule "
                          f"(a function of the step), got {schedule!r}")
    if isinstance(opt, str):
        if opt not in PRESETS:
            raise ConfigError(f"unknown optimizer {opt!r}; use sgd, adam or an "
                              "optax.GradientTransformation")
    elif not (is_transformation(opt) or isinstance(opt, RecordedOptimizer)):
        raise ConfigError(f"optimizer must be 'sgd', 'adam' or an optax.GradientTransformation "
                          f"(with init and update), got {type(opt).__name__}")


def schedule_from_flags(rates: tuple[float, ...] | None, boundaries: tuple[int, ...] | None,
                        default: Schedule) -> Schedule:
    """`--lr` / `--lr-boundaries` over a stage's schedule; a single rate alone is constant."""
    if rates is None:
        rates = default.learning_rates
        boundaries = default.boundaries if boundaries is None else boundaries
    elif boundaries is None:
        boundaries = () if len(rates) == 1 else default.boundaries
    if len(rates) != len(boundaries) + 1:
        raise ConfigError(f"the schedule has {len(rates)} rate(s) (--lr) and {len(boundaries)} "
                          "boundary step(s) (--lr-boundaries); give one more rate than "
                          "boundaries, e.g. --lr 0.1,0.01 --lr-boundaries 100000")
    return Schedule(tuple(rates), tuple(boundaries))


def make_schedule(schedule) -> optax.Schedule:
    """The lecture's `lr = 0.1 if i < 100000 else 0.01`, as exact constants joined by optax;
    any other optax schedule (a function of the step) as it is."""
    if not isinstance(schedule, Schedule):
        return schedule
    return optax.join_schedules(
        [optax.constant_schedule(lr) for lr in schedule.learning_rates],
        list(schedule.boundaries))


def make_optimizer(config) -> optax.GradientTransformation:
    """The transformation `config` trains with: its own, or a preset on its schedule."""
    opt = config.optimizer
    if isinstance(opt, RecordedOptimizer):
        raise RunError(f"this run was trained with a custom optimizer (state {opt.state}), "
                       "which run.json cannot rebuild; pass it again, e.g. "
                       "jaxmlp.plan_resumed_run(run, optimizer=tx)")
    if not isinstance(opt, str):
        return opt
    schedule = make_schedule(config.schedule)
    if opt == "adam":
        return optax.adam(schedule)
    return optax.sgd(schedule)  # p += -lr * grad, as the lecture's update


def scale_updates(tx: optax.GradientTransformation,
                  factor: jax.Array) -> optax.GradientTransformation:
    """`tx` with its updates multiplied by `factor`: a learning-rate multiplier as data.

    For SGD and Adam alike that is the learning rate times `factor`. `factor` may be traced
    (one value per run of a vmapped sweep); the optimizer state is `tx`'s own, so states made
    by `create_train_state` fit.
    """

    def update(updates, state, params=None):
        updates, state = tx.update(updates, state, params)
        return jax.tree.map(lambda u: u * factor.astype(u.dtype), updates), state

    return optax.GradientTransformation(tx.init, update)


# ------------------------------------------------------------------------ custom optimizers


def state_summary(state) -> str:
    """The optax state classes of an optimizer state, nested as chained: "(EmptyState,
    (ScaleByAdamState, EmptyState, ScaleByScheduleState))"."""
    if hasattr(state, "_fields"):  # an optax state (a NamedTuple)
        return type(state).__name__
    if isinstance(state, (tuple, list)):
        return "(" + ", ".join(state_summary(s) for s in state) + ")"
    return type(state).__name__


def fingerprint(tx: optax.GradientTransformation, params) -> RecordedOptimizer:
    """What run.json records of a custom optimizer: its state's structure for `params` (arrays
    or shapes) and a SHA-256 of the tree structure with every leaf's shape and dtype."""
    try:
        state = jax.eval_shape(tx.init, params)
    except Exception as e:  # whatever the user's init raises
        raise ConfigError(f"the optimizer's init fails on the model's parameters "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    leaves = [[list(x.shape), str(x.dtype)] for x in jax.tree.leaves(state)]
    text = json.dumps([str(jax.tree.structure(state)), leaves])
    return RecordedOptimizer(state_summary(state), hashlib.sha256(text.encode()).hexdigest())


def optimizer_slots(config, params) -> float:
    """Floats of optimizer state per parameter (0 for SGD, 2 for Adam): the memory estimate."""
    if isinstance(config.optimizer, str):
        return 2 if config.optimizer == "adam" else 0
    if isinstance(config.optimizer, RecordedOptimizer):
        return 2
    n = sum(x.size for x in jax.tree.leaves(params)) or 1
    state = jax.eval_shape(config.optimizer.init, params)
    return sum(x.size for x in jax.tree.leaves(state)) / n


# ------------------------------------------------------------------ hyperparameters as data


def _preset(learning_rate, *, name: str, divisors: tuple[float, ...], boundaries: tuple[int, ...]):
    """The preset `name` on a stepped schedule whose first rate is `learning_rate` (a traced
    array under inject_hyperparams) and whose i-th is learning_rate / divisors[i]. divisors[0]
    is 1, so the first rate is exact; the lecture's 10x drop divides by exactly 10."""
    def schedule(count):
        lr = learning_rate / divisors[0]
        for boundary, d in zip(boundaries, divisors[1:], strict=True):
            lr = jnp.where(count < boundary, lr, learning_rate / d)
        return lr

    return optax.adam(schedule) if name == "adam" else optax.sgd(schedule)


def tunable(config):
    """`config` with its learning rate in the optimizer state, as data: a preset becomes
    `optax.inject_hyperparams` of itself, with one hyperparameter `learning_rate` (the first
    rate of its schedule; the later ones keep their ratios to it). Runs that then differ only
    in `learning_rate` (set_hyperparams) share one compiled program. A custom optimizer must
    already be built with optax.inject_hyperparams; it is returned as it is."""
    import dataclasses

    opt = config.optimizer
    if not isinstance(opt, str):
        if not is_transformation(opt):
            raise ConfigError("a recorded custom optimizer cannot be made tunable; pass the "
                              "optimizer itself")
        return config
    if not isinstance(config.schedule, Schedule):
        raise ConfigError("only a stepped Schedule can be made tunable; build the optimizer "
                          "with optax.inject_hyperparams instead")
    rates = config.schedule.learning_rates
    divisors = tuple(float(jnp.float32(rates[0] / r)) for r in rates)
    tx = optax.inject_hyperparams(_preset, static_args=("name", "divisors", "boundaries"))(
        learning_rate=rates[0], name=opt, divisors=divisors,
        boundaries=tuple(config.schedule.boundaries))
    return dataclasses.replace(config, optimizer=tx)


def _is_injected(x) -> bool:
    return hasattr(x, "_fields") and "hyperparams" in x._fields


def get_hyperparams(opt_state) -> dict[str, Any]:
    """{name: value} of every hyperparameter injected anywhere in `opt_state` (() per run,
    (K,) for stacked states)."""
    out: dict[str, Any] = {}
    for s in jax.tree.leaves(opt_state, is_leaf=_is_injected):
        if _is_injected(s):
            out.update(s.hyperparams)
    return out


def set_hyperparams(state, **values):
    """`state` (a TrainState, stacked or not) with injected hyperparameters replaced.

    Each value is a number or, for stacked states (K, ...), a (K,) array: one per run.
    ConfigError naming the fix when the optimizer has no such injected hyperparameter.
    """
    known = get_hyperparams(state.opt_state)
    missing = sorted(set(values) - set(known))
    if missing:
        have = ", ".join(sorted(known)) or "none"
        raise ConfigError(f"the optimizer has no injected hyperparameter {missing[0]!r} "
                          f"(it has: {have}); build it with optax.inject_hyperparams, e.g. "
                          "optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3, "
                          "weight_decay=1e-4), or use optim.tunable(config) for sgd/adam")

    def replace(s):
        if not _is_injected(s):
            return s
        hp = dict(s.hyperparams)
        for name, v in values.items():
            if name in hp:
                v = jnp.asarray(v, hp[name].dtype)
                if v.shape not in ((), hp[name].shape):
                    raise ConfigError(f"{name} has shape {v.shape}; the states need "
                                      f"{hp[name].shape} (one value per run) or one number")
                hp[name] = jnp.broadcast_to(v, hp[name].shape)
        return s._replace(hyperparams=hp)

    return state.replace(opt_state=jax.tree.map(replace, state.opt_state, is_leaf=_is_injected))


@functools.lru_cache(maxsize=32)
def recorded(train, model) -> RecordedOptimizer:
    """What run.json records of `train`'s custom optimizer (cached: a run's spec is written
    with every checkpoint)."""
    return fingerprint(make_optimizer(train), limits.param_shapes(model))


def with_optimizer(spec, optimizer=None, run="the run"):
    """A run's `RunSpec` ready to train: a custom optimizer recorded in run.json replaced by
    `optimizer`, once its state is checked to have the structure the run's had.

    RunError when the run needs its optimizer and none is given, when the one given does not
    match, or when one is given for a run whose run.json rebuilds its own.
    """
    recorded = spec.train.optimizer
    if optimizer is None:
        if isinstance(recorded, RecordedOptimizer):
            raise RunError(f"run {str(run)!r} was trained with a custom optimizer (state "
                           f"{recorded.state}) that run.json cannot rebuild; resume it from "
                           "Python with the same optimizer: jaxmlp.train_run("
                           f"jaxmlp.plan_resumed_run({str(run)!r}, optimizer=tx))")
        return spec
    if not isinstance(recorded, RecordedOptimizer):
        raise RunError(f"run {str(run)!r} was trained with {recorded!r}, which run.json "
                       "rebuilds itself; resume it without optimizer=")
    given = fingerprint(optimizer, limits.param_shapes(spec.model))
    if given != recorded:
        raise RunError(f"the optimizer given does not match the one run {str(run)!r} was "
                       f"trained with (its state is {given.state}, the run's {recorded.state}, "
                       "or their shapes differ); pass the run's own optimizer")
    return dataclasses.replace(spec, train=dataclasses.replace(spec.train, optimizer=optimizer))
