"""Hugging Face models and datasets plug in as they are: a ``transformers`` ViT built from a small config (no
download) returns an ``ImageClassifierOutput``; a ``datasets.Dataset`` with the torch format yields mappings.
Skipped only where ``transformers`` / ``datasets`` cannot be imported (they are in the ``dev`` extra)."""

from __future__ import annotations

import hashlib

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import advfeat as af

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[dev]')")
datasets = pytest.importorskip("datasets", reason="datasets is not installed (pip install -e '.[dev]')")


def vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=1, num_hidden_layers=2, hidden_size=32,
                                    num_attention_heads=2, intermediate_size=64, num_labels=10)
    return transformers.ViTForImageClassification(config).eval()


def hf_data(n: int = 48, seed: int = 0, image_key: str = "pixel_values", label_key: str = "label") -> Dataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 16, 16, generator=g)
    y = torch.arange(n) % 10
    x[:, 0, :4, :4] = (y.float() / 10)[:, None, None]  # a learnable feature
    return datasets.Dataset.from_dict({image_key: x.numpy(), label_key: y.numpy()}).with_format("torch")


def test_the_model_returns_a_hugging_face_output():
    out = vit()(torch.rand(2, 1, 16, 16))
    assert type(out).__name__ == "ImageClassifierOutput" and not isinstance(out, torch.Tensor)


@pytest.mark.parametrize("attack", [af.L2PGD(1.0, steps=5, random_start=True, seed=0),
                                    af.APGD(1.0, norm="L2", steps=5, seed=0),
                                    af.APGD(1.0, norm="L2", steps=5, n_target_classes=2, seed=0),
                                    af.Restarts(af.LinfPGD(8 / 255, steps=3, random_start=True), 2, seed=0)],
                         ids=["l2pgd", "apgd-ce", "apgd-t", "restarts"])
def test_attacks_through_a_vit(attack):
    model = vit()
    batch = next(iter(DataLoader(hf_data(8), batch_size=8)))
    x, y = batch["pixel_values"], batch["label"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x_adv = attack(model, x, y)
    assert x_adv.shape == x.shape and torch.isfinite(x_adv).all()
    assert (x_adv - x).flatten(1).norm(dim=1).max() <= 1.0 + 1e-5
    loss = nn.functional.cross_entropy
    assert loss(model(x_adv).logits, y) > loss(model(x).logits, y)  # the attack raised the loss
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and not model.training


def test_evaluate_and_train_on_a_datasets_loader():
    data = hf_data(64)
    model = vit()
    model.train()
    history = af.adversarial_train(model, DataLoader(data, batch_size=16, shuffle=True), method="pgd",
                                   attack=af.L2PGD(0.5, steps=2), epochs=2, lr=0.05, progress=False)
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["train_loss"])) for h in history)
    r = af.evaluate(model, DataLoader(data, batch_size=32), {"l2": af.L2PGD(0.5, steps=3)}, progress=False)
    assert r.total == 64 and 0.0 <= r.robust_accuracy("l2") <= r.clean_accuracy <= 1.0


def test_robustify_and_nonrobustify_from_a_mapping_dataset():
    model, data = vit(), hf_data(24)
    d_r = af.robustify(model, data, steps=3, batch_size=8, progress=False)
    x, y = d_r[5]
    assert x.shape == (1, 16, 16) and int(y) == 5  # a Dataset of (x, y): the label kept
    d_det = af.nonrobustify(model, DataLoader(data, batch_size=8), mode="det", eps=1.0, steps=3, progress=False)
    assert torch.equal(d_det.labels, (torch.arange(24) % 10 + 1) % 10)
    assert float(d_det.meta["perturbation_norm"].max()) <= 1.0 + 1e-4


def test_explicit_keys_and_ambiguous_batches():
    model = vit()
    odd = hf_data(8, image_key="img", label_key="cls")
    with pytest.raises(ValueError, match=r"exactly one image key.*\['cls', 'img'\].*keys="):
        af.evaluate(model, DataLoader(odd, batch_size=8), progress=False)
    r = af.evaluate(model, DataLoader(odd, batch_size=8), progress=False, keys=("img", "cls"))
    assert r.total == 8
    d = af.nonrobustify(model, odd, mode="rand", eps=0.5, steps=2, progress=False, keys=("img", "cls"))
    assert len(d) == 8
    with pytest.raises(ValueError, match=r"keys=\('image', 'cls'\): the batch has no \['image'\]"):
        af.evaluate(model, DataLoader(odd, batch_size=8), progress=False, keys=("image", "cls"))
    both = {"image": torch.rand(2, 1, 4, 4), "pixel_values": torch.rand(2, 1, 4, 4), "label": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"more than one of \['pixel_values', 'image'\]"):
        af.adapters.batch_xy(both)
    with pytest.raises(TypeError, match="keys must be None or a pair"):
        af.evaluate(model, [], progress=False, keys="img")  # type: ignore[arg-type]


class _Stop(Exception):
    pass


class _Killing(torch.utils.data.Dataset):
    """The data, raising once ``limit`` items were read: a crash at a point chosen by progress."""

    def __init__(self, data: Dataset, limit: int) -> None:
        self.data, self.limit, self.read = data, limit, 0

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        self.read += 1
        if self.read > self.limit:
            raise _Stop
        return self.data[i]


def _digest(ds: af.ConstructedDataset) -> str:
    x, y = ds.tensors()
    return hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()


def test_a_killed_build_resumes_to_the_same_bytes(tmp_path):
    model, data = vit(), hf_data(32)
    whole = af.nonrobustify(model, data, mode="det", eps=1.0, steps=2, batch_size=8, shard_size=8,
                            out=tmp_path / "whole", progress=False)
    counting = _Killing(data, 10**9)
    af.nonrobustify(model, counting, mode="det", eps=1.0, steps=2, batch_size=8, shard_size=8, progress=False)
    before_work = counting.read - 32  # the class probe and the source fingerprint read these first
    with pytest.raises(_Stop):  # killed in the third shard, at a point chosen by progress
        af.nonrobustify(model, _Killing(data, before_work + 20), mode="det", eps=1.0, steps=2, batch_size=8,
                        shard_size=8, out=tmp_path / "part", progress=False)
    assert 0 < len(list((tmp_path / "part").glob("shard-*.json"))) < 4
    resumed = af.nonrobustify(model, data, mode="det", eps=1.0, steps=2, batch_size=8, shard_size=8,
                              out=tmp_path / "part", progress=False)
    assert _digest(resumed) == _digest(whole)
