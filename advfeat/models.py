"""Reference networks and the input normalisation layer.

Attacks work in pixel space ([0, 1]); normalisation belongs inside the model, as its first layer::

    model = nn.Sequential(af.Normalize(mean, std), net)

Each reference network ends in an ``nn.Linear``; its input is the network's penultimate representation
``g(x)``, the one ``robustify`` matches by default.

    >>> import torch, advfeat as af
    >>> net = af.models.SmallCNN()
    >>> net(torch.rand(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["Normalize", "PlantedNet", "SmallCNN", "SmallResNet", "last_linear"]


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, to put first in a model so that attacks see [0, 1] pixels.

    >>> import torch
    >>> Normalize([0.5], [0.25])(torch.ones(1, 1, 2, 2)).flatten().tolist()
    [2.0, 2.0, 2.0, 2.0]
    """

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> None:
        super().__init__()
        m = torch.as_tensor(mean, dtype=torch.float32).flatten()
        s = torch.as_tensor(std, dtype=torch.float32).flatten()
        if m.shape != s.shape or m.numel() == 0:
            raise ValueError(f"mean and std must have one value per channel each, got {m.numel()} and {s.numel()}")
        if not bool((s > 0).all()) or not bool(torch.isfinite(s).all()) or not bool(torch.isfinite(m).all()):
            raise ValueError(f"std must be finite and > 0 and mean finite, got mean={m.tolist()}, std={s.tolist()}")
        self.register_buffer("mean", m.reshape(-1, 1, 1))
        self.register_buffer("std", s.reshape(-1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.mean.shape[0]:
            raise ValueError(f"Normalize expects (N, {self.mean.shape[0]}, H, W) input, got {tuple(x.shape)}")
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class PlantedNet(nn.Module):
    """An MLP for :func:`advfeat.data.planted` images: flatten-fc(hidden)-ReLU-fc(hidden)-ReLU-fc(classes).

    Penultimate representation: the ``hidden``-dimensional input of ``fc3``.

        >>> import torch
        >>> PlantedNet((1, 16, 16))(torch.rand(3, 1, 16, 16)).shape
        torch.Size([3, 10])
    """

    def __init__(self, shape: Sequence[int] = (1, 16, 16), num_classes: int = 10, hidden: int = 256) -> None:
        super().__init__()
        d = 1
        for s in shape:
            d *= int(s)
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.fc2(torch.relu(self.fc1(x.flatten(1)))))
        out: Tensor = self.fc3(h)
        return out


def last_linear(model: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` of ``model`` in registration order: its input is the default penultimate
    representation ``g(x)``. Raises ValueError, naming the model's class, when there is none.

        >>> last_linear(PlantedNet()).out_features
        10
    """
    found = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError(f"model ({type(model).__name__}) has no nn.Linear: pass representation=callable to say "
                         "which representation g(x) to use")
    return found[-1]


class SmallCNN(nn.Module):
    """conv3x3(32)-pool-conv3x3(64)-pool-fc(hidden)-fc(classes): a fast CNN for 1x28x28 (MNIST-like).

    Penultimate representation: the ``hidden``-dimensional input of ``fc2``.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, hidden: int = 128, size: int = 28) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.fc1 = nn.Linear(64 * (size // 4) ** 2, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.fc2(torch.relu(self.fc1(self.features(x))))
        return out


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A small pre-pooling ResNet for 3x32x32 (CIFAR-10): a stem and three stages of basic blocks
    (``width``, 2x, 4x channels), global average pooling and a linear head.

    Penultimate representation: the pooled ``4 * width`` features, the input of ``fc``.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 16, blocks: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        layers: list[nn.Module] = []
        cin = width
        for i, cout in enumerate((width, 2 * width, 4 * width)):
            for j in range(blocks):
                layers.append(_Block(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.fc(self.pool(self.layers(self.stem(x))))
        return out
