"""The PyTorch lecture's own training loops, transcribed: the reference every comparison, and
the benchmark, runs against.

    lecture_train, lecture_split_loss            the shallow MLP (the five stages)
    lecture_train_deep, lecture_split_loss_deep  the deep network, with the lecture's Linear /
                                                 BatchNorm1d / Tanh classes and its `ud` list
    lecture_loop                                 the loop both share
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

import numpy as np
from flax import linen as nn

from jaxmlp.errors import ConfigError
from jaxmlp.models import DeepMLP
from jaxmlp.stages import Schedule
from jaxmlp.torch_bridge.convert import import_torch
from jaxmlp.torch_bridge.lecture import check_model, layer_index
from jaxmlp.train import TrainConfig


def lecture_train(tensors: dict, generator, X, Y, steps: int, schedule: Schedule | None = None,
                  batch_size: int = TrainConfig.batch_size, num_threads: int | None = 1,
                  log: Callable[[int, float], None] | None = None):
    """The lecture's training loop in PyTorch, transcribed; returns (losses, tensors).

    tensors: from `lecture_init` (the lecture's names; batch norm when "bngain" is present,
    with the hand-written semantics: unbiased std, no epsilon, 0.999/0.001 running std).
    generator: continues the stream (each step draws its own torch.randint, as the lecture).
    X (N, T), Y (N,): the training split. losses: (steps,) float32, every step's loss.
    The input tensors are left alone: the loop trains copies and returns them. `num_threads`
    (the lecture's figures use 1) is set for the loop and restored after.
    """
    torch = import_torch()
    schedule = schedule or Schedule()
    t = {k: v.detach().clone() for k, v in tensors.items()}
    batchnorm = "bngain" in t
    if batchnorm and "bnstd_running" not in t:
        raise ConfigError("the lecture loop implements its hand-written batch norm (running "
                          "std); use a model with bn_semantics='lecture'")
    C, W1, W2, b2 = t["C"], t["W1"], t["W2"], t["b2"]
    if batchnorm:
        bngain, bnbias = t["bngain"], t["bnbias"]
        parameters = [C, W1, W2, b2, bngain, bnbias]
    else:
        b1 = t["b1"]
        parameters = [C, W1, b1, W2, b2]

    def forward(Xb):  # (B, T) -> logits (B, vocab), as the lecture's cell
        emb = C[Xb]  # embed the characters into vectors
        embcat = emb.view(emb.shape[0], -1)  # concatenate the vectors
        if batchnorm:
            hpreact = embcat @ W1  # hidden layer pre-activation (b1 dropped)
            bnmeani = hpreact.mean(0, keepdim=True)
            bnstdi = hpreact.std(0, keepdim=True)
            hpreact = bngain * (hpreact - bnmeani) / bnstdi + bnbias
            with torch.no_grad():
                t["bnmean_running"] = 0.999 * t["bnmean_running"] + 0.001 * bnmeani
                t["bnstd_running"] = 0.999 * t["bnstd_running"] + 0.001 * bnstdi
        else:
            hpreact = embcat @ W1 + b1  # hidden layer pre-activation
        h = torch.tanh(hpreact)  # hidden layer
        return h @ W2 + b2  # output layer

    on_step = None if log is None else lambda i, lr, loss: log(i, loss)
    lossi = lecture_loop(torch, parameters, forward, generator, X, Y, steps, schedule,
                          batch_size, num_threads, on_step)
    return lossi, t


def lecture_loop(torch, parameters: list, forward, generator, X, Y, steps: int,
                  schedule: Schedule, batch_size: int, num_threads: int | None,
                  on_step: Callable[[int, float, float], None] | None) -> np.ndarray:
    """The lecture's training loop around `forward` (its minibatch draw, cross-entropy,
    backward and `p.data += -lr * p.grad`); trains `parameters` in place, returns the
    (steps,) float32 losses. `on_step(i, lr, loss)` runs after each update."""
    import torch.nn.functional as F

    Xtr, Ytr = torch.as_tensor(np.asarray(X, np.int64)), torch.as_tensor(np.asarray(Y, np.int64))
    for p in parameters:
        p.requires_grad = True
    lossi = np.empty(steps, np.float32)
    threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        for i in range(steps):
            # minibatch construct
            ix = torch.randint(0, Xtr.shape[0], (batch_size,), generator=generator)
            Xb, Yb = Xtr[ix], Ytr[ix]  # batch X,Y
            loss = F.cross_entropy(forward(Xb), Yb)  # forward pass, loss function
            # backward pass
            for p in parameters:
                p.grad = None
            loss.backward()
            # update (the lecture: lr = 0.1 if i < 100000 else 0.01)
            lr = schedule.learning_rates[bisect.bisect_right(schedule.boundaries, i)]
            for p in parameters:
                p.data += -lr * p.grad
            lossi[i] = loss.item()
            if on_step is not None:
                on_step(i, lr, lossi[i])
    finally:
        torch.set_num_threads(threads)
    for p in parameters:
        p.requires_grad = False
    return lossi


def lecture_split_loss(tensors: dict, X, Y) -> float:
    """The lecture's `split_loss`: eval-mode loss with the running batch-norm statistics."""
    torch = import_torch()
    import torch.nn.functional as F

    t = tensors
    x, y = torch.as_tensor(np.asarray(X, np.int64)), torch.as_tensor(np.asarray(Y, np.int64))
    with torch.no_grad():
        emb = t["C"][x]  # (N, block_size, n_embd)
        embcat = emb.view(emb.shape[0], -1)  # concat into (N, block_size * n_embd)
        if "bngain" in t:
            hpreact = embcat @ t["W1"]
            hpreact = (t["bngain"] * (hpreact - t["bnmean_running"]) / t["bnstd_running"]
                       + t["bnbias"])
        else:
            hpreact = embcat @ t["W1"] + t["b1"]
        h = torch.tanh(hpreact)
        logits = h @ t["W2"] + t["b2"]
        return F.cross_entropy(logits, y).item()


# ---------------------------------------------------------------------------------------------
# The deep network's PyTorch loop: the lecture's Linear / BatchNorm1d / Tanh classes


def _lecture_layers(tensors: dict, model: DeepMLP, torch):
    """The lecture's `layers` list over `tensors` (shared, not copied): callables x -> x."""

    class Linear:  # the lecture's: self.out = x @ self.weight (+= self.bias)
        def __init__(self, i):
            self.weight, self.bias = tensors[f"layers.{i}.weight"], tensors.get(f"layers.{i}.bias")

        def __call__(self, x):
            out = x @ self.weight
            if self.bias is not None:
                out += self.bias
            return out

    class BatchNorm1d:  # the lecture's: unbiased var, eps 1e-5, momentum 0.1, running var
        eps, momentum = 1e-5, 0.1

        def __init__(self, i):
            self.i, self.training = i, True
            self.gamma, self.beta = tensors[f"layers.{i}.gamma"], tensors[f"layers.{i}.beta"]

        def __call__(self, x):
            key = f"layers.{self.i}.running_"
            if self.training:
                xmean, xvar = x.mean(0, keepdim=True), x.var(0, keepdim=True)
            else:
                xmean, xvar = tensors[key + "mean"], tensors[key + "var"]
            out = self.gamma * ((x - xmean) / torch.sqrt(xvar + self.eps)) + self.beta
            if self.training:
                with torch.no_grad():
                    m = self.momentum
                    tensors[key + "mean"] = (1 - m) * tensors[key + "mean"] + m * xmean
                    tensors[key + "var"] = (1 - m) * tensors[key + "var"] + m * xvar
            return out

    make = {"linear": Linear, "bn": BatchNorm1d, "tanh": lambda i: torch.tanh}
    return [make[name.rstrip("0123456789")](layer_index(name)) for name in model.layer_names]


def lecture_train_deep(tensors: dict, generator, X, Y, steps: int, model: nn.Module,
                       schedule: Schedule | None = None,
                       batch_size: int = TrainConfig.batch_size,
                       num_threads: int | None = 1, ud: bool = False):
    """The lecture's deep-network loop in PyTorch; returns (losses, tensors, ud).

    tensors: from `lecture_init(model)`; generator continues the stream (one torch.randint per
    step). losses (steps,) float32; ud: when asked, (steps, n_2d_params) float32, the lecture's
    `ud` list restricted to its plotted 2-D parameters, log10(std(lr * grad) / std(param)) in
    the order C, then each Linear weight (else None). The input tensors are left alone.
    """
    torch = import_torch()
    m = check_model(model)
    if not isinstance(m, DeepMLP):
        raise ConfigError("lecture_train_deep trains the deep network; use lecture_train for "
                          "the shallow MLP")
    schedule = schedule or Schedule((0.1, 0.01), (150_000,))
    t = {k: v.detach().clone() for k, v in tensors.items()}
    layers = _lecture_layers(t, m, torch)
    names = [k for k in t if not k.split(".")[-1].startswith("running")]  # C, then layer order
    parameters = [t[k] for k in names]
    matrices = [p for p in parameters if p.ndim == 2]

    def forward(Xb):
        emb = t["C"][Xb]
        x = emb.view(emb.shape[0], -1)
        for layer in layers:
            x = layer(x)
        return x

    udi = []

    def record_ud(i, lr, loss):
        with torch.no_grad():
            udi.append([((lr * p.grad).std() / p.data.std()).log10().item() for p in matrices])

    lossi = lecture_loop(torch, parameters, forward, generator, X, Y, steps, schedule,
                          batch_size, num_threads, record_ud if ud else None)
    return lossi, t, np.array(udi, np.float32).reshape(steps, len(matrices)) if ud else None


def lecture_split_loss_deep(tensors: dict, X, Y, model: nn.Module) -> float:
    """The deep network's eval-mode loss with the lecture's classes (running statistics)."""
    torch = import_torch()
    import torch.nn.functional as F

    layers = _lecture_layers(dict(tensors), check_model(model), torch)
    for layer in layers:
        if hasattr(layer, "training"):
            layer.training = False
    x = torch.as_tensor(np.asarray(X, np.int64))
    with torch.no_grad():
        out = tensors["C"][x].view(x.shape[0], -1)
        for layer in layers:
            out = layer(out)
        return F.cross_entropy(out, torch.as_tensor(np.asarray(Y, np.int64))).item()
