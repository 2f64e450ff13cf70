"""Quality per forward+backward pass of every step rule, in one run: robustify, nonrobustify and evaluation.

Run:  python benchmarks/quality_per_pass.py [--datasets planted,fashion-mnist] [--parts robustify,nonrobustify,evaluate,
                                             downstream_det] [--seeds 0,1,2]
                                            [--budgets 10,25,50,100,200,1000] [--rules NAME,...] [--cache DIR]
                                            [--out DIR] [--threads T] [--device cpu|cuda]

Models: the standard and the robust model of ``advfeat replicate``'s quick scale (planted: PlantedNet; Fashion-MNIST,
when installed: SmallCNN, PGD-AT at L2 eps 1.0), trained by this script with the same settings and cached in
``--cache``. Every number comes from this run, on the same images:

* robustify (through the robust and the standard model; start = another image, box only): median and 90th
  percentile of the final relative representation distance ||g(z) - g(x)|| / ||g(x)||, for each rule and budget
  (a budget is the number of steps, one forward and one backward each);
* downstream: D_R built with each robustify rule (100 passes; the paper's fixed 0.1 also at 1000) from
  replicate's 5,000 source images, a standard model trained on it as ``advfeat replicate`` trains one, and its
  accuracy clean and under L2 PGD;
* nonrobustify (det, the quick scale's eps, through the standard model): the share of targets reached and the
  median target margin z_t - max_{j != t} z_j (budgets up to 200);
* downstream_det (``--parts downstream_det``): D_det built with each rule and budget of ``DDET_RUNS`` from
  replicate's source images, a learner trained on it per ``--seeds`` as replicate trains row 6, and its accuracy
  on the real test set, beside the passes per image and the targets reached: the quality a D_det exists for;
* evaluation (the robust model): accuracy under PGD (1 and 5 restarts) and APGD (CE, DLR, targeted over the 9
  other classes) in L2 and Linf, per budget of steps; the passes each attack actually spent per image are
  counted (early stopping and APGD-T's targets included). When ``torchattacks`` is importable, its APGD and
  APGDT on the same model and images too (``pip install --no-deps torchattacks`` and scipy);
* timing (``--parts timing``): time per image-pass of our APGD-CE / APGD-T and torchattacks', interleaved, the
  median of 3 runs without early stopping, on the robust model.

Writes ``results.json``, ``tables.md`` and the curves as PNGs (``advfeat.figures``, when matplotlib is installed) to
``--out``; ``--replot`` redraws them from an earlier run's ``results.json``.
The long parts' rows (downstream, downstream_det) are cached one by one in ``--cache``/rows: a run stopped
by a crash or a Ctrl-C skips, when started again, the rows it finished (delete that folder to measure again).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

import advfeat as af
from advfeat.evaluate import shifted_accuracy
from advfeat.replicate import cached_stage, settings_for
from advfeat.steps import Adam, APGDStep, Constant, Cosine, Momentum, RelativeToStart, StepRule

BUDGETS = (10, 25, 50, 100, 200, 1000)


@dataclass(frozen=True)
class Rule:
    name: str
    rule: StepRule
    step: Callable[[float], float]  # the step size, given the problem's scale (1 for robustify, eps otherwise)
    keep_best: bool = False  # nonrobustify's keep_best (Kumano et al.'s recipe)


ROBUSTIFY_RULES = [
    Rule("fixed 0.1 (the paper)", Constant(), lambda s: 0.1),
    Rule("cosine from 0.5", Cosine(), lambda s: 0.5),
    Rule("cosine from 2.0", Cosine(), lambda s: 2.0),
    Rule("relative to start, cosine from 0.15 (default)", RelativeToStart(Cosine()), lambda s: 0.15),
    Rule("relative to start, cosine from 0.24", RelativeToStart(Cosine()), lambda s: 0.24),
    Rule("momentum 0.75, cosine from 2.0", Cosine(Momentum(0.75)), lambda s: 2.0),
    Rule("adam (beta1 0.5) 0.1, cosine", Cosine(Adam(beta1=0.5)), lambda s: 0.1),
    Rule("apgd from 1.0", APGDStep(), lambda s: 1.0),
]
NONROBUST_RULES = [
    Rule("fixed 0.1 (the paper)", Constant(), lambda eps: 0.1),
    Rule("fixed eps/4 (default)", Constant(), lambda eps: eps / 4),
    Rule("cosine from eps (the default until 2026-12-02)", Cosine(), lambda eps: eps),
    Rule("cosine from eps/2", Cosine(), lambda eps: eps / 2),
    Rule("momentum 0.75, cosine from eps/2", Cosine(Momentum(0.75)), lambda eps: eps / 2),
    Rule("apgd from 2 eps", APGDStep(), lambda eps: 2 * eps),
]
DDET_RUNS = [  # (rule, passes) of the downstream D_det part: what a learner trained on the set learns
    *[(NONROBUST_RULES[2], b) for b in (10, 25, 50, 100)],  # cosine from eps, the default until 2026-12-02
    *[(NONROBUST_RULES[0], b) for b in (25, 50, 100)],  # the paper's fixed 0.1
    *[(NONROBUST_RULES[1], b) for b in (25, 50)],
    *[(NONROBUST_RULES[3], b) for b in (25, 50)],
    (Rule("fixed eps/5, keep best (Kumano et al.)", Constant(), lambda eps: eps / 5, keep_best=True), 100),
]


class PassCounter:
    """Counts image-passes with a gradient (a forward whose input requires grad: one forward + backward)."""

    def __init__(self, model: nn.Module) -> None:
        self.count = 0
        self.handle = model.register_forward_pre_hook(self.hook)

    def hook(self, _m: nn.Module, args: tuple[Tensor, ...]) -> None:
        if torch.is_grad_enabled() and args[0].requires_grad:
            self.count += args[0].shape[0]


# -- models -------------------------------------------------------------------------------------------------

def load_data(dataset: str) -> tuple[Any, Any]:
    s = settings_for(dataset, "quick")
    if dataset == "planted":
        p = af.data.planted(s.n_train or 10000, s.n_test or 2000, seed=0)
        return p.train, p.test
    train, test = af.data.fashion_mnist(train=True), af.data.fashion_mnist(train=False)
    return train, Subset(test, range(s.n_test or len(test)))


def make_model(dataset: str) -> nn.Module:
    return af.models.PlantedNet() if dataset == "planted" else af.models.SmallCNN()


def trained(dataset: str, kind: str, train: Any, cache: Path, device: torch.device) -> nn.Module:
    """The standard or robust model of replicate's quick scale, trained once and cached."""
    s = settings_for(dataset, "quick")
    path = cache / f"{dataset}-{kind}.pt"
    torch.manual_seed(0)
    model = make_model(dataset).to(device)
    if not path.exists():
        t0 = time.perf_counter()
        loader = DataLoader(train, batch_size=s.batch_size, shuffle=True)
        af.adversarial_train(model, loader, method="standard" if kind == "standard" else "pgd",
                             attack=af.L2PGD(s.eps, steps=s.train_steps), lr=s.lr, device=device,
                             epochs=s.std_epochs if kind == "standard" else s.robust_epochs,
                             checkpoint=cache / f"{dataset}-{kind}.ckpt", resume=True, progress=False)
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
        print(f"trained {dataset} {kind} in {time.perf_counter() - t0:.0f} s", flush=True)
    model.load_state_dict(torch.load(path, map_location=device, weights_only=True))
    return model.eval()


# -- the three parts ----------------------------------------------------------------------------------------

def part_robustify(models: dict[str, nn.Module], train: Any, n: int, budgets: list[int], rules: list[Rule],
                   device: torch.device) -> list[dict[str, Any]]:
    src = Subset(train, range(n))
    rows = []
    for kind, model in models.items():
        for r in rules:
            for b in budgets:
                t0 = time.perf_counter()
                d = af.robustify(model, src, steps=b, step_size=r.step(1.0), rule=r.rule, device=device,
                                 progress=False).meta["rel_distance"]
                rows.append({"model": kind, "rule": r.name, "passes": b, "median": float(d.median()),
                             "p90": float(d.quantile(0.9)), "seconds": time.perf_counter() - t0})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def cached_row(cache: Path, key: dict[str, Any], fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """One finished row of a long part, kept in ``cache/rows`` under a digest of ``key`` (the part, the dataset,
    the rule, its budget, the library's version): a rerun after a crash or a Ctrl-C skips the rows already done."""
    key = {**key, "advfeat": af.__version__}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    (cache / "rows").mkdir(parents=True, exist_ok=True)
    return cached_stage(cache / "rows", f"{key['part']}-{key['dataset']}-{digest}", fn,
                        log=lambda m: print(m, flush=True))


def part_downstream(model: nn.Module, train: Any, test: Any, rules: list[Rule], device: torch.device,
                    dataset: str, cache: Path) -> list[dict[str, Any]]:
    """D_R built with each rule (100 passes, and the paper's 1000 fixed steps) from the first n_construct
    images, a standard model trained on it as replicate trains it, its accuracy clean and under L2 PGD: the
    quality that matters, which the distance alone does not show. The last row is the control: the same real
    images, trained and scored alike (at replicate's quick size, a small set alone makes a model more robust)."""
    s = settings_for(dataset, "quick")
    src = Subset(train, range(s.n_construct or len(train)))
    runs = [(r, 100) for r in rules] + [(r, 1000) for r in rules if r.name == ROBUSTIFY_RULES[0].name]

    def score(data: Any) -> dict[str, Any]:
        torch.manual_seed(0)
        m = make_model(dataset).to(device)
        af.adversarial_train(m, DataLoader(data, batch_size=s.batch_size, shuffle=True), method="standard",
                             epochs=s.constructed_epochs, lr=s.lr, device=device, progress=False)
        torch.manual_seed(0)
        attacks = {f"{e:g}": af.L2PGD(e, steps=s.eval_steps, rel_step_size=0.2) for e in s.eval_eps}
        res = af.evaluate(m, DataLoader(test, batch_size=500), attacks, device=device, progress=False)
        return {"clean": res.clean_accuracy, "robust": {k: res.robust_accuracy(k) for k in attacks}}

    rows = []
    for r, b in runs:
        def one(r: Rule = r, b: int = b) -> dict[str, Any]:
            ds = af.robustify(model, src, steps=b, step_size=r.step(1.0), rule=r.rule, device=device, progress=False)
            return {"rule": r.name, "passes": b, "median": float(ds.meta["rel_distance"].median()), **score(ds)}
        key = {"part": "downstream", "dataset": dataset, "rule": r.name, "step_rule": repr(r.rule),
               "step_size": r.step(1.0), "passes": b, "n": len(src)}
        rows.append(cached_row(cache, key, one))
        print(json.dumps(rows[-1]), flush=True)
    if rules:
        control = "control: the same real images"
        rows.append(cached_row(cache, {"part": "downstream", "dataset": dataset, "rule": control, "n": len(src)},
                               lambda: {"rule": control, "passes": 0, "median": None, **score(src)}))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def part_nonrobustify(model: nn.Module, train: Any, n: int, eps: float, budgets: list[int], rules: list[Rule],
                      device: torch.device) -> list[dict[str, Any]]:
    src = Subset(train, range(n))
    rows = []
    for r in rules:
        for b in budgets:
            t0 = time.perf_counter()
            ds = af.nonrobustify(model, src, mode="det", eps=eps, steps=b, step_size=r.step(eps), rule=r.rule,
                                 device=device, progress=False)
            x, t = ds.tensors()
            with torch.no_grad():
                logits = model(x.to(device)).float().cpu()
            margin = logits.gather(1, t[:, None]).squeeze(1) - logits.scatter(1, t[:, None], -torch.inf).amax(1)
            rows.append({"rule": r.name, "passes": b, "reached": float(ds.meta["target_reached"].double().mean()),
                         "median_margin": float(margin.median()), "seconds": time.perf_counter() - t0})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def part_downstream_det(model: nn.Module, train: Any, test: Any, seeds: list[int], device: torch.device,
                        dataset: str, keep: Callable[[list[Rule]], list[Rule]], cache: Path) -> list[dict[str, Any]]:
    """D_det built with each (rule, passes) of ``DDET_RUNS`` from replicate's source images through the standard
    model, a learner trained on it as replicate trains row 6 (one per seed: its init and shuffling), and its
    accuracy on the real test set: what a D_det is for. Also the targets reached, the passes each image cost
    (counted) and, on planted data, the share of test images predicted y + 1 (the shifted robust feature)."""
    s = settings_for(dataset, "quick")
    src = Subset(train, range(s.n_construct or len(train)))
    names = {r.name for r in keep([r for r, _ in DDET_RUNS])}
    rows = []
    for r, b in DDET_RUNS:
        if r.name not in names:
            continue

        def one(r: Rule = r, b: int = b) -> dict[str, Any]:
            t0 = time.perf_counter()
            counter = PassCounter(model)
            ds = af.nonrobustify(model, src, mode="det", eps=s.nonrobust_eps, steps=b,
                                 step_size=r.step(s.nonrobust_eps), rule=r.rule, keep_best=r.keep_best,
                                 device=device, progress=False)
            counter.handle.remove()
            build_s = time.perf_counter() - t0
            accs, shifts = [], []
            for seed in seeds:
                torch.manual_seed(seed)
                m = make_model(dataset).to(device)
                af.adversarial_train(m, DataLoader(ds, batch_size=s.batch_size, shuffle=True), method="standard",
                                     epochs=s.constructed_epochs, lr=s.lr, device=device, progress=False)
                accs.append(shifted_accuracy(m.eval(), test, device=device))
                shifts.append(shifted_accuracy(m, test, shift=1, device=device))
            return {"rule": r.name, "steps": b, "passes": counter.count / len(src), "seeds": seeds, "test": accs,
                    "mean": sum(accs) / len(accs), "predicts_shift": sum(shifts) / len(shifts),
                    "reached": float(ds.meta["target_reached"].double().mean()), "build_seconds": build_s}
        key = {"part": "downstream_det", "dataset": dataset, "rule": r.name, "step_rule": repr(r.rule),
               "step_size": r.step(s.nonrobust_eps), "keep_best": r.keep_best, "eps": s.nonrobust_eps,
               "steps": b, "seeds": seeds, "n": len(src)}
        rows.append(cached_row(cache, key, one))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _attacks(norm: str, eps: float, b: int) -> dict[str, af.Attack]:
    pgd = (af.L2PGD if norm == "l2" else af.LinfPGD)(eps, steps=b, rel_step_size=2.5 / b, random_start=True)
    return {
        "PGD": pgd,
        "PGD, 5 restarts": af.Restarts(pgd, 5),
        "APGD-CE": af.APGD(eps, norm=norm, steps=b),
        "APGD-DLR": af.APGD(eps, norm=norm, steps=b, loss=af.dlr),
        "APGD-T (9 targets)": af.APGD(eps, norm=norm, steps=b, loss=af.dlr, n_target_classes=9),
    }


def part_evaluate(model: nn.Module, test: Any, n: int, threats: list[tuple[str, float]], budgets: list[int],
                  device: torch.device) -> list[dict[str, Any]]:
    loader = DataLoader(Subset(test, range(min(n, len(test)))), batch_size=500)
    rows = []
    counter = PassCounter(model)
    try:
        for norm, eps in threats:
            for b in budgets:
                broken: Tensor | None = None
                for name, attack in _attacks(norm, eps, b).items():
                    torch.manual_seed(0)
                    counter.count = 0
                    t0 = time.perf_counter()
                    r, ok = _robust(model, loader, attack, device)
                    broken = ~ok if broken is None else broken | ~ok
                    rows.append({"norm": norm, "eps": eps, "steps": b, "attack": name, "robust": r,
                                 "passes_per_image": counter.count / r["total"], "seconds": time.perf_counter() - t0})
                    rows[-1]["robust"] = r["accuracy"]
                    print(json.dumps(rows[-1]), flush=True)
                    if name == "APGD-T (9 targets)":
                        worst = 1 - float(broken.double().mean())  # the worst case of every attack measured
                        rows.append({"norm": norm, "eps": eps, "steps": b, "attack": "worst of all above",
                                     "robust": worst, "passes_per_image": None, "seconds": None})
                rows += _torchattacks(model, loader, norm, eps, b, device, counter)
    finally:
        counter.handle.remove()
    return rows


def _robust(model: nn.Module, loader: DataLoader[Any], attack: af.Attack, device: torch.device
            ) -> tuple[dict[str, Any], Tensor]:
    """Robust accuracy as :func:`advfeat.evaluate` measures it (correctly classified samples only, early
    stopping), and per sample whether it held."""
    run = attack.for_evaluation(True)
    held = []
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with torch.no_grad():
            ok = model(x).argmax(1) == y
        keep = ok.nonzero().squeeze(1)
        x_adv = run(model, x[keep], y[keep])
        with torch.no_grad():
            ok[keep] = model(x_adv).argmax(1) == y[keep]
        held.append(ok.cpu())
    ok = torch.cat(held)
    return {"accuracy": float(ok.double().mean()), "total": len(ok)}, ok


def part_timing(model: nn.Module, test: Any, n: int, norm: str, eps: float, steps: int, repeats: int,
                device: torch.device) -> list[dict[str, Any]]:
    """Time per forward+backward pass of our APGD and torchattacks' on the same model and images, interleaved,
    ``repeats`` times (median), without early stopping (both run every step on every image)."""
    import statistics

    try:
        import torchattacks
    except Exception:  # noqa: BLE001
        return []
    x, y = next(iter(DataLoader(Subset(test, range(n)), batch_size=n)))
    x, y = x.to(device), y.to(device)
    n_name = "Linf" if norm == "linf" else "L2"
    runs = {
        "ours APGD-CE": lambda: af.APGD(eps, norm=norm, steps=steps, seed=0)(model, x, y),
        "torchattacks APGD-CE": lambda: torchattacks.APGD(model, norm=n_name, eps=eps, steps=steps, seed=0)(x, y),
        "ours APGD-T": lambda: af.APGD(eps, norm=norm, steps=steps, loss=af.dlr, n_target_classes=9, seed=0)(
            model, x, y),
        "torchattacks APGD-T": lambda: torchattacks.APGDT(model, norm=n_name, eps=eps, steps=steps, n_classes=10,
                                                          seed=0)(x, y),
    }
    counter = PassCounter(model)
    times: dict[str, list[float]] = {k: [] for k in runs}
    passes: dict[str, int] = {}
    try:
        for _ in range(repeats):
            for name, run in runs.items():
                counter.count = 0
                t0 = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t0)
                passes[name] = counter.count
    finally:
        counter.handle.remove()
    rows = [{"attack": k, "seconds": statistics.median(v), "passes": passes[k],
             "us_per_image_pass": 1e6 * statistics.median(v) / passes[k]} for k, v in times.items()]
    for r in rows:
        print(json.dumps(r), flush=True)
    return rows


def _torchattacks(model: nn.Module, loader: DataLoader[Any], norm: str, eps: float, b: int, device: torch.device,
                  counter: PassCounter) -> list[dict[str, Any]]:
    try:
        import torchattacks  # type: ignore[import-not-found]
    except Exception:  # noqa: BLE001 - not installed, or fails to import beside this torch
        return []
    rows = []
    n = "Linf" if norm == "linf" else "L2"
    for name, make in (("torchattacks APGD-CE", lambda: torchattacks.APGD(model, norm=n, eps=eps, steps=b,
                                                                          loss="ce", seed=0)),
                       ("torchattacks APGD-DLR", lambda: torchattacks.APGD(model, norm=n, eps=eps, steps=b,
                                                                           loss="dlr", seed=0)),
                       ("torchattacks APGD-T (9 targets)", lambda: torchattacks.APGDT(model, norm=n, eps=eps, steps=b,
                                                                                      n_classes=10, seed=0))):
        atk = make()
        counter.count = 0
        t0 = time.perf_counter()
        held = []
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            x_adv = atk(x, y)
            with torch.no_grad():
                held.append((model(x).argmax(1) == y) & (model(x_adv).argmax(1) == y))
        ok = torch.cat(held)
        rows.append({"norm": norm, "eps": eps, "steps": b, "attack": name, "robust": float(ok.double().mean()),
                     "passes_per_image": counter.count / len(ok), "seconds": time.perf_counter() - t0})
        print(json.dumps(rows[-1]), flush=True)
    return rows


# -- report -------------------------------------------------------------------------------------------------

def tables(results: dict[str, Any]) -> str:
    out: list[str] = []
    for ds, parts in results["datasets"].items():
        if "robustify" in parts:
            budgets = sorted({r["passes"] for r in parts["robustify"]})
            for kind in ("robust", "standard"):
                rows = [r for r in parts["robustify"] if r["model"] == kind]
                if not rows:
                    continue
                out += [f"### robustify, {ds}, {kind} model: median (p90) relative distance", "",
                        "| rule | " + " | ".join(f"{b} passes" for b in budgets) + " |",
                        "|---|" + "---|" * len(budgets)]
                for name in dict.fromkeys(r["rule"] for r in rows):
                    cells = {r["passes"]: f"{r['median']:.4f} ({r['p90']:.4f})" for r in rows if r["rule"] == name}
                    out.append(f"| {name} | " + " | ".join(cells.get(b, "") for b in budgets) + " |")
                out.append("")
        if "downstream" in parts:
            rows = parts["downstream"]
            eps = list(rows[0]["robust"])
            out += [f"### D_R built with each rule, {ds}: a standard model trained on it, accuracy % on the test set",
                    "", "| rule | passes | median distance | clean | " + " | ".join(f"L2 eps {e}" for e in eps) + " |",
                    "|---|---|---|---|" + "---|" * len(eps)]
            for r in rows:
                rob = " | ".join(f"{100 * r['robust'][e]:.1f}" for e in eps)
                med = "-" if r["median"] is None else f"{r['median']:.4f}"
                out.append(f"| {r['rule']} | {r['passes']} | {med} | {100 * r['clean']:.1f} | {rob} |")
            out.append("")
        if "nonrobustify" in parts:
            rows = parts["nonrobustify"]
            budgets = sorted({r["passes"] for r in rows})
            out += [f"### nonrobustify (det, eps {parts['eps']:g}), {ds}: targets reached % (median margin)", "",
                    "| rule | " + " | ".join(f"{b} passes" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
            for name in dict.fromkeys(r["rule"] for r in rows):
                cells = {r["passes"]: f"{100 * r['reached']:.1f} ({r['median_margin']:.2f})" for r in rows
                         if r["rule"] == name}
                out.append(f"| {name} | " + " | ".join(cells.get(b, "") for b in budgets) + " |")
            out.append("")
        if "downstream_det" in parts:
            rows = parts["downstream_det"]
            out += [f"### D_det built with each rule, {ds} (eps {parts['eps']:g}): a learner trained on it, accuracy % "
                    "on the real test set (mean over seeds)", "",
                    "| rule | steps | passes per image | targets reached % | real test % (seeds) | mean | "
                    "predicts y+1 % |", "|---|---|---|---|---|---|---|"]
            for r in rows:
                each = " / ".join(f"{100 * a:.1f}" for a in r["test"])
                out.append(f"| {r['rule']} | {r['steps']} | {r['passes']:.1f} | {100 * r['reached']:.1f} | {each} | "
                           f"{100 * r['mean']:.1f} | {100 * r['predicts_shift']:.1f} |")
            out.append("")
        if parts.get("timing"):
            out += [f"### time per pass, {ds}, robust model, L2, 100 steps, every step on every image (median of 3)",
                    "", "| attack | seconds | image-passes | µs per image-pass |", "|---|---|---|---|"]
            out += [f"| {r['attack']} | {r['seconds']:.2f} | {r['passes']} | {r['us_per_image_pass']:.1f} |"
                    for r in parts["timing"]]
            out.append("")
        if "evaluate" in parts:
            rows = parts["evaluate"]
            for norm, eps in dict.fromkeys((r["norm"], r["eps"]) for r in rows):
                sub = [r for r in rows if (r["norm"], r["eps"]) == (norm, eps)]
                budgets = sorted({r["steps"] for r in sub})
                out += [f"### evaluation, {ds}, robust model, {norm} eps {eps:g}: robust accuracy % "
                        "(passes per image)", "",
                        "| attack | " + " | ".join(f"{b} steps" for b in budgets) + " |",
                        "|---|" + "---|" * len(budgets)]
                for name in dict.fromkeys(r["attack"] for r in sub):
                    cells = {}
                    for r in sub:
                        if r["attack"] == name:
                            p = "" if r["passes_per_image"] is None else f" ({r['passes_per_image']:.0f})"
                            cells[r["steps"]] = f"{100 * r['robust']:.1f}{p}"
                    out.append(f"| {name} | " + " | ".join(cells.get(b, "") for b in budgets) + " |")
                out.append("")
    return "\n".join(out)


def plot(results: dict[str, Any], out: Path) -> list[Path]:
    """The curves with :func:`advfeat.figures.quality_per_pass`: robustify's median distance through each model,
    nonrobustify's share of targets reached (matplotlib needed: the ``report`` extra)."""
    try:
        af.figures.require()
    except ImportError:
        return []
    written = []
    for ds, parts in results["datasets"].items():
        for kind in ("robust", "standard"):
            rows = [r for r in parts.get("robustify", []) if r["model"] == kind]
            if rows:
                fig = af.figures.quality_per_pass(rows, value="median", label="median relative distance", log_y=True,
                                                  title=f"robustify through the {kind} model, {ds}")
                written.append(af.figures.save(fig, out / f"robustify_{ds}_{kind}.png"))
        if parts.get("nonrobustify"):
            fig = af.figures.quality_per_pass(parts["nonrobustify"], value="reached", label="targets reached",
                                              title=f"nonrobustify (det, eps {parts['eps']:g}), {ds}")
            written.append(af.figures.save(fig, out / f"nonrobustify_{ds}.png"))
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default=None, help="planted,fashion-mnist (default: both, FMNIST if installed)")
    ap.add_argument("--parts", default="robustify,downstream,nonrobustify,evaluate")
    ap.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    ap.add_argument("--eval-budgets", default="10,25,50,100")
    ap.add_argument("--rules", default=None, help="only the rules whose names contain one of these (comma-separated)")
    ap.add_argument("--n-robustify", default="planted=256,fashion-mnist=128")
    ap.add_argument("--n-nonrobustify", type=int, default=512)
    ap.add_argument("--n-eval", type=int, default=1000)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "advfeat" / "quality_per_pass")
    ap.add_argument("--out", type=Path, default=Path("bench_out") / "quality_per_pass")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seeds", default="0,1,2", help="the learners' seeds of the downstream_det part")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--malloc", choices=["tuned", "default"], default="tuned")
    ap.add_argument("--replot", action="store_true", help="only redraw tables and figures from --out/results.json")
    args = ap.parse_args()
    if args.replot:
        results = json.loads((args.out / "results.json").read_text())
        (args.out / "tables.md").write_text(tables(results))
        for path in plot(results, args.out):
            print(f"figure: {path}")
        return
    if args.malloc == "tuned":
        af.allocator.tune()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    datasets = args.datasets.split(",") if args.datasets else ["planted"] + (
        ["fashion-mnist"] if (af.data.FASHION_MNIST_ROOT / "train-images-idx3-ubyte.gz").exists() else [])
    parts = args.parts.split(",")
    budgets = [int(b) for b in args.budgets.split(",")]
    keep = args.rules.split(",") if args.rules else None

    def chosen(rules: list[Rule]) -> list[Rule]:
        return [r for r in rules if keep is None or any(k in r.name for k in keep)]

    n_rob = dict(kv.split("=") for kv in args.n_robustify.split(","))
    results: dict[str, Any] = {"threads": torch.get_num_threads(), "device": str(device), "datasets": {}}
    t_start = time.perf_counter()
    for ds in datasets:
        s = settings_for(ds, "quick")
        train, test = load_data(ds)
        models = {kind: trained(ds, kind, train, args.cache, device) for kind in ("robust", "standard")}
        res: dict[str, Any] = {"eps": s.nonrobust_eps}
        if "robustify" in parts:
            res["robustify"] = part_robustify(models, train, int(n_rob[ds]), budgets, chosen(ROBUSTIFY_RULES), device)
        if "downstream" in parts:
            res["downstream"] = part_downstream(models["robust"], train, test, chosen(ROBUSTIFY_RULES), device, ds,
                                                args.cache)
        if "nonrobustify" in parts:
            res["nonrobustify"] = part_nonrobustify(models["standard"], train, args.n_nonrobustify, s.nonrobust_eps,
                                                    [b for b in budgets if b <= 200], chosen(NONROBUST_RULES),
                                                    device)
        if "downstream_det" in parts:
            res["downstream_det"] = part_downstream_det(models["standard"], train, test,
                                                        [int(v) for v in args.seeds.split(",")], device, ds, chosen,
                                                        args.cache)
        if "evaluate" in parts:
            threats = [("l2", s.eps), ("linf", 0.1 if ds == "fashion-mnist" else 0.03)]
            res["evaluate"] = part_evaluate(models["robust"], test, args.n_eval, threats,
                                            [int(b) for b in args.eval_budgets.split(",")], device)
        if "timing" in parts:
            res["timing"] = part_timing(models["robust"], test, args.n_eval, "l2", s.eps, 100, 3, device)
        results["datasets"][ds] = res
    results["seconds"] = time.perf_counter() - t_start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    text = tables(results)
    (args.out / "tables.md").write_text(text)
    print(text)
    for path in plot(results, args.out):
        print(f"figure: {path}")


if __name__ == "__main__":
    main()
