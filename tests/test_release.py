"""The authors' released files, read safely: robustness-library checkpoints and the constructed datasets.

The tests write small files in exactly the released formats: a checkpoint dict whose "model" entry is the state
dict of the library's AttackerModel under DataParallel ("module.normalizer.new_mean", "module.model.conv1.weight",
"module.attacker.normalize.new_mean", "module.attacker.model.conv1.weight", ...), and folders holding CIFAR_ims and
CIFAR_lab, lists of tensors written with torch.save.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import advfeat as af
from advfeat.models import CifarResNet

MEAN, STD = torch.tensor([0.4914, 0.4822, 0.4465]), torch.tensor([0.2023, 0.1994, 0.2010])


def write_robustness_checkpoint(path: Path, net: torch.nn.Module, *, prefix: str = "module.") -> None:
    """A checkpoint as the robustness library's train loop saves one (AttackerModel inside DataParallel)."""
    sd = {}
    for owner, norm_name in (("", "normalizer"), ("attacker.", "normalize")):
        sd[f"{prefix}{owner}{norm_name}.new_mean"] = MEAN[:, None, None].clone()
        sd[f"{prefix}{owner}{norm_name}.new_std"] = STD[:, None, None].clone()
        for k, v in net.state_dict().items():
            sd[f"{prefix}{owner}model.{k}"] = v.clone()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    torch.save({"model": sd, "optimizer": opt.state_dict(), "schedule": None, "epoch": 150, "amp": None}, path)


def narrow(arch: str = "resnet18", seed: int = 0) -> CifarResNet:
    torch.manual_seed(seed)
    blocks, bottleneck = af.models.ROBUSTNESS_ARCHS[arch]
    net = CifarResNet(blocks, bottleneck=bottleneck, width=4).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return net


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_a_robustness_checkpoint_loads_with_its_normaliser_folded_in(tmp_path, arch):
    net = narrow(arch)
    path = tmp_path / "cifar_l2_0_5.pt"
    write_robustness_checkpoint(path, net)
    model = af.models.from_robustness(path, arch=arch, width=4)
    assert isinstance(model[0], af.Normalize) and not model.training
    x = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        expected = net((x - MEAN[:, None, None]) / STD[:, None, None])
        assert torch.allclose(model(x), expected, atol=1e-6)
    assert af.models.last_linear(model) is model[1].linear  # robustify's g: the pooled features, as the paper's


def test_prefixes_and_a_bare_state_dict(tmp_path):
    net = narrow()
    for name, prefix in (("no-dataparallel.pt", ""),):
        write_robustness_checkpoint(tmp_path / name, net, prefix=prefix)
        af.models.from_robustness(tmp_path / name, arch="resnet18", width=4)
    torch.save({"state_dict": net.state_dict()}, tmp_path / "bare.pt")  # no normaliser: CIFAR's is used
    model = af.models.from_robustness(tmp_path / "bare.pt", arch="resnet18", width=4)
    assert torch.allclose(model[0].mean.flatten(), torch.tensor(af.models.CIFAR_MEAN))


def test_another_architecture_is_refused_naming_what_differs(tmp_path):
    write_robustness_checkpoint(tmp_path / "r18.pt", narrow("resnet18"))
    with pytest.raises(ValueError, match=r"another architecture.*missing: .*conv3.*looks like\(blocks=\(2, 2, 2, 2\), "
                                         r"basic blocks, width=4\)"):
        af.models.from_robustness(tmp_path / "r18.pt", arch="resnet50", width=4)
    with pytest.raises(ValueError, match=r"of another shape: conv1.weight \(4, 3, 3, 3\) \(expected \(64, 3, 3, 3\)\)"):
        af.models.from_robustness(tmp_path / "r18.pt", arch="resnet18")
    vgg = {"model": {"module.model.features.0.weight": torch.zeros(64, 3, 3, 3),
                     "module.model.classifier.weight": torch.zeros(10, 512)}}
    torch.save(vgg, tmp_path / "vgg.pt")
    with pytest.raises(ValueError, match="no CIFAR ResNet .top-level names: classifier, features"):
        af.models.from_robustness(tmp_path / "vgg.pt")
    with pytest.raises(ValueError, match="arch must be one of"):
        af.models.from_robustness(tmp_path / "r18.pt", arch="vgg16")


class _Boom:
    def __reduce__(self):  # a checkpoint that would run code when unpickled
        return (exec, ("raise SystemExit('code ran')",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_checkpoint_that_would_run_code_is_refused_unread(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": _Boom()}, f)
    with pytest.raises(ValueError, match="is not a robustness-library checkpoint advfeat can read safely"):
        af.models.from_robustness(path)
    (tmp_path / "d").mkdir()
    with open(tmp_path / "d" / "CIFAR_ims", "wb") as f:
        pickle.dump([_Boom()], f)
    torch.save([torch.zeros(1, dtype=torch.long)], tmp_path / "d" / "CIFAR_lab")
    with pytest.raises(ValueError, match="is not a list of tensors of the authors. release advfeat can read safely"):
        af.data.from_release(tmp_path / "d")


def write_release(folder: Path, n: int = 40, chunks: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    folder.mkdir(parents=True)
    torch.save(list(x.chunk(chunks)), folder / "CIFAR_ims")
    torch.save(list(y.chunk(chunks)), folder / "CIFAR_lab")
    return x, y


@pytest.mark.parametrize("name", af.data.RELEASE_FOLDERS)
def test_a_released_dataset_is_a_map_style_dataset(tmp_path, name):
    x, y = write_release(tmp_path / name)
    ds = af.data.from_release(tmp_path / name)
    assert len(ds) == 40 and torch.equal(ds.tensors()[0], x) and torch.equal(ds.labels, y)
    xi, yi = ds[7]
    assert torch.equal(xi, x[7]) and int(yi) == int(y[7])


def test_a_released_dataset_refuses_what_it_is_not(tmp_path):
    with pytest.raises(FileNotFoundError, match="CIFAR_ims not found; a released dataset holds"):
        af.data.from_release(tmp_path / "elsewhere")
    bad = tmp_path / "ddet_CIFAR"
    bad.mkdir()
    torch.save([torch.rand(4, 3, 32, 32) * 255], bad / "CIFAR_ims")
    torch.save([torch.zeros(4, dtype=torch.long)], bad / "CIFAR_lab")
    with pytest.raises(ValueError, match=r"pixel values must lie in \[0, 1\]"):
        af.data.from_release(bad)


def test_a_loaded_model_plugs_into_robustify_and_evaluate_unchanged(tmp_path):
    write_robustness_checkpoint(tmp_path / "m.pt", narrow("resnet18"))
    model = af.models.from_robustness(tmp_path / "m.pt", arch="resnet18", width=4)
    x, y = write_release(tmp_path / "d_robust_CIFAR", n=12)
    data = af.data.from_release(tmp_path / "d_robust_CIFAR")
    d_r = af.robustify(model, data, steps=5, progress=False)
    assert len(d_r) == 12 and d_r.tensors()[0].shape == (12, 3, 32, 32)
    assert float(d_r.meta["rel_distance"].median()) < 1.0  # moved towards g(x) from another image
    res = af.evaluate(model, DataLoader(data, batch_size=6), {"l2": af.L2PGD(0.5, steps=3)}, progress=False)
    assert res.total == 12 and 0 <= res.robust_accuracy("l2") <= res.clean_accuracy


def write_cifar_bin(root: Path, per_batch: int = 20, seed: int = 0) -> None:
    """CIFAR-10's binary version: records of 1 label byte and 3072 pixel bytes (R, G, B planes)."""
    g = torch.Generator().manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = torch.randint(0, 10, (per_batch, 1), generator=g, dtype=torch.uint8)
        pixels = torch.randint(0, 256, (per_batch, 3072), generator=g, dtype=torch.uint8)
        (root / f"{name}.bin").write_bytes(torch.cat([labels, pixels], 1).numpy().tobytes())


def test_replicate_runs_on_the_authors_checkpoints_instead_of_training(tmp_path):
    import json

    from advfeat.cli import main

    write_cifar_bin(tmp_path / "cifar")
    for name, seed in (("cifar_nat.pt", 0), ("cifar_l2_0_5.pt", 1)):
        write_robustness_checkpoint(tmp_path / name, narrow("resnet18", seed))
    out = tmp_path / "rep"
    code = main(["replicate", "--dataset", "cifar10", "--root", str(tmp_path / "cifar"), "--out", str(out),
                 "--standard-model", str(tmp_path / "cifar_nat.pt"),
                 "--robust-model", str(tmp_path / "cifar_l2_0_5.pt"),
                 "--checkpoint-arch", "resnet18", "--checkpoint-width", "4", "--no-progress"])
    assert code == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert rows["standard"]["source"] == str(tmp_path / "cifar_nat.pt")
    assert rows["robust"]["source"] == str(tmp_path / "cifar_l2_0_5.pt")
    assert not (out / "models" / "standard.pt").exists() and not (out / "models" / "robust.pt").exists()
    assert (out / "models" / "d_r.pt").exists() and rows["d_r"]["n"] == 100  # built through the given model
    # the row is the checkpoint's own accuracy on the test set
    model = af.models.from_robustness(tmp_path / "cifar_l2_0_5.pt", arch="resnet18", width=4)
    test = af.data.cifar10(tmp_path / "cifar", train=False)
    assert rows["robust"]["clean"] == af.evaluate(model, DataLoader(test, batch_size=50), progress=False).clean_accuracy


def test_checkpoints_are_for_cifar10_and_are_checked_before_anything_is_written(tmp_path, capsys):
    from advfeat.cli import main

    write_robustness_checkpoint(tmp_path / "m.pt", narrow("resnet18"))
    assert main(["replicate", "--out", str(tmp_path / "o"), "--robust-model", str(tmp_path / "m.pt")]) == 2
    assert "use them with --dataset cifar10" in capsys.readouterr().err
    assert main(["replicate", "--dataset", "cifar10", "--root", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--robust-model", str(tmp_path / "m.pt")]) == 2  # resnet50 expected
    assert "holds another architecture" in capsys.readouterr().err and not (tmp_path / "o").exists()
