"""The dataset constructions: the paper's ``robustify`` (D_R / D_NR) and ``nonrobustify`` (D_rand / D_det), and
the critics' controls (``advfeat.construct.controls``).

Both paper constructions run the one engine (``advfeat.engine.optimize``) over the source data in order, shard by shard:

* ``robustify`` minimises ``||g(z) - g(x)||_2 / ||g(x)||_2`` over ``z`` in the box, from another training
  image (``init="other"``, the paper) or from uniform noise (``init="noise"``), by steps of a step rule
  (default: normalised-gradient L2 steps cosine-decayed from a fraction of the distance to travel; the paper:
  fixed normalised-gradient L2 steps);
  ``g`` is the model's penultimate representation. The label stays ``y``. Through a robust model this is
  D_R, through a standard one D_NR. Per sample it records ``rel_distance`` (the final relative distance) and
  ``start_index`` (the start image, -1 for noise).
* ``nonrobustify`` runs targeted L2 PGD (``advfeat.L2PGD``; default 50 constant steps of eps/4) towards
  ``t = (y + 1) mod C`` (``"det"``) or ``t`` uniform over the other classes (``"rand"``) and relabels the image
  ``t``. Per sample it records
  ``target_reached`` (the model now predicts ``t``), ``perturbation_norm`` and ``original_label``.

Randomness depends only on ``(seed, i)`` for sample ``i``: the start image and the random target are drawn for
the whole dataset at once from ``seed``, and noise starts from a per-sample generator; never on the batch or
shard size or the number of processes.

With ``out=path`` every finished shard is written atomically (see ``advfeat.construct.store``); calling again with the
same settings resumes from the first missing shard; under ``torch.distributed`` rank ``r`` builds shards
``r, r + W, r + 2W, ...`` of one directory. The result is bitwise identical to one uninterrupted process on CPU
(same thread count).

Examples:
    >>> import torch, advfeat as af
    >>> data = af.data.planted(64, 16, seed=0)
    >>> model = af.models.PlantedNet()
    >>> d_det = af.nonrobustify(model, data.train, mode="det", eps=2.0, steps=5, progress=False)
    >>> x, t = d_det[0]
    >>> bool(t == (data.train[0][1] + 1) % 10), sorted(d_det.meta)
    (True, ['original_label', 'perturbation_norm', 'target_reached'])
    >>> d_r = af.robustify(model, data.train, steps=5, progress=False)
    >>> float(d_r.meta["rel_distance"].max()) < 10
    True

The package, in the order a build walks through it: ``spec`` (one construction validated once: the source, the
model, the device, the classes, the targets, the config and manifest), ``paper`` and ``controls`` (what one batch
becomes), ``shards`` (the sharded, resumable, distributed run), ``store`` (``ConstructedDataset`` and its folder).
"""

from . import controls, store
from .paper import LOW_TARGETS, NONROBUSTIFY_RULE, ROBUSTIFY_RULE, LowTargetsWarning, nonrobustify, robustify
from .store import ConstructedDataset

__all__ = ["robustify", "nonrobustify", "ConstructedDataset", "ROBUSTIFY_RULE", "NONROBUSTIFY_RULE", "LOW_TARGETS",
           "LowTargetsWarning", "controls", "store"]
