"""The PyTorch side of the bridge: jaxmlp's models written with torch.nn.

    TorchMLP               models.MLP: embed -> flatten -> hidden -> [bn] -> tanh -> out
    TorchDeepMLP           models.DeepMLP: embed -> flatten -> layers (the lecture's list)
    VarianceBatchNorm1d    nn.BatchNorm1d with Bessel's correction chosen for each variance
    StdBatchNorm1d         the lecture's hand-written batch norm (a running std)

Every layer is a standard `torch.nn` one (Embedding, Linear, BatchNorm1d, LayerNorm, Tanh,
ReLU) except the two batch norms whose semantics torch.nn.BatchNorm1d cannot express; build
them with `convert.torch_module(model)`, which picks the layer for each batch-norm preset.

This module imports torch: the rest of jaxmlp imports it only inside functions.
"""

from __future__ import annotations

import torch
from torch import nn


class TorchMLP(nn.Module):
    """The lecture's embedding MLP: tokens (B, block_size) int -> logits (B, vocab_size).

    `bn` is None without batch norm (then `hidden` has a bias).
    """

    def __init__(self, embed: nn.Embedding, hidden: nn.Linear, bn: nn.Module | None,
                 out: nn.Linear):
        super().__init__()
        self.embed, self.hidden, self.bn, self.out = embed, hidden, bn, out

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        hpreact = self.hidden(self.embed(idx).flatten(1))  # (B, n_hidden)
        if self.bn is not None:
            hpreact = self.bn(hpreact)
        return self.out(torch.tanh(hpreact))  # (B, vocab_size)


class TorchDeepMLP(nn.Module):
    """The lecture's deep network: tokens (B, block_size) int -> logits (B, vocab_size).

    `layers` is the lecture's `layers` list: layers[i] is DeepMLP's layer i (linear0, bn1,
    tanh2, ...), so its state_dict keys are `layers.{i}.weight` and so on.
    """

    def __init__(self, embed: nn.Embedding, layers: list[nn.Module]):
        super().__init__()
        self.embed = embed
        self.layers = nn.Sequential(*layers)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.layers(self.embed(idx).flatten(1))


def batch_moments(x: torch.Tensor, unbiased_norm: bool, unbiased_running: bool):
    """x (B, F) -> (x - mean (B, F), normalising variance (F,), running variance (F,), mean).

    The two variances differ only in the divisor, B - 1 (Bessel's correction) or B.
    """
    n = x.shape[0]
    mean = x.mean(0)
    xc = x - mean
    sq = (xc * xc).sum(0)  # two passes: no E[x^2] - E[x]^2 cancellation
    return xc, sq / (n - 1 if unbiased_norm else n), sq / (n - 1 if unbiased_running else n), mean


class VarianceBatchNorm1d(nn.BatchNorm1d):
    """nn.BatchNorm1d with Bessel's correction chosen separately for its two variances.

    torch.nn.BatchNorm1d normalises a training batch with the biased variance (divisor B) and
    feeds the unbiased one (B - 1) into `running_var`. The lecture's own BatchNorm1d class uses
    `x.var(0)`, unbiased, for both; flax.linen.BatchNorm the biased one for both. Training mode
    computes

        out = weight * (x - mean) / sqrt(var_norm + eps) + bias
        running_mean = (1 - momentum) * running_mean + momentum * mean
        running_var  = (1 - momentum) * running_var + momentum * var_running

    Eval mode, the parameters and the state_dict keys are nn.BatchNorm1d's own.
    """

    def __init__(self, num_features: int, eps: float, momentum: float, unbiased_norm: bool,
                 unbiased_running: bool):
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.unbiased_norm, self.unbiased_running = unbiased_norm, unbiased_running

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, F) -> (B, F)
        if not self.training:
            return super().forward(x)
        xc, var, var_running, mean = batch_moments(x, self.unbiased_norm, self.unbiased_running)
        with torch.no_grad():  # the running statistics take no gradient
            m = self.momentum
            self.running_mean.copy_((1 - m) * self.running_mean + m * mean)
            self.running_var.copy_((1 - m) * self.running_var + m * var_running)
            self.num_batches_tracked.add_(1)
        return self.weight * xc / torch.sqrt(var + self.eps) + self.bias

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, unbiased_norm={self.unbiased_norm}, "
                f"unbiased_running={self.unbiased_running}")


class StdBatchNorm1d(nn.Module):
    """The lecture's hand-written batch norm, which keeps a running standard deviation:

        bnmeani = hpreact.mean(0, keepdim=True)
        bnstdi = hpreact.std(0, keepdim=True)
        hpreact = bngain * (hpreact - bnmeani) / bnstdi + bnbias
        bnmean_running = 0.999 * bnmean_running + 0.001 * bnmeani
        bnstd_running = 0.999 * bnstd_running + 0.001 * bnstdi

    and at eval time divides by bnstd_running itself. nn.BatchNorm1d averages variances, and a
    mean of standard deviations is not the square root of a mean of variances, so no setting
    of it computes this. Parameters `weight` (bngain) and `bias` (bnbias); buffers
    `running_mean` and `running_std` (bnmean_running, bnstd_running), all (num_features,).

    eps (0 in the lecture) is added to the variance before the square root; with eps > 0 eval
    mode divides by sqrt(running_std**2 + eps). momentum is the weight of the new value.
    """

    def __init__(self, num_features: int, eps: float = 0.0, momentum: float = 0.001,
                 unbiased_norm: bool = True, unbiased_running: bool = True):
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.unbiased_norm, self.unbiased_running = unbiased_norm, unbiased_running
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_std", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, F) -> (B, F)
        if not self.training:
            if self.eps == 0:
                denom = self.running_std
            else:
                denom = torch.sqrt(self.running_std * self.running_std + self.eps)
            return self.weight * (x - self.running_mean) / denom + self.bias
        xc, var, var_running, mean = batch_moments(x, self.unbiased_norm, self.unbiased_running)
        with torch.no_grad():
            m = self.momentum
            self.running_mean.copy_((1 - m) * self.running_mean + m * mean)
            self.running_std.copy_((1 - m) * self.running_std + m * torch.sqrt(var_running))
        return self.weight * xc / torch.sqrt(var + self.eps) + self.bias

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"unbiased_norm={self.unbiased_norm}, unbiased_running={self.unbiased_running}")
