"""Reference networks and the input normalisation layer.

Attacks work in pixel space ([0, 1]); normalisation belongs inside the model, as its first layer:

    model = nn.Sequential(af.Normalize(mean, std), net)

Each reference network ends in an ``nn.Linear``; its input is the network's penultimate representation
``g(x)``, the one ``robustify`` matches by default.

Examples:
    >>> import torch, advfeat as af
    >>> net = af.models.SmallCNN()
    >>> net(torch.rand(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._checks import check_positive_int

__all__ = ["Normalize", "PlantedNet", "SmallCNN", "SmallResNet", "CifarResNet", "last_linear", "from_robustness",
           "save_safetensors", "load_safetensors",
           "ROBUSTNESS_ARCHS", "CIFAR_MEAN", "CIFAR_STD"]

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
"""CIFAR-10's normalisation in the robustness library (used when a checkpoint does not hold its own)."""


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, to put first in a model so that attacks see [0, 1] pixels.

    Examples:
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
    """An MLP for ``advfeat.data.planted`` images: flatten-fc(hidden)-ReLU-fc(hidden)-ReLU-fc(classes).

    Penultimate representation: the ``hidden``-dimensional input of ``fc3``.

    Examples:
        >>> import torch
        >>> PlantedNet((1, 16, 16))(torch.rand(3, 1, 16, 16)).shape
        torch.Size([3, 10])
    """

    def __init__(self, shape: Sequence[int] = (1, 16, 16), num_classes: int = 10, hidden: int = 256) -> None:
        super().__init__()
        _sizes(num_classes=num_classes, hidden=hidden, **{f"shape[{i}]": v for i, v in enumerate(shape)})
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

    Examples:
        >>> last_linear(PlantedNet()).out_features
        10
    """
    found = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError(f"model ({type(model).__name__}) has no nn.Linear: pass representation=callable to say "
                         "which representation g(x) to use")
    return found[-1]


@contextmanager
def penultimate(model: nn.Module) -> Iterator[Callable[[Tensor], tuple[Tensor, Any]]]:
    """``run(x) -> (g(x), model(x))`` while the context is open: ``g(x)`` is the input of the model's last
    ``nn.Linear`` (``last_linear``), captured by a forward pre-hook removed on exit.

    A model holding ``torch.compile``d modules runs eagerly here (``torch.compiler.set_stance("force_eager")``):
    dynamo does not guard on hooks added after a graph was compiled, so a compiled graph would skip the hook
    (or run an earlier one). To compile this path, pass ``representation=`` a compiled callable of your own.
    """
    captured: list[Tensor] = []
    handle = last_linear(model).register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    compiled = any(type(m).__name__ == "OptimizedModule" for m in model.modules())
    stance = getattr(torch.compiler, "set_stance", None)

    def run(x: Tensor) -> tuple[Tensor, Any]:
        captured.clear()
        with stance("force_eager") if compiled and stance is not None else nullcontext():
            out = model(x)
        if not captured:
            raise ValueError(f"the last nn.Linear of {type(model).__name__} did not run in forward; pass "
                             "representation=callable")
        return captured[-1], out

    try:
        yield run
    finally:
        handle.remove()


class SmallCNN(nn.Module):
    """conv3x3(32)-pool-conv3x3(64)-pool-fc(hidden)-fc(classes): a fast CNN for 1x28x28 (MNIST-like).

    Penultimate representation: the ``hidden``-dimensional input of ``fc2``.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, hidden: int = 128, size: int = 28) -> None:
        super().__init__()
        _sizes(in_channels=in_channels, num_classes=num_classes, hidden=hidden, size=size)
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
        _sizes(in_channels=in_channels, num_classes=num_classes, width=width, blocks=blocks)
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


class _Bottleneck(nn.Module):
    """1x1 - 3x3 (stride) - 1x1 (4x channels) with a projection shortcut where the shape changes."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        return torch.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """The CIFAR ResNet of the robustness library (MadryLab), with its parameter names: a 3x3 stem, four stages
    of ``blocks`` blocks (``width``, 2x, 4x, 8x channels; bottlenecks expand 4x), 4x4 average pooling of the
    32x32 input's 4x4 map, and ``linear``. ResNet-50: ``CifarResNet()``; ResNet-18: ``CifarResNet((2, 2, 2, 2),
    bottleneck=False)``. Penultimate representation: the pooled features, the input of ``linear`` (the paper's
    ``g``). No normalisation inside: ``from_robustness`` puts the checkpoint's first.

    Examples:
        >>> CifarResNet((1, 1, 1, 1), width=8)(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, blocks: Sequence[int] = (3, 4, 6, 3), *, bottleneck: bool = True, width: int = 64,
                 num_classes: int = 10) -> None:
        super().__init__()
        if len(blocks) != 4 or any(int(b) < 1 for b in blocks):
            raise ValueError(f"blocks must be four counts >= 1 (one per stage), got {tuple(blocks)}")
        _sizes(width=width, num_classes=num_classes)
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        cin = width
        stages = []
        for i, n in enumerate(blocks):
            planes, stride = width * 2**i, 1 if i == 0 else 2
            layer: list[nn.Module] = []
            for j in range(int(n)):
                block = _Bottleneck(cin, planes, stride if j == 0 else 1) if bottleneck else \
                    _Block(cin, planes, stride if j == 0 else 1)
                layer.append(block)
                cin = planes * (4 if bottleneck else 1)
            stages.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = nn.functional.avg_pool2d(out, 4).flatten(1)
        result: Tensor = self.linear(out)
        return result


ROBUSTNESS_ARCHS: dict[str, tuple[tuple[int, int, int, int], bool]] = {
    "resnet18": ((2, 2, 2, 2), False), "resnet34": ((3, 4, 6, 3), False), "resnet50": ((3, 4, 6, 3), True),
    "resnet101": ((3, 4, 23, 3), True), "resnet152": ((3, 8, 36, 3), True),
}
"""The robustness library's CIFAR ResNets: block counts per stage, and whether the blocks are bottlenecks."""


def from_robustness(
    path: str | Path,
    *,
    arch: str = "resnet50",
    width: int = 64,
    num_classes: int = 10,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """A CIFAR-10 checkpoint of the robustness library (``cifar_nat.pt``, ``cifar_l2_0_5.pt``, ...) as
    ``nn.Sequential(Normalize(mean, std), CifarResNet(...))``, in eval mode, ready for advfeat's attacks (pixels in
    [0, 1]) and for ``advfeat.robustify`` (the representation is the input of ``linear``).

    Read with ``torch.load(..., weights_only=True)``: tensors only, no code from the file ever runs. The weights
    come from the checkpoint's ``"model"`` (or ``"state_dict"``) entry, whatever its ``module.`` (DataParallel) and
    ``model.`` / ``attacker.model.`` (the library's AttackerModel) prefixes; the normaliser from its
    ``normalizer.new_mean`` / ``new_std`` buffers (CIFAR's, ``CIFAR_MEAN`` / ``CIFAR_STD``, when absent).
    The architecture is the one ``arch`` (one of ``ROBUSTNESS_ARCHS``, default the paper's ResNet-50) and
    ``width`` (the stem's channels, 64 in the library) name; a checkpoint of another is refused with a message
    naming what differs and what the checkpoint seems to hold.
    """

    if arch not in ROBUSTNESS_ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ROBUSTNESS_ARCHS)}, got {arch!r}")
    blocks, bottleneck = ROBUSTNESS_ARCHS[arch]

    from ._io import load_tensors

    p = Path(path)
    checkpoint = load_tensors(p, "a robustness-library checkpoint", "download it again from the authors' release",
                              map_location)
    state = checkpoint.get("model", checkpoint.get("state_dict")) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not state:
        keys = sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"{p}: expected a robustness-library checkpoint with a 'model' (or 'state_dict') state "
                         f"dict, found {keys}")
    weights: dict[str, Tensor] = {}
    norm: dict[str, Tensor] = {}
    for key, value in state.items():
        k = key[len("module."):] if key.startswith("module.") else key
        if k.startswith("attacker."):
            continue  # the attacker holds a second reference to the same model and normaliser
        if k.startswith("normalizer."):
            norm[k[len("normalizer."):]] = value
        else:
            weights[k[len("model."):] if k.startswith("model.") else k] = value
    net = CifarResNet(blocks, bottleneck=bottleneck, width=width, num_classes=num_classes)
    _check_state(net, weights, p)
    _check_values(net, weights, p)
    net.load_state_dict(weights)
    mean = norm.get("new_mean", torch.tensor(CIFAR_MEAN)).flatten().tolist()
    std = norm.get("new_std", torch.tensor(CIFAR_STD)).flatten().tolist()
    return nn.Sequential(Normalize(mean, std), net).to(map_location).eval()


def _check_state(net: nn.Module, weights: dict[str, Tensor], path: Path) -> None:
    """Refuse ``weights`` that do not fit ``net`` exactly, naming the differences and the checkpoint's shape."""
    mine = net.state_dict()
    missing = [k for k in mine if k not in weights]
    extra = [k for k in weights if k not in mine]
    shapes = [f"{k} {tuple(weights[k].shape)} (expected {tuple(mine[k].shape)})" for k in mine
              if k in weights and weights[k].shape != mine[k].shape]
    if not (missing or extra or shapes):
        return
    parts = []
    for what, items in (("missing", missing), ("unexpected", extra), ("of another shape", shapes)):
        if items:
            parts.append(f"{len(items)} {what}: {', '.join(items[:4])}{', ...' if len(items) > 4 else ''}")
    raise ValueError(f"{path} holds another architecture than CifarResNet{_describe_state(mine)}: "
                     f"{'; '.join(parts)}. The checkpoint looks like{_describe_state(weights)}")


def _check_values(net: nn.Module, weights: dict[str, Tensor], path: Path) -> None:
    """Refuse weights that ``load_state_dict`` would cast or that hold NaN / inf: a float16, integer or bool tensor
    where the model keeps float32 (or any other dtype the model does not), a non-finite floating tensor, a negative
    BatchNorm variance."""
    mine = net.state_dict()
    cast = [f"{k} ({str(v.dtype).replace('torch.', '')}, the model's is {str(mine[k].dtype).replace('torch.', '')})"
            for k, v in weights.items() if k in mine and v.dtype != mine[k].dtype]
    if cast:
        raise ValueError(f"{path}: {len(cast)} weights are of another dtype than the model's, which loading would "
                         f"cast silently: {', '.join(cast[:3])}{', ...' if len(cast) > 3 else ''}; convert the model "
                         "(e.g. model.half()) or the file first")
    bad = [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{path}: {len(bad)} weights hold NaN or inf ({', '.join(bad[:3])}): the file is damaged "
                         "or its training diverged")
    negative = [k for k, v in weights.items() if k.endswith("running_var") and bool((v < 0).any())]
    if negative:
        raise ValueError(f"{path}: BatchNorm running_var is negative in {', '.join(negative[:3])} (a variance "
                         "cannot be): the file is damaged")


def _describe_state(state: dict[str, Tensor]) -> str:
    """The block counts, block type and width a state dict of robustness-library names implies."""
    counts = []
    for i in range(1, 5):
        idx = {int(k.split(".")[1]) for k in state if k.startswith(f"layer{i}.") and k.split(".")[1].isdigit()}
        counts.append(max(idx) + 1 if idx else 0)
    if not any(counts):
        heads = sorted({k.split(".")[0] for k in state})[:6]
        return f" no CIFAR ResNet (top-level names: {', '.join(heads)})"
    kind = "bottleneck" if any(".conv3." in k for k in state) else "basic"
    stem = state.get("conv1.weight")
    width = int(stem.shape[0]) if isinstance(stem, Tensor) and stem.ndim == 4 else "?"
    return f"(blocks={tuple(counts)}, {kind} blocks, width={width})"


def save_safetensors(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``model``'s state dict as a ``safetensors`` file (the ecosystem's safe format: tensors and a JSON
    header, readable from any framework), atomically, with the permissions the user's umask gives.

    Examples:
        >>> import tempfile, torch
        >>> path = Path(tempfile.mkdtemp()) / "m.safetensors"
        >>> save_safetensors(PlantedNet(), path, {"dataset": "planted"})
        >>> model = load_safetensors(PlantedNet(), path)
        >>> model.training
        False
    """
    from safetensors.torch import save

    from ._io import atomic_write

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    data = save(tensors, metadata=metadata)
    atomic_write(path, lambda f: f.write(data))


def load_safetensors(model: nn.Module, path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a ``safetensors`` state dict (``save_safetensors``, ``advfeat replicate``'s ``models/*.safetensors``
    or any other library's) into ``model`` strictly, and return it in eval mode. Loading never runs code."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"path: no safetensors file at {p}")
    try:
        state = load_file(p, device=str(map_location))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"path: {p} is not a readable safetensors file ({e}); it may be truncated or of "
                         "another format") from None
    try:
        _check_values(model, state, p)
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"path: {p} holds weights of another architecture than {type(model).__name__}: "
                         f"{str(e).splitlines()[0]}") from None
    return model.eval()


def _sizes(**sizes: object) -> None:
    """Refuse a layer size that is not a positive int, naming it (``width=-8`` would fail deep inside torch)."""
    for name, value in sizes.items():
        check_positive_int(name, value)
