"""The lecture's diagnostics as pure functions that run inside `jit` (and `vmap`, and `scan`).

What the lecture reads off its network with `retain_grad()` and Python loops over layers:

    activation_stats   per layer: mean, std, saturated share (|t| > 0.97), dead units, histogram
    probe              one forward/backward on a minibatch: the activations (sown by the model
                       as "intermediates"), the gradient at each activation output (the gradient
                       of the loss with respect to a zero "perturbations" variable added there),
                       and per 2-D parameter the grad mean, grad std and grad:data ratio
    update_ratios      per parameter log10(std(update) / std(param)) after an optimizer step
    run_diagnosed      training with diagnostics: `train.compute_grads` + `train.apply_grads`
                       (the two halves of the training step) fused in one `lax.scan`, recording
                       the update ratios every `every` steps and layer statistics every
                       `stats_every` steps, with no host round trip per step
    diagnose           host driver: the init snapshot, the fused run, the final snapshot
    to_json            the `jaxmlp diagnose` report (diagnostics.json)

Statistics follow torch's conventions: `std` is the unbiased (n - 1) one, as `t.std()`.
A layer is named by the model (`h` in `MLP`, `tanh5` in `DeepMLP` = the lecture's `layers[5]`);
a parameter by its path (`linear3/kernel`; `embed/embedding` is C).
Saturated means |t| > threshold for tanh (0.97 in the lecture's deep net, 0.99 in its saturation
map of the shallow net) and t <= 0 (no gradient) for relu; a dead unit is saturated for every
example of the batch.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util

from jaxmlp.errors import ConfigError
from jaxmlp.train import (
    TrainConfig,
    TrainState,
    apply_grads,
    compute_grads,
    cross_entropy,
    make_optimizer,
    run_steps,
    sample_batch,
    sample_batches,
)

DEEP_SATURATION = 0.97  # the lecture's threshold for the deep network's tanh layers
SHALLOW_SATURATION = 0.99  # ... and for the shallow net's white/black saturation map
BINS = 50  # per histogram; 3,200 values (32 x 100) fill 50 bins smoothly enough


def natural_key(name: str) -> tuple:
    """Sort key that puts tanh2 before tanh11 (jit returns dicts in plain string order)."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def ordered(d: dict) -> list:
    """The items of a {name: value} dict in layer order."""
    return sorted(d.items(), key=lambda kv: natural_key(kv[0]))


def flat(tree) -> dict[str, Any]:
    """{'linear3': {'kernel': a}} -> {'linear3/kernel': a}."""
    return traverse_util.flatten_dict(tree, sep="/") if tree else {}


def _std(x: jax.Array) -> jax.Array:
    return jnp.std(x, ddof=1)  # torch's t.std()


def histogram(x: jax.Array, lo, hi, bins: int = BINS) -> tuple[jax.Array, jax.Array]:
    """Density histogram of all of x over [lo, hi] in `bins` equal bins: (density, edges).

    The values of `jnp.histogram(x, bins, (lo, hi), density=True)` (values outside [lo, hi]
    are left out, hi falls in the last bin). With equal bins a value's bin is arithmetic, so
    the counts are a one-hot sum instead of jnp.histogram's searchsorted, which compiles in
    half the time (a probe makes a dozen or more histograms). lo and hi may be traced (e.g.
    the data's own range); bins may not.
    """
    x = x.ravel()
    lo, hi = jnp.asarray(lo, x.dtype), jnp.asarray(hi, x.dtype)
    b = jnp.clip(jnp.floor((x - lo) / (hi - lo) * bins).astype(jnp.int32), 0, bins - 1)
    inside = (x >= lo) & (x <= hi)
    counts = ((b[:, None] == jnp.arange(bins)) & inside[:, None]).sum(0).astype(x.dtype)
    edges = jnp.linspace(lo, hi, bins + 1)
    return counts / (counts.sum() * (edges[1] - edges[0])), edges


def symmetric_range(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[-max|x|, max|x|]: gradients have no natural range (an all-zero x stays finite)."""
    m = jnp.maximum(jnp.max(jnp.abs(x)), jnp.finfo(x.dtype).tiny)
    return -m, m


def activation_range(t: jax.Array, activation: str = "tanh"):
    """The histogram range of an activation: (-1, 1) for tanh, (0, max) for relu."""
    return (-1.0, 1.0) if activation == "tanh" else (0.0, jnp.maximum(t.max(), 1e-6))


def symmetric_histogram(x: jax.Array, bins: int = BINS) -> tuple[jax.Array, jax.Array]:
    """Histogram over [-max|x|, max|x|]."""
    return histogram(x, *symmetric_range(x), bins)


def saturated(t: jax.Array, activation: str = "tanh",
              threshold: float = DEEP_SATURATION) -> jax.Array:
    """Boolean mask of saturated outputs: |t| > threshold (tanh), t <= 0 (relu)."""
    if activation == "tanh":
        return jnp.abs(t) > threshold
    if activation == "relu":
        return t <= 0
    raise ConfigError(f"unknown activation {activation!r}; use tanh or relu")


def activation_stats(t: jax.Array, activation: str = "tanh", threshold: float = DEEP_SATURATION,
                     bins: int | None = BINS) -> dict[str, jax.Array]:
    """Statistics of one layer's outputs t (B, units).

    mean, std; saturated: share of saturated outputs (0..1); dead: number of units saturated
    for every example; hist, edges (when bins): density over (-1, 1) for tanh, (0, max) relu.
    """
    mask = saturated(t, activation, threshold)
    out = {"mean": t.mean(), "std": _std(t), "saturated": mask.mean(),
           "dead": jnp.all(mask, axis=0).sum()}
    if bins:
        out["hist"], out["edges"] = histogram(t, *activation_range(t, activation), bins)
    return out


def gradient_stats(g: jax.Array, bins: int | None = BINS) -> dict[str, jax.Array]:
    """mean, std (and a symmetric density histogram) of a gradient."""
    out = {"mean": g.mean(), "std": _std(g)}
    if bins:
        out["hist"], out["edges"] = symmetric_histogram(g, bins)
    return out


def weight_stats(params, grads, bins: int | None = BINS) -> dict[str, dict[str, jax.Array]]:
    """Per 2-D parameter (the lecture's `p.ndim == 2`): grad mean, grad std, grad:data ratio.

    grad_data_ratio = std(grad) / std(param): how large the gradient is next to the values.
    """
    p, g = flat(params), flat(grads)
    out = {}
    for name, w in p.items():
        if w.ndim != 2:
            continue
        s = {"grad_mean": g[name].mean(), "grad_std": _std(g[name])}
        s["grad_data_ratio"] = s["grad_std"] / _std(w)
        if bins:
            s["hist"], s["edges"] = symmetric_histogram(g[name], bins)
        out[name] = s
    return out


def update_ratios(updates, params, ndim: int | None = 2) -> dict[str, jax.Array]:
    """log10(std(update) / std(param)) per parameter; the lecture's `ud` (healthy: about -3).

    `updates` are the optimizer's (for SGD: -lr * grad; the sign does not change the std),
    `params` the values after the update, as the lecture's `p.data`. Only parameters with
    `ndim` dimensions (None: all) are kept: a 1-D parameter that starts constant (batch-norm
    gain, zero biases) has std 0 and an infinite ratio.
    """
    u, p = flat(updates), flat(params)
    return {name: jnp.log10(_std(u[name]) / _std(w)) for name, w in p.items()
            if ndim is None or w.ndim == ndim}


def probe_shapes(variables, X: jax.Array, model: nn.Module):
    """Shapes of the activations the model sows (no computation: `jax.eval_shape`)."""
    def forward():
        _, state = model.apply(variables, X, train=True, mutable=["intermediates", "batch_stats"])
        return state.get("intermediates", {})

    return jax.eval_shape(forward)


HOW_TO_PROBE = ("after each activation to watch, in its __call__: self.sow('intermediates', "
                "name, x); x = jaxmlp.probe_point(self, name, x)")


def check_probe_points(model: nn.Module, sown, variables, X: jax.Array) -> None:
    """ConfigError saying how to add probe points when `model` records no activation, or an
    activation and its probe point do not come in pairs."""
    if not flat(sown):
        raise ConfigError(f"{type(model).__name__} records no activations to diagnose; add, "
                          f"{HOW_TO_PROBE}")

    def probe_points():  # a mutable "perturbations" collection: probe_point creates its zeros
        _, state = model.apply(variables, X, train=True, mutable=["perturbations", "batch_stats"])
        return state.get("perturbations", {})

    perturbed, recorded = set(flat(jax.eval_shape(probe_points))), set(flat(sown))
    for name in sorted(recorded ^ perturbed, key=natural_key):
        what = ("as a probe point it does not record (sow)" if name in perturbed else
                "recorded without a probe point (its gradient cannot be read)")
        raise ConfigError(f"{type(model).__name__} has {name!r} {what}; {HOW_TO_PROBE}")


def probe(variables, X: jax.Array, Y: jax.Array, *, model: nn.Module,
          threshold: float = DEEP_SATURATION, bins: int | None = BINS,
          raw: bool = False) -> dict[str, Any]:
    """One training-mode forward/backward on X (B, T), Y (B,) and everything the lecture plots.

    Pure: the parameters and running statistics are not changed. Returns
        loss: ()
        activations: {layer: activation_stats (+ "values" (B, units) when raw)}
        gradients:   {layer: gradient_stats of d(loss)/d(activation output)}
        weights:     {param: weight_stats}, 2-D parameters only
    Every layer the model sows as "intermediates" must pass through `models.probe_point`.
    """
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    sown = probe_shapes({"params": params, "batch_stats": batch_stats}, X, model)
    check_probe_points(model, sown, variables, X)
    # sow stores a tuple per name; one zero perturbation of the value's shape per name.
    perturbations = jax.tree.map(lambda t: jnp.zeros(t[0].shape, t[0].dtype), sown,
                                 is_leaf=lambda x: isinstance(x, tuple))

    def loss_with_probes(params, perturbations):
        logits, state = model.apply(
            {"params": params, "batch_stats": batch_stats, "perturbations": perturbations},
            X, train=True, mutable=["intermediates", "batch_stats"])
        return cross_entropy(logits, Y), state.get("intermediates", {})

    (loss, inter), (g_params, g_acts) = jax.value_and_grad(
        loss_with_probes, argnums=(0, 1), has_aux=True)(params, perturbations)
    activation = getattr(model, "activation", "tanh")
    acts = {name: t for name, (t,) in flat(inter).items()}
    out = {
        "loss": loss,
        "activations": {n: activation_stats(t, activation, threshold, bins)
                        for n, t in acts.items()},
        "gradients": {n: gradient_stats(g, bins) for n, g in flat(g_acts).items()},
        "weights": weight_stats(params, g_params, bins),
    }
    if raw:
        for name, t in acts.items():
            out["activations"][name]["values"] = t
    return out


probe_jit = jax.jit(probe, static_argnames=("model", "threshold", "bins", "raw"))


def snapshot(state: TrainState, X, Y, *, model: nn.Module,
             batch_size: int = TrainConfig.batch_size,
             threshold: float = DEEP_SATURATION, raw: bool = True) -> dict[str, Any]:
    """`probe` of the minibatch that `state` would train on next, on the host (numpy)."""
    X, Y = jnp.asarray(X), jnp.asarray(Y)
    ix = sample_batch(state.key, state.step, X.shape[0], batch_size)
    return jax.device_get(probe_jit(state.variables, X[ix], Y[ix], model=model,
                                    threshold=threshold, raw=raw))


def check_intervals(num_steps: int, every: int, stats_every: int) -> None:
    """Refuse recording intervals that do not fit the run (ConfigError naming the fix)."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ConfigError(f"--steps must be a positive integer, got {num_steps!r}")
    if not isinstance(every, int) or every < 1:
        raise ConfigError(f"--every must be a positive integer, got {every!r}")
    if num_steps % every:
        raise ConfigError(f"--steps ({num_steps}) must be a multiple of --every ({every}); "
                          f"use e.g. --steps {num_steps - num_steps % every or every}")
    if stats_every < 0 or stats_every % every:
        raise ConfigError(f"--stats-every ({stats_every}) must be 0 or a multiple of --every "
                          f"({every}); use e.g. {10 * every}")


def run_diagnosed(state: TrainState, X: jax.Array, Y: jax.Array,
                  batch_ix: jax.Array | None = None, *, model: nn.Module, config: TrainConfig,
                  num_steps: int, every: int = 1, stats_every: int = 0,
                  threshold: float = DEEP_SATURATION):
    """`num_steps` training steps in one `lax.scan`, recording diagnostics as it goes.

    Each block of `every` steps is `every - 1` plain steps (`train.run_steps`) and one
    instrumented step: `compute_grads` and `apply_grads` (the training step's two halves) plus
    the update ratios of the updates that `apply_grads` returns. When `stats_every` > 0, an
    instrumented step whose (step + 1) is a multiple of it also records the layer statistics of
    its minibatch (`probe` without histograms; a `lax.cond`, so the other steps skip it).
    The parameters follow exactly the steps `run_steps` would take on the same minibatches.

    Returns (state, trace) with, over the num_steps / every instrumented steps:
        trace["step"] (n,): index of each instrumented step (0-based)
        trace["update_ratios"] {param: (n,)}; trace["losses"] (num_steps,) every step's loss
        trace["stats"] (when stats_every): probe output without histograms, stacked (n, ...),
        trace["has_stats"] (n,) bool marking where it was recorded.
    """
    check_intervals(num_steps, every, stats_every)
    X, Y = jnp.asarray(X), jnp.asarray(Y)  # numpy arrays cannot be indexed by traced indices
    tx = make_optimizer(config)
    if batch_ix is None:  # the minibatches `run_steps` draws, for all steps at once
        batch_ix = sample_batches(state.key, state.step, num_steps, X.shape[0],
                                  config.batch_size)

    def instrumented(state, ix):
        Xb, Yb = X[ix], Y[ix]
        loss, batch_stats, grads = compute_grads(state, Xb, Yb, model)
        new_state, updates = apply_grads(state, grads, batch_stats, tx)
        rec = {"step": state.step, "loss": loss,
               "update_ratios": update_ratios(updates, new_state.params)}
        if stats_every:
            def stats():
                return probe(state.variables, Xb, Yb, model=model, threshold=threshold,
                             bins=None)

            take = (state.step + 1) % stats_every == 0
            empty = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(stats))
            rec["stats"] = jax.lax.cond(take, stats, lambda: empty)
            rec["has_stats"] = take
        return new_state, rec

    def block(state, ix):  # ix (every, B)
        losses = jnp.zeros((0,), jnp.float32)
        if every > 1:
            state, losses = run_steps(state, X, Y, ix[:-1], model=model, config=config,
                                      num_steps=every - 1)
        state, rec = instrumented(state, ix[-1])
        rec["losses"] = jnp.concatenate([losses, rec.pop("loss")[None]])
        return state, rec

    blocks = batch_ix.reshape(num_steps // every, every, -1)
    state, trace = jax.lax.scan(block, state, blocks)
    trace["losses"] = trace["losses"].reshape(-1)
    return state, trace


diagnose_chunk = jax.jit(run_diagnosed, static_argnames=(
    "model", "config", "num_steps", "every", "stats_every", "threshold"))


@dataclass
class Diagnosis:
    """A diagnosed run, on the host (numpy)."""

    steps: int
    every: int
    threshold: float
    init: dict  # probe of step 0's minibatch with the initial variables (values kept)
    final: dict  # probe after `steps` steps, of the next minibatch (the lecture's snapshot)
    trace: dict  # run_diagnosed's trace
    state: TrainState
    seconds: float  # the fused run, compilation included
    compile_seconds: float


def diagnose(state: TrainState, X, Y, model: nn.Module, config: TrainConfig, *,
             steps: int, every: int = 1, stats_every: int = 0,
             threshold: float = DEEP_SATURATION, batch_ix=None) -> Diagnosis:
    """Snapshot at init, `steps` steps of `run_diagnosed`, snapshot after them (on the host).

    `batch_ix` (steps, B), when given, are the minibatch indices of the steps (as in
    `run_steps`); otherwise they are drawn on the device from the state's key. A row more,
    (steps + 1, B), gives the final snapshot's minibatch too (the lecture's stream has it).

    The snapshots are `probe` (histograms and values included) of step 0's minibatch with
    the initial variables and of step `steps`'s minibatch with the trained ones: the lecture's
    snapshot (after its loop of 1,000 updates, `layer.out` and `.grad` come from the next
    minibatch's forward/backward). The fused run and the probe compile concurrently (XLA
    releases the GIL), which hides most of the probe's compile time on 2 or more cores.
    """
    import time
    from concurrent.futures import ThreadPoolExecutor

    check_intervals(steps, every, stats_every)
    X, Y = jnp.asarray(X), jnp.asarray(Y)

    def minibatch(state):
        ix = sample_batch(state.key, state.step, X.shape[0], config.batch_size)
        return X[ix], Y[ix]

    t0 = time.perf_counter()
    last = None
    if batch_ix is not None:
        batch_ix = jnp.asarray(batch_ix)
        if batch_ix.shape[0] > steps:
            last, batch_ix = batch_ix[steps], batch_ix[:steps]
    batch0 = minibatch(state) if batch_ix is None else (X[batch_ix[0]], Y[batch_ix[0]])
    run = diagnose_chunk.lower(state, X, Y, batch_ix, model=model, config=config, num_steps=steps,
                               every=every, stats_every=stats_every, threshold=threshold)
    snap = probe_jit.lower(state.variables, *batch0, model=model, threshold=threshold, raw=True)
    with ThreadPoolExecutor(2) as pool:
        run, snap = pool.map(lambda lowered: lowered.compile(), (run, snap))
    compile_seconds = time.perf_counter() - t0
    init = snap(state.variables, *batch0)
    state, trace = run(state, X, Y, batch_ix)
    final = snap(state.variables, *(minibatch(state) if last is None else (X[last], Y[last])))
    trace, init, final = jax.device_get((trace, init, final))  # the one host sync of the run
    seconds = time.perf_counter() - t0
    return Diagnosis(steps, every, threshold, init, final, trace, state, seconds,
                     compile_seconds)


def stack_inits(model_fn, gains, key: jax.Array, X: jax.Array):
    """Initial params of `model_fn(gain)` for each gain, stacked on a leading axis (for vmap).

    The gain only changes the initial values, so one module (any gain) applies all of them.
    """
    return jax.tree.map(lambda *xs: jnp.stack(xs), *[
        model_fn(g).init(key, X[:2], train=False)["params"] for g in gains])


@functools.partial(jax.jit, static_argnames=("model", "threshold", "bins"))
def probe_many(params, X, Y, *, model: nn.Module, threshold: float = DEEP_SATURATION,
               bins: int = BINS):
    """`probe` vmapped over params stacked on axis 0 (e.g. one per gain), on one minibatch."""
    return jax.vmap(lambda p: probe({"params": p}, X, Y, model=model, threshold=threshold,
                                    bins=bins, raw=False))(params)
