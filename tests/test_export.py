"""The same programs on GPU and TPU, proved without either: the training chunk, the sweep chunk
and the final evaluation lower for the platforms cpu, cuda and tpu (lowering needs no device),
and the exported program, run back here, computes what the jitted one does. CPU-only settings
(compiler options, the CPU device split) never reach another platform."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from jaxmlp import devices, evaluate, program_cache, sweep, train
from jaxmlp.stages import make_model

PLATFORMS = ("cpu", "cuda", "tpu")


@pytest.fixture(scope="module")
def setup(names_data):
    model = make_model("batchnorm", names_data.vocab.size, block_size=names_data.block_size,
                       n_hidden=32)
    config = train.TrainConfig(steps=20, chunk=5)
    X, Y = (jnp.asarray(a) for a in names_data.train)
    ix = jax.random.randint(jax.random.key(1), (5, 32), 0, X.shape[0])
    return model, config, X, Y, ix


def exported(fn, *args, **static):
    """`fn` exported for every platform: one StableHLO module a GPU or TPU host would load."""
    exp = export.export(fn, platforms=PLATFORMS)(*args, **static)
    assert exp.platforms == PLATFORMS
    return exp


def close(a, b):
    a, b = (jax.tree.map(lambda x: jax.random.key_data(x) if jnp.issubdtype(
        x.dtype, jax.dtypes.prng_key) else x, t) for t in (a, b))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)


def test_the_training_chunk_exports_for_every_platform(setup):
    model, config, X, Y, ix = setup
    state = train.create_train_state(jax.random.key(0), model, config)
    static = dict(model=model, config=config, num_steps=5)
    program = exported(train.train_chunk, state, X, Y, ix, **static)
    got = program.call(state, X, Y, ix)
    close(got, train.run_steps(state, X, Y, ix, **static))  # not donating `state`
    assert int(got[0].step) == 5


@pytest.mark.parametrize("mesh", ["devices", "abstract"])
def test_the_sweep_chunk_exports_for_every_platform(setup, mesh):
    model, config, X, Y, ix = setup
    states = sweep.seed_states(range(2), model, config)
    mesh = (devices.run_mesh(num_runs=2) if mesh == "devices"
            else jax.sharding.AbstractMesh((1,), (devices.RUNS,)))
    static = dict(model=model, config=config, num_steps=5, mesh=mesh)
    exp = export.export(sweep.train_many_chunk, platforms=PLATFORMS)(states, X, Y, ix, None,
                                                                     **static)
    assert exp.platforms == PLATFORMS
    # the losses of two runs over five steps, whatever the platform
    assert [str(a) for a in exp.out_avals][-1] == "float32[2,5]"


def test_the_final_evaluation_exports_for_every_platform(setup):
    model, config, X, Y, _ = setup
    state = train.create_train_state(jax.random.key(0), model, config)
    arrays = ((X, Y), (X[:1000], Y[:1000]))
    static = dict(model=model, batch_sizes=(4096, 1000), calibrated=True)
    program = exported(evaluate._eval_final, state.variables, arrays, **static)
    close(program.call(state.variables, arrays),
          evaluate._eval_final(state.variables, arrays, **static))


def test_cpu_only_settings_stay_on_the_cpu():
    for platform in ("cuda", "gpu", "rocm", "tpu"):
        assert program_cache.compiler_options(platform) == {}
    # A GPU or TPU trains all of its runs in one vmap; a CPU a few at a time.
    assert devices.vmap_width("gpu", 16, None) == 16 and devices.vmap_width("tpu", 16, None) == 16
    assert devices.vmap_width("cpu", 16, None) < 16


def test_the_cpu_arrangement_of_the_products_stays_on_the_cpu(setup):
    """`models.matmul` arranges the weight gradients for XLA's CPU matmul library with
    optimization barriers (stored transposes); lowered for a GPU or TPU, the training step is
    the plain product's derivative."""
    model, config, X, Y, ix = setup
    state = train.create_train_state(jax.random.key(0), model, config)
    static = dict(model=model, config=config, num_steps=5)

    def module(platform):
        return export.export(train.train_chunk, platforms=(platform,))(
            state, X, Y, ix, **static).mlir_module()

    assert "optimization_barrier" in module("cpu")
    for platform in ("cuda", "tpu"):
        assert "optimization_barrier" not in module(platform)
