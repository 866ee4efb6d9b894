"""Losses of the VLMo objectives."""
from .contrastive import (ContrastiveLoss, ContrastiveStats, contrastive_loss,
                          contrastive_loss_reference)

__all__ = ["ContrastiveLoss", "ContrastiveStats", "contrastive_loss", "contrastive_loss_reference"]
