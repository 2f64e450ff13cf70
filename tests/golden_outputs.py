"""Golden outputs: what the library computes on planted data, recorded once and compared bit for bit.

A refactor must not change a single bit of what advfeat computes. ``compute`` runs, at one thread, every attack on
a fixed model and batch, every training method for two epochs, every construction and control, and reads a
finished ``advfeat replicate`` run (its results rows, settings record, stage names and the sha256 of every shard
file). ``tests/test_golden.py`` compares that with ``tests/golden/golden.json``.

Floating-point kernels differ between CPUs, library versions and thread counts, so the comparison is bitwise
(sha256 of every tensor and file, exact floats) only on the platform that recorded the file (``signature()``,
``advfeat.machine.signature``: the CPU's vendor and model, its capability, the architecture, the versions of
Python, torch and numpy, one thread); elsewhere tensors are compared by their float64 sums within a relative 1e-3
and numbers within 5 points, and the hashes are not compared. The replication's part is recorded at seed 0, one
thread (``RECORDED_RUN``): a suite run at another seed or thread count (``ADVFEAT_TEST_SEED``,
``ADVFEAT_TEST_THREADS``) is another draw, and that part is not compared.

Record anew (only when a change is *meant* to change results, with the reason in CHANGELOG.md):

    python tests/golden_outputs.py --record
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

import advfeat as af
from advfeat.evaluate import shifted_accuracy

GOLDEN = Path(__file__).parent / "golden" / "golden.json"


RECORDED_RUN = {"seed": 0, "threads": 1}
"""The replication run whose outputs the golden file holds."""


def signature() -> dict[str, str]:
    """What must match for the outputs to be equal bit for bit (everything is computed at one thread)."""
    return af.machine.signature(threads=1)


@contextmanager
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tensor_record(t: Tensor) -> dict[str, Any]:
    """sha256 of a tensor's bytes (its dtype and shape included) and its float64 sums, for the tolerant check."""
    c = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{c.dtype}{tuple(c.shape)}".encode())
    h.update(c.reshape(-1).view(torch.uint8).numpy().tobytes() if c.numel() else b"")
    d = c.double()
    return {"sha256": h.hexdigest(), "sum": float(d.sum()), "abs_sum": float(d.abs().sum())}


def state_record(model: nn.Module) -> dict[str, Any]:
    """One record for all of a model's state dict, in order."""
    flat = torch.cat([v.detach().double().reshape(-1) for v in model.state_dict().values()])
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return {"sha256": h.hexdigest(), "sum": float(flat.sum()), "abs_sum": float(flat.abs().sum())}


def _data() -> af.data.Planted:
    return af.data.planted(256, 64, seed=3)


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return af.models.PlantedNet(hidden=32)


def _trained(data: af.data.Planted) -> nn.Module:
    model = _net(0)
    torch.manual_seed(0)
    af.adversarial_train(model, DataLoader(data.train, batch_size=64, shuffle=True), method="standard", epochs=30,
                         lr=0.1, progress=False)
    return model.eval()


def attacks() -> dict[str, af.Attack]:
    """Every attack configuration whose output the golden file holds (names are the file's keys)."""
    s = af.steps
    return {
        "l2pgd": af.L2PGD(0.5, steps=10),
        "l2pgd_rs": af.L2PGD(0.5, steps=10, random_start=True),
        "l2pgd_step": af.L2PGD(0.5, steps=7, step_size=0.1),
        "l2pgd_keep_best": af.L2PGD(0.5, steps=10, keep_best=True),
        "l2pgd_early_stop": af.L2PGD(0.5, steps=10, early_stop=True),
        "l2pgd_targeted": af.L2PGD(0.5, steps=10, targeted=True),
        "l2pgd_cw": af.L2PGD(0.5, steps=10, loss=af.cw_margin),
        "l2pgd_eps_tensor": af.L2PGD(torch.linspace(0.1, 0.8, 16), steps=10),
        "linfpgd": af.LinfPGD(0.1, steps=10, random_start=True),
        "linfpgd_box": af.LinfPGD(0.1, steps=5, lower=-0.5, upper=1.5),
        "fgsm": af.FGSM(0.1),
        "fgsm_l2": af.FGSM(0.5, norm="l2"),
        "fgsm_rs": af.FGSM(0.1, random_start=True, rel_step_size=1.25),
        "pgd_box": af.PGD(af.Box(), steps=5, step_size=0.2),
        "pgd_linf_ball": af.PGD(af.LinfBall(0.05), steps=5),
        "momentum": af.L2PGD(0.5, steps=10, rule=s.Momentum()),
        "adam_box": af.PGD(af.Box(), steps=5, step_size=0.01, rule=s.Adam()),
        "cosine": af.L2PGD(0.5, steps=10, rule=s.Cosine()),
        "linear": af.L2PGD(0.5, steps=10, rule=s.Linear(final=0.1)),
        "relative": af.PGD(af.Box(), steps=5, step_size=0.1, rule=s.RelativeToStart(s.Cosine()), random_start=True),
        "apgd_ce": af.APGD(0.1, steps=20),
        "apgd_l2_dlr": af.APGD(0.5, norm="l2", loss=af.dlr, steps=20),
        "apgd_t": af.APGD(0.5, norm="l2", loss=af.dlr, n_target_classes=3, steps=10),
        "apgd_t_batched": af.APGD(0.5, norm="l2", loss=af.dlr, n_target_classes=3, steps=10, batched=True),
        "apgd_targeted": af.APGD(0.5, norm="l2", targeted=True, steps=10),
        "restarts": af.Restarts(af.L2PGD(0.5, steps=5, random_start=True), 3),
        "restarts_batched": af.Restarts(af.L2PGD(0.5, steps=5, random_start=True), 3, batched=True, max_batch=32),
        "worst_of": af.WorstOf(af.L2PGD(0.5, steps=5), af.LinfPGD(0.05, steps=5, loss=af.cw_margin)),
        "seeded": af.L2PGD(0.5, steps=5, random_start=True, seed=7),
    }


def attack_outputs(model: nn.Module, data: af.data.Planted) -> dict[str, Any]:
    x, y = data.test.tensors()
    x, y = x[:16], y[:16]
    out: dict[str, Any] = {}
    for name, attack in attacks().items():
        torch.manual_seed(1)
        target = (y + 1) % 10 if attack.targeted else y
        out[name] = tensor_record(attack(model, x, target))
    return out


def evaluate_outputs(model: nn.Module, data: af.data.Planted) -> dict[str, Any]:
    torch.manual_seed(2)
    a = attacks()
    res = af.evaluate(model, DataLoader(data.test, batch_size=32),
                      {"l2": a["l2pgd_rs"], "apgd": a["apgd_ce"], "worst": a["worst_of"]}, progress=False)
    torch.manual_seed(2)
    slow = af.evaluate(model, DataLoader(data.test, batch_size=32), {"l2": a["l2pgd_rs"]}, early_stop=False,
                       progress=False)
    return {"early_stop": res.as_dict(), "keep_best": slow.as_dict(),
            "shifted": shifted_accuracy(model, data.test, shift=1)}


def methods() -> dict[str, Callable[[], Any]]:
    attack = af.L2PGD(0.5, steps=3)
    return {
        "standard": lambda: af.StandardTraining(),
        "pgd": lambda: af.PGDTraining(attack),
        "fgsm-rs": lambda: af.FGSMRS(attack),
        "free": lambda: af.FreeTraining(attack, replays=2),
        "trades": lambda: af.TRADES(attack, beta=6.0),
        "mart": lambda: af.MART(attack, beta=6.0),
    }


def training_outputs(data: af.data.Planted, tmp: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, make in methods().items():
        model = _net(10)
        torch.manual_seed(11)
        history = af.adversarial_train(model, DataLoader(data.train, batch_size=64, shuffle=True), method=make(),
                                       epochs=2, lr=0.05, progress=False, checkpoint=tmp / f"{name}.pt",
                                       eval_loader=DataLoader(data.test, batch_size=64),
                                       eval_attack=af.L2PGD(0.5, steps=3))
        out[name] = {"weights": state_record(model),
                     "history": [{k: v for k, v in h.items() if k != "seconds"} for h in history]}
    # the trainer's other options, once each
    model = _net(12)
    torch.manual_seed(13)
    history = af.adversarial_train(model, DataLoader(data.train, batch_size=64, shuffle=True), method="pgd",
                                   attack=af.LinfPGD(0.05, steps=2), epochs=2, lr=0.05, schedule="piecewise",
                                   progress=False)
    out["pgd_piecewise_linf"] = {"weights": state_record(model),
                                 "history": [{k: v for k, v in h.items() if k != "seconds"} for h in history]}
    return out


def _shards(folder: Path) -> dict[str, str]:
    """Every shard file's sha256, as the shard records hold them, and the manifest's config."""
    sums: dict[str, str] = {}
    for record in sorted(folder.glob("shard-*.json")):
        info = json.loads(record.read_text())
        for key, digest in sorted(info["sha256"].items()):
            sums[f"{record.stem}.{key}"] = digest
    return sums


def construction_outputs(model: nn.Module, data: af.data.Planted, tmp: Path) -> dict[str, Any]:
    src = torch.utils.data.Subset(data.train, range(96))
    others = [_trained_copy(model, k) for k in (1, 2)]
    builds: dict[str, Callable[[Path], af.ConstructedDataset]] = {
        "robustify": lambda o: af.robustify(model, src, steps=10, out=o, shard_size=40, batch_size=32,
                                            progress=False),
        "robustify_noise": lambda o: af.robustify(model, src, init="noise", steps=10, out=o, shard_size=40,
                                                  batch_size=32, progress=False),
        "robustify_paper": lambda o: af.robustify(model, src, steps=10, rule=af.steps.Constant(), step_size=0.1,
                                                  out=o, shard_size=64, progress=False, storage="uint8"),
        "det": lambda o: af.nonrobustify(model, src, mode="det", eps=0.5, steps=10, out=o, shard_size=40,
                                         batch_size=32, progress=False),
        "rand": lambda o: af.nonrobustify(model, src, mode="rand", eps=0.5, steps=10, out=o, shard_size=40,
                                          batch_size=32, progress=False),
        "det_keep_best": lambda o: af.nonrobustify(model, src, mode="det", eps=0.5, steps=10, keep_best=True,
                                                   rule=af.steps.Constant(), step_size=0.1, out=o, progress=False),
        "bugs": lambda o: af.nonrobustify(model, src, mode="det", eps=1.0, steps=10, rule=af.steps.Cosine(),
                                          step_size=1.0, keep_correct=others, out=o, progress=False),
        "shortcut": lambda o: af.controls.shortcut(model, src, mode="rand", eps=0.5, out=o, progress=False),
    }
    out: dict[str, Any] = {}
    for name, build in builds.items():
        folder = tmp / name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = build(folder)
        x, y = ds.tensors()
        manifest = json.loads((folder / "manifest.json").read_text())
        out[name] = {"shards": _shards(folder), "images": tensor_record(x), "labels": tensor_record(y),
                     "meta": {k: tensor_record(v) for k, v in sorted(ds.meta.items())},
                     "config": manifest["config"]}
    wrong = af.controls.wrong_labels(_net(5), data.train, progress=False)
    out["wrong_labels"] = {"images": tensor_record(wrong.tensors()[0]), "labels": tensor_record(wrong.labels),
                           "config": wrong.config}
    det = af.ConstructedDataset.load(tmp / "det")
    out["leakage_probe"] = af.controls.leakage_probe(model, det, data.test, epochs=5)
    out["transfer"] = af.transfer_rates(model, {"a": others[0], "b": others[1]}, data.test, af.L2PGD(0.5, steps=5))
    return out


def _trained_copy(model: nn.Module, seed: int) -> nn.Module:
    """Another model like ``model``'s: same data, another seed."""
    other = _net(seed)
    torch.manual_seed(seed)
    af.adversarial_train(other, DataLoader(_data().train, batch_size=64, shuffle=True), method="standard",
                         epochs=30, lr=0.1, progress=False)
    return other.eval()


def replicate_outputs(out: Path) -> dict[str, Any]:
    """What a finished ``advfeat replicate`` run in ``out`` computed: rows (times left out), settings, stages,
    shards."""
    res = json.loads((out / "results.json").read_text())

    def timeless(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: timeless(w) for k, w in v.items() if k not in ("seconds", "train_seconds")}
        return v

    datasets = {d.name: _shards(d) for d in sorted((out / "datasets").iterdir()) if d.is_dir()}
    return {"rows": timeless(res["rows"]), "settings": json.loads((out / "settings.json").read_text()),
            "stages": sorted(p.stem for p in (out / "stages").glob("*.json")), "datasets": datasets}


def run_replicate(out: Path, seed: int = 0, threads: int = 1) -> None:
    """The README's main job (planted, quick) at ``seed`` and ``threads`` (the golden's: seed 0, one thread)."""
    from advfeat.cli import main

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert main(["replicate", "--seed", str(seed), "--out", str(out), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(before)


def compute(tmp: Path, replicate_out: Path) -> dict[str, Any]:
    """Everything the golden file holds (``replicate_out``: a finished run of ``run_replicate``)."""
    with one_thread():
        data = _data()
        model = _trained(data)
        return {
            "signature": signature(),
            "model": state_record(model),
            "attacks": attack_outputs(model, data),
            "evaluate": evaluate_outputs(model, data),
            "training": training_outputs(data, tmp / "train"),
            "constructions": construction_outputs(model, data, tmp / "construct"),
            "replicate": replicate_outputs(replicate_out),
        }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--record", action="store_true", help=f"write {GOLDEN}")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        run_replicate(Path(tmp) / "replication", **RECORDED_RUN)
        result = compute(Path(tmp), Path(tmp) / "replication")
    text = json.dumps(result, indent=1, sort_keys=True) + "\n"
    if args.record:
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(text)
        print(f"wrote {GOLDEN}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
