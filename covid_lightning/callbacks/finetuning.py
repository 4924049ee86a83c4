"""Staged unfreezing: the backbone frozen (BN in inference mode) until an epoch, then trained at a lower LR."""

from __future__ import annotations

import logging

import lightning as L
from lightning.pytorch.callbacks import BaseFinetuning
from torch.optim import Optimizer

log = logging.getLogger(__name__)


class StagedUnfreeze(BaseFinetuning):
    """Train the head first, then the whole backbone from ``unfreeze_at_epoch`` on (frozen BN in eval, as in Keras).

    Args:
        unfreeze_at_epoch: first epoch (0-based) in which the backbone trains.
        backbone_lr_factor: backbone LR as a fraction of the head's current LR.
        initial_regime: the regime before unfreezing (``head`` = whole backbone frozen).
    """

    def __init__(self, unfreeze_at_epoch: int = 5, backbone_lr_factor: float = 0.1, initial_regime: str = "head"):
        super().__init__()
        self.unfreeze_at_epoch = unfreeze_at_epoch
        self.backbone_lr_factor = backbone_lr_factor
        self.initial_regime = initial_regime

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        pl_module.net.set_trainable(self.initial_regime)

    def finetune_function(self, pl_module: L.LightningModule, current_epoch: int, optimizer: Optimizer) -> None:
        if current_epoch == self.unfreeze_at_epoch:
            lr = optimizer.param_groups[0]["lr"] * self.backbone_lr_factor
            self.unfreeze_and_add_param_group(pl_module.net.backbone, optimizer, lr=lr, train_bn=True)
            pl_module.net.trainable = "all"
            pl_module.train()  # BN layers that just became trainable leave inference mode
            log.info("Epoch %d: backbone unfrozen at lr %.2e.", current_epoch, lr)
