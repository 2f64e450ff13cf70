"""The replication's report: the row names, the paper's and the critics' numbers, ``report.md`` and its figures.

:func:`render_report` turns what ``results.json`` holds into ``report.md`` (so the two always agree);
:func:`draw` writes the figures (``advfeat.figures``, the ``report`` extra).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from . import data as afdata
from . import figures
from .construct import ConstructedDataset

__all__ = ["PAPER", "ROWS", "SHORT", "CONTROLS", "render_report", "headline_table", "curve_summary",
           "gradient_free_table", "draw"]

PAPER = {  # CIFAR-10, ResNet-50: clean / under L2 eps 0.25 (docs/paper.md)
    "standard": (95, 4), "robust": (91, 82), "d_r": (84, 48), "d_nr": (88, 0), "d_rand": (63, 0),
    "d_det": (44, 0), "control": (None, None),
}
ROWS = [
    ("standard", "1. standard training on D", "D"),
    ("robust", "2. adversarial training on D", "D"),
    ("d_r", "3. standard training on D_R", "robustify(robust model)"),
    ("d_nr", "4. standard training on D_NR", "robustify(standard model)"),
    ("d_rand", "5. standard training on D_rand", "nonrobustify(standard, rand)"),
    ("d_det", "6. standard training on D_det", "nonrobustify(standard, det)"),
    ("control", "control: standard training on real images", "first n_construct images of D"),
]
SHORT = {"standard": "D (standard)", "robust": "D (adversarial)", "d_r": "D_R", "d_nr": "D_NR", "d_rand": "D_rand",
         "d_det": "D_det", "control": "real control", "d_det_bugs": "D_det bugs", "leakage_rand": "leak D_rand",
         "leakage_det": "leak D_det", "shortcut_rand": "shortcut rand", "shortcut_det": "shortcut det",
         "distill_wrong": "wrong labels"}
"""Short row names for figures."""


CONTROLS = [  # key, what, the critics' CIFAR-10 numbers (docs/paper.md)
    ("d_det_bugs", "D_det of bugs: targeted on the standard model, keeping an ensemble on the true label "
     "(Nakkiran)", "success 99.3%, transfer 1.7%, trained model 2.8% (plain D_det: transfer 82.5%, 33.2%)"),
    ("leakage_rand", "linear probe on the robust model's logits, trained on D_rand (Goh)", "23.5%"),
    ("leakage_det", "linear probe on the robust model's logits, trained on D_det (Goh)", "6.8%"),
    ("shortcut_rand", "D_rand with class-keyed random patterns instead of the attack (Keller Jordan)", "79.5%"),
    ("shortcut_det", "D_det with class-keyed random patterns instead of the attack (Keller Jordan)", "32.3%"),
    ("distill_wrong", "the images a weak model gets wrong, with its labels (Wallace)", "49.7%"),
]


def draw(out: Path, summary: dict[str, Any], train: Dataset[Any], built: dict[str, ConstructedDataset],
         ranges: Mapping[str, Any] | None = None) -> None:
    """report figures: the results as bars (with ``ranges``, each bar's published range as an error bar: see
    ``figures.results_bars``), and 20 images of D and of each constructed set with class names."""
    s = summary["settings"]
    names = afdata.CLASS_NAMES.get(s["dataset"])
    figures.save(figures.results_bars(summary, ranges=ranges), out / "results.png")
    idx = list(range(20))
    xs, ys = zip(*[train[i] for i in idx], strict=True)
    figures.save(figures.image_grid(torch.stack(xs), torch.stack([torch.as_tensor(y) for y in ys]), names,
                                    title=f"D: {s['dataset']} training images"), out / "grids" / "D.png")
    titles = {"d_r": "D_R = robustify(robust model)", "d_nr": "D_NR = robustify(standard model)",
              "d_rand": "D_rand = nonrobustify(standard, rand): true -> new label",
              "d_det": "D_det = nonrobustify(standard, det): true -> new label"}
    for name, title in titles.items():
        if name in built:
            ds = built[name]
            k = idx[: len(ds)]
            xs, ys = zip(*[ds[i] for i in k], strict=True)
            x, y = torch.stack(xs), torch.stack(ys)
            if "original_label" in ds.meta:  # relabelled: show the class the image came from and the new one
                fig = figures.image_grid(x, ds.meta["original_label"][k], names, new_labels=y, title=title)
            else:
                fig = figures.image_grid(x, y, names, title=title)
            figures.save(fig, out / "grids" / f"{name.upper()}.png")


HEADLINE = {"standard": "standard training on D", "robust": "adversarial training on D",
            "d_r": "standard training on D_R", "d_nr": "standard training on D_NR",
            "d_rand": "standard training on D_rand", "d_det": "standard training on D_det"}


def headline_table(summary: dict[str, Any], eps: str) -> str:
    """The table README.md and docs/results.md publish for a run: clean and robust accuracy (%) under L2 ``eps``
    for the six experiments and the control, beside the paper's. ``scripts/publish_tables.py`` writes it from a
    ``results.json``; the suite checks the published planted one against its own run."""
    rows = summary["rows"]
    n = summary["settings"]["n_construct"]
    lines = [f"| experiment | clean | L2 eps {eps} | paper (CIFAR-10, eps 0.25) |", "|---|---|---|---|"]
    for key, label in [*HEADLINE.items(), ("control", "control: standard training on " + (
            "all of D (row 1)" if rows["control"].get("same_as") else f"{n:,} real images (D_R's size and recipe)"))]:
        r, p = rows[key], PAPER[key]
        robust = "" if key in ("d_rand", "d_det") else _pct(r["robust"].get(eps))
        paper = "" if p[0] is None else (f"{p[0]}" if key in ("d_rand", "d_det") else f"{p[0]} / {p[1]}")
        lines.append(f"| {label} | {_pct(r['clean'])} | {robust} | {paper} |")
    return "\n".join(lines) + "\n"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def results_table(summary: dict[str, Any]) -> str:
    """The six experiments and the control: clean and robust accuracy (%) at every evaluation eps, the paper's
    numbers and each row's time."""
    s, rows = summary["settings"], summary["rows"]
    eps_keys = [f"{e:g}" for e in s["eval_eps"]]
    head = " | ".join(f"L2 eps {k}" for k in eps_keys)
    lines = [f"| experiment | trained on | clean | {head} | paper clean / adv | time (s) |",
             "|---|---|---|" + "---|" * len(eps_keys) + "---|---|"]
    for key, label, on in ROWS:
        r = rows[key]
        rob = " | ".join(_pct(r["robust"][k]) for k in eps_keys)
        p = PAPER[key]
        paper = "-" if p[0] is None else f"{p[0]} / {p[1]}"
        if r.get("same_as"):  # built from all of D: the control is that row's model, not trained again
            on = f"all of D: row {[k for k, _, _ in ROWS].index(r['same_as']) + 1}, not trained again"
        if key in ("d_rand", "d_det") and "source" in summary:  # attacked the source stage, not row 1's model
            src = f"source ({s['nonrobust_source_epochs']} epochs)"
            on = on.replace("standard", src) + f", eps {s['nonrobust_eps']:g}"
        lines.append(f"| {label} | {on} | {_pct(r['clean'])} | {rob} | {paper} | {r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def constructions_table(summary: dict[str, Any]) -> str:
    """What each constructed set measured (distances, targets reached, y+1 predicted)."""
    rows = summary["rows"]
    lines = ["| dataset | n | measure | value |", "|---|---|---|---|"]
    for key in ("d_r", "d_nr", "d_rand", "d_det"):
        for m, v in rows[key]["construction"].items():
            lines.append(f"| {key} | {rows[key]['n']} | {m} | {v:.3f} |")
    if "predicts_y_plus_1" in rows["d_det"]:
        lines.append(f"| d_det | - | model predicts y+1 on the test set | {rows['d_det']['predicts_y_plus_1']:.3f} |")
    return "\n".join(lines) + "\n"


def controls_table(summary: dict[str, Any]) -> str:
    """The critics' controls (a run with ``--controls``) beside their CIFAR-10 numbers; empty without them."""
    rows = summary["rows"]
    if not any(k in rows for k, _, _ in CONTROLS):
        return ""
    lines = ["| control | what | real test accuracy | targets reached | transfer rate | critics (CIFAR-10) |",
             "|---|---|---|---|---|---|"]
    for key, what, theirs in CONTROLS:
        if key in rows:
            r = rows[key]
            own = rows.get(key.replace("leakage_", "d_")) if key.startswith("leakage_") else None
            if own is not None:  # what the set teaches its own model beyond what robust features alone explain
                what += (f"; the set's own model: {_pct(own['clean'])}, "
                         f"{100 * (own['clean'] - r['clean']):+.1f} beyond the probe")
            lines.append(f"| {key} | {what} | {_pct(r['clean'])} | {_pct(r.get('targets_reached'))} | "
                         f"{_pct(r.get('transfer_rate'))} | {theirs} |")
    return "\n".join(lines) + "\n"


def transfer_table(summary: dict[str, Any]) -> str:
    """The paper's Figure 3 as a table (a run with ``--transfer``); empty without it."""
    if "transfer" not in summary:
        return ""
    lines = ["| # | architecture | test accuracy | transfer rate |", "|---|---|---|---|"]
    for k, t in enumerate(summary["transfer"], 1):
        lines.append(f"| {k} | {t['architecture']} | {_pct(t['test_accuracy'])} | {_pct(t['transfer_rate'])} |")
    return "\n".join(lines) + "\n"


def features_table(summary: dict[str, Any]) -> str:
    """Planted data only: which planted feature each constructed set carries (measured with the planted
    directions), beside each construction's own measure; empty on other data."""
    rows = summary["rows"]
    if "robust_feature_says_y" not in rows["d_r"]["construction"]:
        return ""
    lines = ["| dataset | robust feature says y | non-robust feature says y | non-robust feature says the new label | "
             "construction |", "|---|---|---|---|---|"]
    for key, name in (("d_r", "D_R"), ("d_nr", "D_NR"), ("d_rand", "D_rand"), ("d_det", "D_det")):
        c = rows[key]["construction"]
        if "targets_reached" in c:
            what = f"{_pct(c['targets_reached'])}% of targets reached"
            if key == "d_det" and "predicts_y_plus_1" in rows[key]:
                what += f"; the model predicts y+1 for {_pct(rows[key]['predicts_y_plus_1'])}% of test images"
        else:
            what = f"median relative distance {c['rel_distance_median']:.3f} (p90 {c['rel_distance_p90']:.3f})"
        lines.append(f"| {name} | {_pct(c['robust_feature_says_y'])}% | {_pct(c['nonrobust_feature_says_y'])}% | "
                     f"{_pct(c['nonrobust_feature_says_label'])}% | {what} |")
    return "\n".join(lines) + "\n"


def gradient_free_table(summary: dict[str, Any]) -> str:
    """The gradient-free check: robust accuracy (%) of each row's model on the same test images under L2 PGD,
    under the Square Attack and under AutoAttack's standard cascade at the run's eps, with 95% intervals; empty for
    a run without it (the cascade's columns only where the run measured it)."""
    rows = summary["rows"]
    checked = [(key, label) for key, label, _ in ROWS if "gradient_free" in rows.get(key, {})]
    if not checked:
        return ""
    g0 = rows[checked[0][0]]["gradient_free"]
    cascade = "cascade" in g0
    budget = (f" and AutoAttack's standard cascade (APGD-CE, APGD-T, FAB-T at {g0['cascade']['steps']} steps, Square "
              f"at {g0['cascade']['queries']:,} queries, each on the points still robust)" if cascade else "")
    lines = [f"Robust accuracy (%) on the first {g0['n']:,} test images at L2 eps {g0['eps']:g}: PGD (the table's "
             f"attack), the Square Attack ({g0['queries']:,} queries, no gradient){budget}, with 95% intervals. "
             "Square well below PGD would mean the robustness PGD sees is gradient masking.", ""]
    best = "best_known" in g0
    head = ["experiment", "PGD", "Square", "Square - PGD"] + (["AutoAttack", "AutoAttack - PGD"] if cascade else [])
    head += ["best known", "passes per image (PGD / Square / AutoAttack)"] if best else []
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(g: dict[str, Any]) -> str:
        lo, hi = g["interval_95"]
        return f"{_pct(g['accuracy'])} [{_pct(lo)}, {_pct(hi)}]"

    def gap(g: dict[str, Any], k: str) -> str:
        return f"{100 * (g[k]['accuracy'] - g['pgd']['accuracy']):+.1f}"

    for key, label in checked:
        g = rows[key]["gradient_free"]
        more = [cell(g["autoattack"]), gap(g, "autoattack")] if cascade and "autoattack" in g else []
        if best and "best_known" in g:
            more += [cell(g["best_known"]), " / ".join(f"{g[k]['passes_per_image']:.0f}" for k in
                                                        ("pgd", "square", "autoattack") if k in g)]
        lines.append("| " + " | ".join([label, cell(g["pgd"]), cell(g["square"]), gap(g, "square"), *more]) + " |")
    if best:
        lines += ["", "Best known: per sample, the worst of the three attacks (as RobustBench ranks); passes per "
                  "image: the model's forward and backward passes each attack made, per checked image."]
    return "\n".join(lines) + "\n"


TABLES = {"headline": None, "results": results_table, "constructions": constructions_table,
          "features": features_table, "controls": controls_table, "transfer": transfer_table,
          "gradient_free": gradient_free_table}
"""The tables a run's ``results.json`` renders (``scripts/publish_tables.py`` publishes them by these names;
``headline`` is ``headline_table`` at the run's eps)."""


def render_report(summary: dict[str, Any], spread: str = "") -> str:
    """report.md from the results.json content (so the two always agree); ``spread``: the section that places
    the run in the published spread of its settings (``advfeat.replicate.spread.placement``), when there is one."""
    s = summary["settings"]
    rows = summary["rows"]
    lines = [
        f"# advfeat replication: {s['dataset']} ({s['scale']})", "",
        f"Accuracy (%) on the real test set ({rows['standard']['n_test']} images): clean and under L2 PGD "
        f"({s['eval_steps']} steps, step eps/5, worst iterate). Paper: CIFAR-10, ResNet-50, L2 eps 0.25.", "",
        results_table(summary)]
    if spread:
        lines += ["## Where this run sits among the published runs", "", spread]
    lines += ["## Constructions", "", constructions_table(summary)]
    if "source" in summary:
        src = summary["source"]
        lines += ["", f"D_rand, D_det and the bugs were built through a standard model trained "
                  f"{s['nonrobust_source_epochs']} epochs (not row 1's {s['std_epochs']}): {_pct(src['clean'])}% "
                  "clean on the real test set.", ""]
    curves = [f"{label} {_pct(peak)}% at epoch {epoch}, final {_pct(final)}%" for key, label in
              (("d_rand", "D_rand"), ("d_det", "D_det")) if "curve" in rows.get(key, {})
              for peak, epoch, final in [curve_summary(rows[key]["curve"])]]
    if curves:
        lines += ["", "Learners' real-test accuracy over their epochs (peak, its epoch, final): "
                  + "; ".join(curves) + ". The table reports the final epoch, as the protocol does.", ""]
    gradient_free = gradient_free_table(summary)
    if gradient_free:
        lines += ["## Gradient-free check", "", gradient_free]
    controls, transfer = controls_table(summary), transfer_table(summary)
    if controls:
        lines += ["## The critics' controls", "",
                  "Accuracy (%) of each control on the real test set (a linear probe's for the leakage rows), beside "
                  "the critics' CIFAR-10 numbers (docs/paper.md). Targets reached: on the standard model; "
                  "transfer rate: "
                  "the share a fresh, independently trained standard model classifies as the new label "
                  f"(plain D_det: {_pct(rows['d_det'].get('transfer_rate'))}%).", "", controls]
    if transfer:
        lines += ["## Transfer (the paper's Figure 3)", "",
                  "Architectures trained on D_det: accuracy on the real test set, and the rate at which L2 PGD "
                  f"examples (eps {s['eps']:g}) of the standard model on D transfer to each (among test samples "
                  "the target gets right and the source is fooled by). Figure: grids/transfer.png (each point named by "
                  "its architecture, with a least-squares line).", "", transfer]
    lines += ["## Settings", "",
              f"Learning rate {s['lr']} (SGD, momentum 0.9, wd 5e-4, one-cycle) everywhere except on D_NR and "
              f"D_rand ({s['lr_nr']}), following the authors' recipe (0.1 on D_R / D_det, 0.01 on D_NR / D_rand). "
              "The control uses D_R's recipe on the real images D_R was built from.", "",
              "```", json.dumps(s, indent=1), "```", "",
              f"seed {summary['seed']}, device {summary['device']}; this invocation took "
              f"{summary['total_seconds']:.1f} s (a stage's time is that of the run that did it).", "",
              "Figures: results.png (the table as bars, beside the paper's numbers); grids/D.png, grids/D_R.png, "
              "grids/D_NR.png, grids/D_RAND.png, grids/D_DET.png (20 images each, class names under each; "
              "'true -> new' for the relabelled sets).",
              ""]
    return "\n".join(lines)


def curve_summary(curve: list[float]) -> tuple[float, int, float]:
    """A learner's per-epoch real-test curve as (peak, the peak's epoch counted from 1, final)."""
    peak = max(curve)
    return peak, curve.index(peak) + 1, curve[-1]


_MAP_NAMES = ("MAP_AXES", "MEASURES", "spearman", "teaching_table", "measures_table", "map_table")


def __getattr__(name: str) -> Any:
    """The generalisation map's tables, where they were: they live in ``advfeat.replicate.map_report``."""
    if name in _MAP_NAMES:
        from .replicate import map_report

        return getattr(map_report, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
