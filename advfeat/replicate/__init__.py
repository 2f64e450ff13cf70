"""The paper's six experiments end to end, with a same-size control, cached stage by stage.

``advfeat replicate`` (or ``python -m advfeat replicate``) runs ``replicate``:

1. train a standard model and an adversarially trained (L2 PGD) model on D;
2. build D_R = robustify(robust), D_NR = robustify(standard), D_rand and D_det = nonrobustify(standard)
   from the first ``n_construct`` training images (all of them at ``scale="full"``); with
   ``Settings.nonrobust_source_epochs``, D_rand and D_det attack a standard model of that training length instead
   (stage ``source``; the step rule is ``Settings.nonrobust_kwargs()``);
3. train a fresh standard model on each, and on the same number of real images (the control);
4. evaluate every model's clean accuracy on the real test set and its accuracy under L2 PGD.

Every stage is cached in ``out``: models (``models/*.pt``), datasets (``datasets/*``, resumable inside),
per-stage results (``stages/*.json``). A rerun skips finished stages; a crash costs at most the stage in
progress (trainers checkpoint every epoch and constructors every shard). Writes ``report.md``,
``results.json`` and PNG grids of D, D_R, D_NR and D_det samples with their labels.
"""

from .run import CONSTRUCTED, replicate
from .settings import SCALES, Settings, load_data, make_model, settings_for, settings_record
from .stages import Run, Stage, cached_stage

__all__ = ["replicate", "Settings", "SCALES", "settings_for", "load_data", "make_model", "settings_record",
           "cached_stage", "Stage", "Run", "CONSTRUCTED"]
