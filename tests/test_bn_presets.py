"""Every batch-norm preset against its reference implementation, on random data.

References: torch.nn.BatchNorm1d ("torch"), direct PyTorch transcriptions of the lecture's
hand-written batch norm ("lecture") and of its BatchNorm1d class ("lecture-class"), and
flax.linen.BatchNorm ("flax"). Checked over several training steps: the output, the running
statistics, the gradients wrt input, scale and bias, then the eval output, all to 1e-5.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxmlp.models import BN_PRESETS, BatchNorm1d

try:
    import torch  # noqa: F401
    HAVE_TORCH = True
except ImportError:  # the flax preset is still checked; the torch references skip
    HAVE_TORCH = False

TOL = 1e-5  # relative, and absolute against each array's largest magnitude (see assert_matches)
STEPS = 3  # training steps per case: the running statistics compound


def _train_then_eval(apply_train, apply_eval, params, stats, xs, x_eval, w):
    """Scan training steps (output, running stats, grads) then one eval pass, in one jit."""

    def step(stats, x):
        def f(x, params):
            y, new_stats = apply_train(params, stats, x)
            return (y * w).sum(), (y, new_stats)

        (_, (y, new_stats)), (gx, gp) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
            x, params)
        return new_stats, (y, new_stats, gx, gp["scale"], gp["bias"])

    stats, (y, per_step_stats, gx, gs, gb) = jax.lax.scan(step, stats, xs)
    return y, per_step_stats, gx, gs, gb, apply_eval(params, stats, x_eval)


@functools.partial(jax.jit, static_argnums=0)
def _jaxmlp_run(bn, params, stats, xs, x_eval, w):
    def apply_train(params, stats, x):
        y, upd = bn.apply({"params": params, "batch_stats": stats}, x, train=True,
                          mutable=["batch_stats"])
        return y, upd["batch_stats"]

    def apply_eval(params, stats, x):
        return bn.apply({"params": params, "batch_stats": stats}, x, train=False)

    return _train_then_eval(apply_train, apply_eval, params, stats, xs, x_eval, w)


def _collect(result, stat):
    y, stats, gx, gs, gb, y_eval = jax.tree.map(np.asarray, result)
    return dict(y=y, mean=stats["mean"], stat=stats[stat], gx=gx, gscale=gs, gbias=gb,
                eval=y_eval)


def _params(case):
    return {"scale": jnp.asarray(case["scale"]), "bias": jnp.asarray(case["bias"])}


def run_jaxmlp(semantics, case, momentum=None, epsilon=None):
    """Train-mode steps then eval with jaxmlp.BatchNorm1d; returns a dict of numpy arrays."""
    bn = BatchNorm1d(semantics, momentum=momentum, epsilon=epsilon)
    stats = bn.init(jax.random.key(0), case["xs"][0], train=False)["batch_stats"]
    result = _jaxmlp_run(bn, _params(case), stats, case["xs"], case["x_eval"], case["w"])
    return _collect(result, BN_PRESETS[semantics].stat)


def make_case(seed, batch, features, steps=STEPS):
    """Random inputs with a non-zero mean and uneven spread, random scale/bias/output weights."""
    rng = np.random.default_rng(seed)
    loc = rng.normal(0, 3, features)
    spread = rng.uniform(0.3, 3, features)
    xs = (loc + spread * rng.normal(size=(steps, batch, features))).astype(np.float32)
    x_eval = (loc + spread * rng.normal(size=(7, features))).astype(np.float32)
    return dict(xs=xs, x_eval=x_eval,
                scale=rng.normal(1, 0.5, features).astype(np.float32),
                bias=rng.normal(0, 0.5, features).astype(np.float32),
                w=rng.normal(size=(batch, features)).astype(np.float32))


def _torch_loop(case, forward, stats, param_shape=(-1,)):
    """Run a PyTorch batch norm step by step.

    forward(x, gain, bias, train) -> y; stats() -> (running mean, running std or var).
    """
    torch = pytest.importorskip("torch")
    gain = torch.tensor(case["scale"]).reshape(param_shape).requires_grad_()
    bias = torch.tensor(case["bias"]).reshape(param_shape).requires_grad_()
    w = torch.tensor(case["w"])
    out = {k: [] for k in ("y", "mean", "stat", "gx", "gscale", "gbias")}
    for x in case["xs"]:
        x = torch.tensor(x, requires_grad=True)
        y = forward(x, gain, bias, train=True)
        (y * w).sum().backward()
        mean, stat = stats()
        for k, v in zip(out, (y, mean, stat, x.grad, gain.grad, bias.grad), strict=True):
            v = v.detach().numpy()
            out[k].append(v.copy() if k in ("y", "gx") else v.reshape(-1).copy())
        gain.grad = bias.grad = None
    out = {k: np.stack(v) for k, v in out.items()}
    with torch.no_grad():
        out["eval"] = forward(torch.tensor(case["x_eval"]), gain, bias, train=False).numpy()
    return out


def ref_torch_nn(case, momentum, eps):
    """torch.nn.BatchNorm1d itself."""
    torch = pytest.importorskip("torch")
    bn = torch.nn.BatchNorm1d(case["xs"].shape[-1], eps=eps, momentum=momentum)
    bn.weight = torch.nn.Parameter(torch.tensor(case["scale"]))
    bn.bias = torch.nn.Parameter(torch.tensor(case["bias"]))
    w = torch.tensor(case["w"])
    out = {k: [] for k in ("y", "mean", "stat", "gx", "gscale", "gbias")}
    for x in case["xs"]:
        x = torch.tensor(x, requires_grad=True)
        y = bn(x)
        (y * w).sum().backward()
        for k, v in zip(out, (y, bn.running_mean, bn.running_var, x.grad, bn.weight.grad,
                              bn.bias.grad), strict=True):
            out[k].append(v.detach().numpy().copy())
        bn.zero_grad(set_to_none=True)
    out = {k: np.stack(v) for k, v in out.items()}
    bn.eval()
    with torch.no_grad():
        out["eval"] = bn(torch.tensor(case["x_eval"])).numpy()
    return out


def ref_lecture(case, momentum, eps):
    """The lecture's hand-written batch norm, transcribed (momentum 0.001, no epsilon).

    With an epsilon override the natural extension: normalise by sqrt(var + eps), keep the
    running std itself epsilon-free.
    """
    torch = pytest.importorskip("torch")
    features = case["xs"].shape[-1]
    run = {"bnmean_running": torch.zeros((1, features)),
           "bnstd_running": torch.ones((1, features))}

    def forward(hpreact, bngain, bnbias, train):
        if not train:
            std = run["bnstd_running"] if eps == 0 else (run["bnstd_running"] ** 2 + eps).sqrt()
            return bngain * (hpreact - run["bnmean_running"]) / std + bnbias
        bnmeani = hpreact.mean(0, keepdim=True)
        bnstdi = hpreact.std(0, keepdim=True)
        denom = bnstdi if eps == 0 else (hpreact.var(0, keepdim=True) + eps).sqrt()
        hpreact = bngain * (hpreact - bnmeani) / denom + bnbias
        with torch.no_grad():
            run["bnmean_running"] = (1 - momentum) * run["bnmean_running"] + momentum * bnmeani
            run["bnstd_running"] = (1 - momentum) * run["bnstd_running"] + momentum * bnstdi
        return hpreact

    # bngain, bnbias are (1, n_hidden) in the lecture.
    return _torch_loop(case, forward, lambda: (run["bnmean_running"], run["bnstd_running"]),
                       param_shape=(1, -1))


def ref_lecture_class(case, momentum, eps):
    """The lecture's BatchNorm1d class, transcribed."""
    torch = pytest.importorskip("torch")

    class LectureBatchNorm1d:
        def __init__(self, dim, eps=1e-5, momentum=0.1):
            self.eps = eps
            self.momentum = momentum
            self.training = True
            self.running_mean = torch.zeros(dim)
            self.running_var = torch.ones(dim)

        def __call__(self, x, gamma, beta):
            if self.training:
                xmean = x.mean(0, keepdim=True)
                xvar = x.var(0, keepdim=True)
            else:
                xmean = self.running_mean
                xvar = self.running_var
            xhat = (x - xmean) / torch.sqrt(xvar + self.eps)
            self.out = gamma * xhat + beta
            if self.training:
                with torch.no_grad():
                    self.running_mean = ((1 - self.momentum) * self.running_mean
                                         + self.momentum * xmean)
                    self.running_var = ((1 - self.momentum) * self.running_var
                                        + self.momentum * xvar)
            return self.out

    bn = LectureBatchNorm1d(case["xs"].shape[-1], eps=eps, momentum=momentum)

    def forward(x, gain, bias, train):
        bn.training = train
        return bn(x, gain, bias)

    return _torch_loop(case, forward, lambda: (bn.running_mean, bn.running_var))


@functools.partial(jax.jit, static_argnums=0)
def _flax_run(bn, params, stats, xs, x_eval, w):
    def apply_train(params, stats, x):
        y, upd = bn.apply({"params": params, "batch_stats": stats}, x,
                          use_running_average=False, mutable=["batch_stats"])
        return y, upd["batch_stats"]

    def apply_eval(params, stats, x):
        return bn.apply({"params": params, "batch_stats": stats}, x, use_running_average=True)

    return _train_then_eval(apply_train, apply_eval, params, stats, xs, x_eval, w)


def ref_flax(case, momentum, eps):
    """flax.linen.BatchNorm; its `momentum` is the weight of the OLD value."""
    bn = nn.BatchNorm(momentum=1 - momentum, epsilon=eps, use_fast_variance=False)
    stats = bn.init(jax.random.key(0), case["xs"][0], use_running_average=False)["batch_stats"]
    return _collect(_flax_run(bn, _params(case), stats, case["xs"], case["x_eval"], case["w"]),
                    "var")


REFERENCES = {"torch": ref_torch_nn, "lecture": ref_lecture,
              "lecture-class": ref_lecture_class, "flax": ref_flax}


def assert_matches(semantics, case, momentum=None, epsilon=None):
    spec = BN_PRESETS[semantics]
    m = spec.momentum if momentum is None else momentum
    eps = spec.epsilon if epsilon is None else epsilon
    ref = REFERENCES[semantics](case, m, eps)
    got = run_jaxmlp(semantics, case, momentum, epsilon)
    assert set(got) == set(ref)
    for k in ref:
        # float32 sums over the batch (the scale/bias gradients) carry rounding of order
        # 1e-7 * sqrt(B) * |terms|, so the absolute part scales with the array; a semantic slip
        # (biased vs unbiased: a factor B/(B-1); eps; momentum) is still orders above this.
        atol = TOL * max(1.0, float(np.abs(ref[k]).max()))
        np.testing.assert_allclose(got[k], ref[k], rtol=TOL, atol=atol,
                                   err_msg=f"{semantics} {k} (momentum {m}, eps {eps})")


def test_presets_are_the_documented_conventions():
    # The table in docs/reference.md, "Batch-norm semantics differ between frameworks".
    got = {k: (v.stat, v.unbiased_norm, v.unbiased_running, v.momentum, v.epsilon)
           for k, v in BN_PRESETS.items()}
    assert got == {"lecture": ("std", True, True, 0.001, 0.0),
                   "lecture-class": ("var", True, True, 0.1, 1e-5),
                   "torch": ("var", False, True, 0.1, 1e-5),
                   "flax": ("var", False, False, 0.01, 1e-5)}


@pytest.mark.parametrize("semantics", sorted(REFERENCES))
# Batch 2 is left out: its normalised output is +-1 whatever x, so d/dx is 0 up to rounding noise.
@pytest.mark.parametrize("batch, features", [(32, 200), (3, 5)])
def test_preset_defaults_match_reference(semantics, batch, features):
    assert_matches(semantics, make_case(batch * 1000 + features, batch, features))


@settings(max_examples=6, deadline=None)
@given(semantics=st.sampled_from(sorted(REFERENCES) if HAVE_TORCH else ["flax"]),
       seed=st.integers(0, 2**31 - 1), batch=st.integers(3, 64), features=st.integers(1, 48),
       momentum=st.floats(1e-3, 1.0), epsilon=st.sampled_from([0.0, 1e-5, 1e-3, 0.1]))
def test_preset_overrides_match_reference(semantics, seed, batch, features, momentum, epsilon):
    if epsilon == 0.0 and semantics in ("torch", "flax"):
        epsilon = 1e-5  # torch rejects eps 0 in training; only the lecture's forms run without
    assert_matches(semantics, make_case(seed, batch, features), momentum, epsilon)


def test_flax_preset_momentum_is_not_flax_momentum():
    # jaxmlp's momentum is the NEW value's weight: 0.01 here is Flax's momentum=0.99.
    case = make_case(7, 32, 200)  # the shapes of a default case: its compiled run is reused
    got = run_jaxmlp("flax", case)
    ref_wrong = ref_flax(case, momentum=0.99, eps=1e-5)  # Flax momentum=0.01 (as PyTorch's)
    assert not np.allclose(got["stat"], ref_wrong["stat"], rtol=TOL, atol=TOL)
