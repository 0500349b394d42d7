"""The reference network (the ground truth of every fast path), its loss and its metrics."""
from .gicn import GICN
from .gpp import GPP, pool_kernels
from .loss import GicnLoss
from .metrics import SMALL_REGION_PIXELS, dice_by_size, dice_score
from .network import DEFAULT_MEAN, DEFAULT_STD, ResNet50GicnGpp
from .registry import create_model, list_models, register_model

__all__ = ["GICN", "GPP", "pool_kernels", "GicnLoss", "dice_score", "dice_by_size", "SMALL_REGION_PIXELS",
           "ResNet50GicnGpp", "DEFAULT_MEAN", "DEFAULT_STD", "create_model", "list_models", "register_model"]
