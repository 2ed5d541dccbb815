"""Many runs as one program: `train.run_steps` vmapped over a stacked `TrainState`.

    seed_states / unstack_state   K TrainStates as one whose leaves lead with a run axis (K, ...)
    train_many                    K runs in compiled chunks, the run axis sharded over devices
    split_losses_many             eval-mode split losses of K runs, (K,) per split
    grid_states                   seeds x hyperparameter values (learning rate, weight decay,
                                  ...) as stacked states: one compiled program for a grid
    run_sweep                     stages (x rates) x seeds -> {stage: {...}}: `jaxmlp sweep`
                                  (its files: jaxmlp.report)

A single run, a seed sweep and a hyperparameter sweep are the same code path, `run_steps`
vmapped over whatever differs between the runs:

    states = seed_states(range(8), model, config)                      # 8 seeds
    scales = jnp.array([0.1, 0.2, 0.5, 1.0])                           # 4 initial W1 scales
    states = jax.vmap(lambda s: create_train_state(key, model.copy(w1_scale=s), config))(scales)
    result = train_many(states, X, Y, model, config)                   # result.losses (K, steps)
    result = train_many(states, X, Y, model, config, lr_scale=jnp.array([0.5, 1.0, 2.0, 4.0]))

The run axis is split over `devices` (default: `jax.devices()`, which after
`jax.distributed.initialize()` spans every host) with `jax.shard_map`: each device trains its
share of the runs, a few at a time on a CPU and all at once on a GPU or TPU (one vmap;
`devices.vmap_width`), with no communication. On a CPU, splitting the host into several XLA
devices (`jax.config.update("jax_num_cpu_devices", n)` before JAX starts, or
XLA_FLAGS=--xla_force_host_platform_device_count=n) runs the shares on different cores; see
`cpu_devices_for`.
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmlp import limits
from jaxmlp.devices import CPU_VMAP_WIDTH, RUNS, place, run_mesh, to_host
from jaxmlp.devices import vmap_width as vmap_width_for
from jaxmlp.errors import ConfigError
from jaxmlp.evaluate import eval_loss
from jaxmlp.optim import optimizer_slots, set_hyperparams
from jaxmlp.program_cache import Compiled, program_key
from jaxmlp.protocol import has_batch_stats
from jaxmlp.report import summarize, sweep_entry, t975  # noqa: F401 (part of this module's API)
from jaxmlp.train import (
    TrainConfig,
    TrainState,
    chunks,
    create_train_state,
    progress_bar,
    run_steps,
)

# ---------------------------------------------------------------------------------------------
# Stacked states


def seed_states(seeds: Sequence[int], model: nn.Module, config: TrainConfig) -> TrainState:
    """The states `jaxmlp train --seed s` starts from, for each s in `seeds`, stacked (K, ...)."""
    return _seed_states(jnp.asarray(list(seeds), jnp.uint32), model=model, config=config)


@functools.partial(jax.jit, static_argnames=("model", "config"))
def _seed_states(seeds: jax.Array, *, model: nn.Module, config: TrainConfig) -> TrainState:
    # Compiled: an eager vmap of Flax's init dispatches hundreds of small ops (seconds).
    return jax.vmap(lambda s: create_train_state(jax.random.key(s), model, config))(seeds)


def unstack_state(states: TrainState, i: int) -> TrainState:
    """Run `i` of a stacked state (a TrainState `fit`, `split_losses` or `save_run` accept)."""
    return _index(states, jnp.int32(i))


def num_runs(states: TrainState) -> int:
    return int(states.step.shape[0]) if states.step.ndim == 1 else 0


# Small compiled helpers: done eagerly, every leaf of a TrainState would compile an op of its own.
@jax.jit
def _index(states, i):
    return jax.tree.map(lambda x: x[i], states)


@jax.jit
def _concat(parts):
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)


@functools.partial(jax.jit, static_argnames=("k",))
def take_runs(tree, k: int):
    """The first k runs of a stacked tree."""
    return jax.tree.map(lambda x: x[:k], tree)


@functools.partial(jax.jit, static_argnames=("k_pad",))
def _pad_runs(tree, k_pad: int):
    """Repeat the last run until the run axis has length k_pad (padding is dropped later)."""
    return jax.tree.map(
        lambda x: jnp.concatenate([x, jnp.repeat(x[-1:], k_pad - x.shape[0], axis=0)])
        if k_pad > x.shape[0] else x, tree)


# ---------------------------------------------------------------------------------------------
# Training many runs


@dataclass
class ManyResult:
    states: TrainState  # stacked (K, ...), sharded over the mesh
    losses: np.ndarray  # (K, steps) float32 minibatch loss of every step of every run
    seconds: float  # wall time, compilation included
    compile_seconds: float
    num_devices: int

    @property
    def diverged(self) -> np.ndarray:
        """(K,) bool: runs whose loss stopped being finite at some step."""
        return ~np.isfinite(self.losses).all(axis=1)


# Compiled chunks, kept across calls (as jit's own cache would) but compiled ahead of time so
# that train_many can report compile time apart from run time.
_PROGRAMS = Compiled()


@functools.partial(jax.jit, static_argnames=("model", "config", "num_steps", "mesh",
                                             "per_run_ix", "vmap_width"),
                   donate_argnames=("states",))
def train_many_chunk(states: TrainState, X: jax.Array, Y: jax.Array, batch_ix, lr_scale, *,
                     model: nn.Module, config: TrainConfig, num_steps: int, mesh: Mesh,
                     per_run_ix: bool = False, vmap_width: int = CPU_VMAP_WIDTH):
    """`num_steps` steps of every run. states (K, ...), batch_ix None, (num_steps, B) shared or
    (K, num_steps, B) per run, lr_scale None or (K,). Returns (states, losses (K, num_steps)).

    shard_map splits the runs over the mesh; on each device, `run_steps` is vmapped over
    `vmap_width` runs at a time (lax.map with batch_size), the groups one after another; a
    width of 1 runs the unbatched program run after run.
    """

    def local(states, X, Y, batch_ix, lr_scale):  # this device's share of the runs
        def one(args):
            state, ix, lr = args
            ix = ix if per_run_ix else batch_ix
            return run_steps(state, X, Y, ix, model=model, config=config, num_steps=num_steps,
                             lr_scale=lr)

        runs = (states, batch_ix if per_run_ix else None, lr_scale)
        n = states.step.shape[0]
        if n == 1:  # one run here: the unbatched program (a vmap of 1 is slower, 63 vs 35
            out = one(jax.tree.map(lambda x: x[0], runs))  # us/step)
            return jax.tree.map(lambda x: x[None], out)
        if vmap_width == 1:
            return jax.lax.map(one, runs)
        if vmap_width >= n:
            return jax.vmap(one)(runs)
        return jax.lax.map(one, runs, batch_size=vmap_width)

    ix_spec = None if batch_ix is None else (P(RUNS) if per_run_ix else P())
    lr_spec = None if lr_scale is None else P(RUNS)
    return jax.shard_map(local, mesh=mesh, in_specs=(P(RUNS), P(), P(), ix_spec, lr_spec),
                         out_specs=(P(RUNS), P(RUNS)))(states, X, Y, batch_ix, lr_scale)


def train_many(states: TrainState, X, Y, model: nn.Module, config: TrainConfig, *,
               lr_scale=None, batch_ix=None, devices: Sequence[jax.Device] | None = None,
               chunk: int | None = None, vmap_width: int | None = None, progress: bool = False,
               log: Callable[[str], None] | None = None) -> ManyResult:
    """Train K stacked runs from their current step to `config.steps`, all at once.

    states: stacked TrainState (K, ...) (`seed_states`, `grid_states`, or a vmapped
    `create_train_state`). X (N, T), Y (N,): the training split. lr_scale: optional (K,)
    learning-rate multipliers. batch_ix: optional minibatch indices, (steps, B) for every run
    or (K, steps, B) per run, indexed by absolute step like `fit`'s. The run axis is split
    over `devices` (padded to a multiple of their number); run i equals the run `fit` makes
    from `unstack_state(states, i)` up to float rounding. A run whose loss stops being finite
    does not stop the others: see `ManyResult.diverged`. Runs that differ in injected
    hyperparameters (`grid_states`) are runs that differ in their states.
    vmap_width: runs each device trains at once (default per platform: `devices.vmap_width`).
    """
    config.validate(batchnorm=has_batch_stats(model))
    k = num_runs(states)
    if k < 1:
        raise ConfigError("train_many needs stacked states with a leading run axis; build them "
                          "with seed_states or jax.vmap(create_train_state)")
    steps0 = np.unique(np.asarray(states.step))
    if steps0.size != 1:
        raise ConfigError(f"the runs are at different steps {steps0.tolist()}; train_many "
                          "advances runs in lockstep, so start them at the same step")
    start = int(steps0[0])
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(states) if hasattr(x, "nbytes"))
    limits.check_memory({"loss history": 4 * k * (config.steps - start),
                         "states": 2 * state_bytes}, fix="fewer seeds, stages or steps")
    mesh = run_mesh(devices, k)
    n_dev = mesh.devices.size
    k_pad = -(-k // n_dev) * n_dev
    per_run_ix = batch_ix is not None and np.ndim(batch_ix) == 3
    if batch_ix is not None:
        need = (k, config.steps) if per_run_ix else (config.steps,)
        if np.ndim(batch_ix) not in (2, 3) or np.shape(batch_ix)[:len(need)] != need:
            raise ConfigError(f"batch_ix has shape {np.shape(batch_ix)}; expected "
                              f"{(*need, config.batch_size)}")
    run_sharding, replicated = NamedSharding(mesh, P(RUNS)), NamedSharding(mesh, P())
    # A copy: the chunks donate their input states, and the caller keeps theirs.
    states = place(_pad_runs(states, k_pad), run_sharding)
    if lr_scale is not None:
        lr_scale = jnp.asarray(lr_scale, jnp.float32).reshape(-1)
        if lr_scale.shape != (k,):
            raise ConfigError(f"lr_scale has {lr_scale.shape[0]} values for {k} runs; give "
                              "one learning-rate multiplier per run")
        lr_scale = place(_pad_runs(lr_scale, k_pad), run_sharding)
    X, Y = place(np.asarray(X), replicated), place(np.asarray(Y), replicated)
    chunk = chunk or config.chunk

    def chunk_ix(s, n):
        if batch_ix is None:
            return None
        if per_run_ix:
            ix = _pad_runs(jnp.asarray(np.asarray(batch_ix)[:, s:s + n], jnp.int32), k_pad)
            return place(ix, run_sharding)
        return place(np.asarray(batch_ix)[s:s + n].astype(np.int32), replicated)

    t0 = time.perf_counter()
    compiled_before = _PROGRAMS.seconds
    platform = mesh.devices.flat[0].platform
    width = vmap_width_for(platform, k_pad // n_dev, vmap_width)
    losses = []
    bar = progress_bar(config, start, progress)
    try:
        for s, n in chunks(start, config.steps, chunk):
            ix = chunk_ix(s, n)
            key = program_key(model, config, n, mesh, per_run_ix, width,
                              arrays=(states, X, Y, ix, lr_scale))
            program = _PROGRAMS(key, lambda states=states, ix=ix, n=n: train_many_chunk.lower(
                states, X, Y, ix, lr_scale, model=model, config=config, num_steps=n, mesh=mesh,
                per_run_ix=per_run_ix, vmap_width=width), platform)
            states, chunk_losses = program(states, X, Y, ix, lr_scale)
            losses.append(to_host(chunk_losses)[:k])  # the one host sync per chunk
            if log is not None:
                log(f"{s + n:7d}/{config.steps:7d}: mean loss of the last step "
                    f"{np.nanmean(losses[-1][:, -1]):.4f}")
            bar.update(n)
    finally:
        bar.close()
    compile_seconds = _PROGRAMS.seconds - compiled_before
    all_losses = np.concatenate(losses, axis=1) if losses else np.zeros((k, 0), np.float32)
    if k_pad > k:
        states = take_runs(states, k)
    return ManyResult(states, all_losses, time.perf_counter() - t0, compile_seconds, n_dev)


@functools.partial(jax.jit, static_argnames=("model", "mesh"))
def _eval_many(variables, X, Y, *, model: nn.Module, mesh: Mesh):
    """(K,) eval losses: each device evaluates its runs one after another (memory of one)."""

    def local(variables, X, Y):
        return jax.lax.map(lambda v: eval_loss(v, X, Y, model=model), variables)

    return jax.shard_map(local, mesh=mesh, in_specs=(P(RUNS), P(), P()),
                         out_specs=P(RUNS))(variables, X, Y)


def split_losses_many(model: nn.Module, states: TrainState, data,
                      splits: Sequence[str] = ("train", "val", "test"),
                      devices: Sequence[jax.Device] | None = None) -> dict[str, np.ndarray]:
    """{'train': (K,), 'val': (K,), 'test': (K,)}: the lecture's split losses of every run
    (eval mode: the running batch-norm statistics)."""
    k = num_runs(states)
    mesh = run_mesh(devices, k)
    k_pad = -(-k // mesh.devices.size) * mesh.devices.size
    variables = place(_pad_runs(states.variables, k_pad), NamedSharding(mesh, P(RUNS)))
    replicated = NamedSharding(mesh, P())
    out = {}
    for split in splits:
        X, Y = (place(np.asarray(a), replicated) for a in data.split(split))
        out[split] = to_host(_eval_many(variables, X, Y, model=model, mesh=mesh))[:k]
    return out


# ---------------------------------------------------------------------------------------------
# Stage sweeps (the CLI)


def training_model(model: nn.Module) -> nn.Module:
    """The model as the training program sees it. The MLP's *_scale fields only shape the
    initial draws (create_train_state), so stages that differ only in them share one compiled
    training program: the four stages without batch norm train as one batch of runs."""
    from jaxmlp.models import MLP

    if type(model) is MLP:
        return model.copy(**dict.fromkeys(model.init_scales, 1.0))
    return model


@functools.partial(jax.jit, static_argnames=("model", "config"))
def _scaled_seed_states(seeds: jax.Array, scales: dict[str, jax.Array], *, model: nn.Module,
                        config: TrainConfig) -> TrainState:
    """seed_states for runs that differ in seed and in the MLP's init scales (K,) each: one
    compiled init for all the stages of a group, not one per stage."""
    return jax.vmap(lambda s, f: create_train_state(jax.random.key(s), model.copy(**f), config))(
        seeds, scales)


def _group_states(seeds: Sequence[int], models: Sequence[nn.Module], train_model: nn.Module,
                  config: TrainConfig) -> TrainState:
    """The initial states of every (model, seed) pair, model-major, stacked."""
    if train_model is not models[0] and len(models) > 1:  # MLPs that differ in scales only
        scales = {f: jnp.repeat(jnp.asarray([m.init_scales[f] for m in models], jnp.float32),
                                len(seeds)) for f in models[0].init_scales}
        all_seeds = jnp.tile(jnp.asarray(list(seeds), jnp.uint32), len(models))
        return _scaled_seed_states(all_seeds, scales, model=train_model, config=config)
    return _concat(tuple(seed_states(seeds, m, config) for m in models))


def grid_states(seeds: Sequence[int], model: nn.Module, config: TrainConfig,
                **grid: Sequence[float]) -> tuple[TrainState, list[dict[str, Any]]]:
    """Every combination of the hyperparameter values of `grid` with every seed, stacked.

    grid: {name: values} of hyperparameters the optimizer injects (optax.inject_hyperparams,
    or `optim.tunable(config)` for sgd/adam: `learning_rate`). K = len(seeds) x the product
    of the value counts, the seeds varying fastest. Returns the states (K, ...) and each run's
    {name: value, ..., "seed": s}; `train_many` trains them as one compiled program.
    """
    combos = list(itertools.product(*grid.values()))
    rows = [{**dict(zip(grid, c, strict=True)), "seed": int(s)} for c in combos for s in seeds]
    states = seed_states([r["seed"] for r in rows], model, config)
    if grid:
        states = set_hyperparams(states, **{n: np.asarray([r[n] for r in rows], np.float32)
                                            for n in grid})
    return states, rows


def run_sweep(stages: Sequence[str], seeds: Sequence[int], data, *, steps: int | None = None,
              batch_size: int | None = None, chunk: int | None = None,
              devices: Sequence[jax.Device] | None = None, lrs: Sequence[float] | None = None,
              vmap_width: int | None = None, model_fields: dict | None = None,
              progress: bool = False,
              log: Callable[[str], None] | None = print) -> dict[str, dict[str, Any]]:
    """Train every stage with every seed (vmapped, sharded) and collect the split losses.

    Stages that share a training program are trained together. Returns
    {stage: {"seeds", "train", "val", "test", "mean", "std", "ci95", "n", "steps",
    "seconds", "pytorch", "diverged"}}, lists in seed order. lrs: a learning-rate grid, each
    the first rate of the stage's schedule (the later ones keep their ratios to it), trained as
    data (`optim.tunable`): then one entry per (stage, lr), keyed "STAGE lr=LR", with its
    "stage", "lr" and "hyperparams" too. model_fields: the deep network's variants (norm,
    activation, gain, depth; recorded as "model" in each entry).
    """
    from jaxmlp.optim import tunable
    from jaxmlp.stages import get_stage, make_model

    try:
        n_seeds = len(seeds)
    except OverflowError:  # range(2**64)
        n_seeds = limits.MAX_RUNS + 1
    if not n_seeds:
        raise ConfigError("--seeds must be at least 1")
    if not stages:
        raise ConfigError("no stages given; pass e.g. --stages kaiming,batchnorm")
    # Before listing the seeds: --seeds may be 2**64.
    limits.check_runs(n_seeds, len(stages) * len(lrs or [None]))
    seeds = [int(s) for s in seeds]
    for s in (min(seeds), max(seeds)):
        limits.check_seed(s, "a seed")
    for stage in stages:
        get_stage(stage)
    if len(set(stages)) != len(stages):
        raise ConfigError(f"a stage is listed twice in {','.join(stages)}; list each once")
    if lrs is not None:
        if not lrs or len(set(lrs)) != len(lrs):
            raise ConfigError("--lr needs distinct rates to sweep, e.g. --lr 0.05,0.1,0.2")
        limits.check_learning_rates(lrs)
    fields = dict(model_fields or {})
    groups: dict[tuple, list[tuple[str, nn.Module, TrainConfig]]] = {}
    defaults = TrainConfig()
    for stage in stages:
        model = make_model(stage, data.vocab.size, block_size=data.block_size, **fields)
        config = TrainConfig(steps=steps or defaults.steps,
                             batch_size=batch_size or defaults.batch_size,
                             schedule=get_stage(stage).schedule)
        config.check_fits(model, len(data.train.Y))
        groups.setdefault((training_model(model), config), []).append((stage, model, config))

    results: dict[str, dict[str, Any]] = {}
    rates = list(lrs) if lrs is not None else [None]
    for (train_model, config), members in groups.items():
        names = [m[0] for m in members]
        if lrs is not None:
            config = tunable(config)  # one per group: the group's runs share one program
        k = len(seeds) * len(rates) * len(members)
        if log is not None:
            grid = f" x {len(rates)} learning rates" if lrs is not None else ""
            log(f"{', '.join(names)}: {len(seeds)} seeds{grid} each, {k} runs in one program, "
                f"{config.steps:,} steps")
        state_bytes = 4 * limits.count_params(train_model) * (1 + optimizer_slots(
            config, limits.param_shapes(train_model)))
        limits.check_memory({"loss history": 4 * k * config.steps,
                             "states": 3 * k * state_bytes}, fix="fewer seeds, stages or steps")
        states = _group_states(seeds * len(rates), [m[1] for m in members], train_model, config)
        if lrs is not None:  # member-major, then rate, then seed
            states = set_hyperparams(states, learning_rate=np.tile(
                np.repeat(np.asarray(rates, np.float32), len(seeds)), len(members)))
        result = train_many(states, *data.train, train_model, config, devices=devices,
                            chunk=chunk or sweep_chunk(k), vmap_width=vmap_width,
                            progress=progress)
        losses = split_losses_many(train_model, result.states, data, devices=devices)
        if log is not None:
            log(f"  {result.seconds:.1f} s ({result.compile_seconds:.1f} s compiling) on "
                f"{result.num_devices} device(s): "
                f"{(result.seconds - result.compile_seconds) / (k * config.steps) * 1e6:.1f} "
                "us per model-step")
        for j, stage in enumerate(names):
            for g, lr in enumerate(rates):
                first = (j * len(rates) + g) * len(seeds)
                entry = sweep_entry(stage, seeds, slice(first, first + len(seeds)), losses, result,
                               config.steps, lr, fields)
                results[stage if lr is None else f"{stage} lr={lr:g}"] = entry
    order = [f"{s} lr={lr:g}" if lr is not None else s for s in stages for lr in rates]
    return {key: results[key] for key in order}


def sweep_chunk(k: int) -> int:
    """Steps per compiled call for k runs: about 80,000 model-steps, so that the chunk's
    gathered minibatches stay small and the progress bar moves every few seconds."""
    return int(min(10_000, max(10, 10_000 * 8 // max(k, 1))))


