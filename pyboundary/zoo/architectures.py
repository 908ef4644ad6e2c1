"""Small reference classifiers for any input shape.

:func:`build` makes an untrained ``lenet``, ``lenet-smooth``, ``mlp`` or ``resnet-small``
(``lenet-smooth``: the LeNet layout with softplus and average pooling, a smooth function of its
input, for curvature measurements). All return logits (N, n_classes) for inputs (N, C, H, W).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from .._utils.validation import check_int

__all__ = ["ARCHS", "build", "LeNet", "LeNetSmooth", "MLP", "ResNetSmall"]

ARCHS = ("lenet", "lenet-smooth", "mlp", "resnet-small")


_ACTIVATIONS = {"relu": nn.ReLU, "softplus": nn.Softplus, "silu": nn.SiLU, "elu": nn.ELU}


_POOLS = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}


class LeNet(nn.Module):
    """LeNet-style CNN: two 5x5 conv (width, 2*width channels) + ReLU + 2x2 max-pool stages, then
    two linear layers (hidden units, then n_classes).

    Spatial sizes: H -> H//2 -> H//4 (padding 2 keeps the conv sizes); when H//4 or W//4 exceed 7
    an adaptive average pool reduces the map to at most 7x7 so the classifier stays small.
    ``activation`` ("relu", "softplus", "silu", "elu") and ``pool`` ("max", "avg") change the
    nonlinearities without changing the parameters (same state-dict names and shapes).
    """

    def __init__(self, in_shape: Sequence[int], n_classes: int, width: int = 8, hidden: int = 128, *,
                 activation: str = "relu", pool: str = "max"):
        super().__init__()
        c, h, w = in_shape
        if h < 4 or w < 4:
            raise ValueError(f"in_shape: lenet needs H, W >= 4, got {tuple(in_shape)}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {list(_ACTIVATIONS)}, got {activation!r}")
        if pool not in _POOLS:
            raise ValueError(f"pool must be one of {list(_POOLS)}, got {pool!r}")
        act, pooling = _ACTIVATIONS[activation], _POOLS[pool]
        h4, w4 = h // 4, w // 4
        oh, ow = min(h4, 7), min(w4, 7)
        layers = [
            nn.Conv2d(c, width, 5, padding=2), act(), pooling(2),
            nn.Conv2d(width, 2 * width, 5, padding=2), act(), pooling(2),
        ]
        if (oh, ow) != (h4, w4):
            layers.append(nn.AdaptiveAvgPool2d((oh, ow)))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * oh * ow, hidden), act(), nn.Linear(hidden, n_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class LeNetSmooth(LeNet):
    """The :class:`LeNet` layout with softplus activations and 2x2 average pooling (``lenet-smooth``).

    An infinitely differentiable function of its input: no ReLU kinks and no max-pool ties (inputs
    with exactly-constant regions, such as the zero backgrounds of Fashion-MNIST, do not sit on
    kinks), so exact Hessians (double backward) exist and finite differences converge as h -> 0.
    Same parameters as ``lenet`` (``activation="silu"`` or ``"elu"`` also accepted; elu is only
    once differentiable).
    """

    def __init__(self, in_shape: Sequence[int], n_classes: int, width: int = 8, hidden: int = 128, *,
                 activation: str = "softplus", pool: str = "avg"):
        super().__init__(in_shape, n_classes, width, hidden, activation=activation, pool=pool)


class MLP(nn.Module):
    """Flatten, then ``depth`` hidden ReLU layers of ``hidden`` units, then a linear read-out."""

    def __init__(self, in_shape: Sequence[int], n_classes: int, hidden: int = 256, depth: int = 2):
        super().__init__()
        d = math.prod(in_shape)
        layers: list = [nn.Flatten()]
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.ReLU()]
            d = hidden
        layers.append(nn.Linear(d, n_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus identity (or 1x1 conv-BN) shortcut, then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNetSmall(nn.Module):
    """A small ResNet: 3x3 stem, three stages of basic blocks (widths w, 2w, 4w; strides 1, 2, 2),
    global average pool, linear read-out. Works for any H, W >= 1."""

    def __init__(self, in_shape: Sequence[int], n_classes: int, width: int = 16, blocks: int = 1):
        super().__init__()
        c = in_shape[0]
        self.stem = nn.Sequential(nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        stages, c_in = [], width
        for i, stride in enumerate((1, 2, 2)):
            c_out = width * 2**i
            for b in range(blocks):
                stages.append(BasicBlock(c_in, c_out, stride if b == 0 else 1))
                c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, n_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.stages(self.stem(x)))


_BUILDERS = {"lenet": LeNet, "lenet-smooth": LeNetSmooth, "mlp": MLP, "resnet-small": ResNetSmall}


def _check_shape(in_shape, arch: str) -> tuple:
    """(C, H, W) of positive ints; the MLP (which flattens its input) also takes vectors (D,)
    and any other shape."""
    what = "a shape such as (C, H, W) or (D,)" if arch == "mlp" else "(C, H, W)"
    try:
        shape = tuple(int(s) for s in in_shape)
    except (TypeError, ValueError):
        raise TypeError(f"in_shape must be {what} of ints, got {in_shape!r}") from None
    ok = len(shape) >= 1 if arch == "mlp" else len(shape) == 3
    if not ok or min(shape) < 1 or any(s != float(t) for s, t in zip(shape, in_shape)):
        raise ValueError(f"in_shape must be {what} with positive integers for {arch!r}, got {in_shape!r}")
    return shape


def build(arch: str, in_shape: Sequence[int] = (1, 28, 28), n_classes: int = 10, **kwargs) -> nn.Module:
    """An untrained model of architecture ``arch`` (one of :data:`ARCHS`) for inputs ``in_shape``.

    Args:
        arch: "lenet", "lenet-smooth", "mlp" or "resnet-small".
        in_shape: (C, H, W) of one input ("mlp" also takes vectors (D,) or any other shape: it flattens).
        n_classes: number of logits (>= 2).
        kwargs: architecture options (lenet: width=8, hidden=128, activation="relu", pool="max";
            lenet-smooth: the same with activation="softplus", pool="avg"; mlp: hidden=256, depth=2;
            resnet-small: width=16, blocks=1).
    Returns:
        nn.Module mapping (N, C, H, W) -> (N, n_classes) logits; parameters drawn from torch's
        global RNG (seed it, or use :func:`torch.random.fork_rng`, for reproducibility).
    """
    if arch not in _BUILDERS:
        raise ValueError(f"unknown arch {arch!r}; valid: {list(ARCHS)}")
    shape = _check_shape(in_shape, arch)
    n_classes = check_int("n_classes", n_classes, minimum=2)
    return _BUILDERS[arch](shape, n_classes, **kwargs)
