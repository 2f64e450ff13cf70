"""advfeat: adversarial examples are features.

Attacks, evaluation, robust training and the robust / non-robust dataset constructions of
Ilyas et al., "Adversarial Examples Are Not Bugs, They Are Features" (NeurIPS 2019), for any PyTorch
model and data loader. See README.md and docs/.
"""

import sys as _sys

from . import (
    _floor,  # noqa: F401 (first: an older torch is refused before anything uses it)
    adapters,
    allocator,
    construct,
    data,
    engine,
    figures,
    guard,
    machine,
    methods,
    models,
    stats,
    steps,
    train,
)
from ._lock import InUseError
from ._version import __version__
from .attacks import (
    APGD,
    EOT,
    FAB,
    FGSM,
    L2PGD,
    PGD,
    Attack,
    AutoAttack,
    FixedRandomness,
    GradientAttack,
    LinfPGD,
    Outcome,
    Restarts,
    Square,
    WorstOf,
    cross_entropy,
    cw_margin,
    dlr,
    dlr_targeted,
    frozen_model,
)
from .audit import AuditReport, audit
from .construct import ConstructedDataset, controls, nonrobustify, robustify
from .evaluate import Comparison, EvalResult, RobustnessCurve, compare, evaluate, robustness_curve
from .methods import FGSMRS, MART, TRADES, FreeTraining, PGDTraining, StandardTraining, TrainingMethod
from .models import Normalize
from .threat import Box, L2Ball, LinfBall, ThreatModel
from .train import AdversarialTrainer, adversarial_train
from .transfer import transfer_rates

# ``advfeat.controls`` and ``advfeat.store`` stay importable under those names
_sys.modules[f"{__name__}.controls"] = controls
_sys.modules[f"{__name__}.store"] = construct.store

__all__ = [
    "Attack", "GradientAttack", "PGD", "L2PGD", "LinfPGD", "FGSM", "APGD", "FAB", "Square", "AutoAttack", "Restarts",
    "WorstOf", "EOT", "FixedRandomness",
    "Outcome",
    "cross_entropy", "cw_margin", "dlr", "dlr_targeted", "frozen_model",
    "ThreatModel", "L2Ball", "LinfBall", "Box",
    "evaluate", "EvalResult", "compare", "Comparison", "robustness_curve", "RobustnessCurve", "audit", "AuditReport",
    "Normalize", "AdversarialTrainer", "adversarial_train",
    "TrainingMethod", "StandardTraining", "PGDTraining", "FGSMRS", "FreeTraining", "TRADES", "MART",
    "robustify", "nonrobustify", "ConstructedDataset", "transfer_rates", "InUseError",
    "adapters", "allocator", "construct", "controls", "cost", "data", "engine", "figures", "guard", "machine",
    "methods", "models", "tally",
    "stats", "steps", "train",
    "__version__",
]
