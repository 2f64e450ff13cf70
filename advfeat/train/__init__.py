"""Robust training: the trainer. How a batch becomes a loss is a method object (``advfeat.methods``).

``af.adversarial_train(model, loader, method=af.TRADES(af.L2PGD(0.5, steps=7), beta=6))``. The package's
rooms: ``trainer`` (the loop: devices, mixed precision, DDP, the optimiser and its schedule, progress and bad-input
checks; it names no method), ``checkpoint`` (save, verified read, RNG state, ``.prev``) and ``callbacks`` (the
method's guard, the per-epoch evaluation, the history file, and the hooks your own callbacks use). The strings
``"standard"``, ``"pgd"``, ``"fgsm-rs"``, ``"free"``, ``"trades"`` and ``"mart"`` are shorthands for each method's
defaults (``advfeat.methods.from_name``, with ``attack=``, and ``beta``, ``replays``, ``guard`` where they apply).

Examples:
    Seconds on a CPU:

    >>> import torch, advfeat as af
    >>> from torch.utils.data import DataLoader
    >>> data = af.data.planted(512, 256, seed=0)
    >>> model = af.models.PlantedNet()
    >>> history = af.adversarial_train(
    ...     model, DataLoader(data.train, batch_size=128, shuffle=True), method=af.PGDTraining(af.L2PGD(0.5, steps=3)),
    ...     epochs=2, lr=0.05, progress=False, eval_loader=DataLoader(data.test, batch_size=256))
    >>> [sorted(h) for h in history][0]  # doctest: +NORMALIZE_WHITESPACE
    ['clean_accuracy', 'epoch', 'lr', 'robust_accuracy', 'seconds', 'train_accuracy', 'train_loss']

Choices (documented, switchable):

* BatchNorm during the attack: eval mode (``attack_eval_mode=True``), so that crafting an example does not
  depend on, or change, batch statistics; ``False`` runs the attack in train mode (running statistics are
  still restored afterwards by ``advfeat.frozen_model``).
* Optimiser: SGD, momentum 0.9, weight decay 5e-4 at ``lr``, with a one-cycle schedule stepped per batch
  (``schedule="onecycle"``), or ``"piecewise"`` (x0.1 at 50% and 75% of training) or ``"constant"``;
  or pass your own ``optimizer`` and ``scheduler`` (stepped once per optimiser step).
* Checkpoints (``checkpoint=path``) are written atomically at the end of every epoch and hold the model,
  optimiser, scheduler, grad scaler, epoch, RNG states and history; their fingerprint holds the method's repr.
  ``resume=True`` continues from it; a crash costs at most the epoch in progress, and the resumed run ends with
  the same weights as an uninterrupted one under deterministic settings.
* A method's guard (``advfeat.TrainingMethod.guard_attack``, on for FGSM-RS): after every epoch the guard
  attack's accuracy on a held batch (the first of ``eval_loader``, else of ``loader``); training ends with the
  weights of the best epoch (among the epochs this process runs).
"""

from . import callbacks, checkpoint
from .callbacks import Callback, EpochEvaluation, Guard, HistoryFile
from .checkpoint import read_checkpoint
from .trainer import METHODS, AdversarialTrainer, adversarial_train

__all__ = ["AdversarialTrainer", "adversarial_train", "METHODS", "Callback", "Guard", "EpochEvaluation",
           "HistoryFile", "read_checkpoint", "callbacks", "checkpoint"]
