"""The MaskInversion solver (plain torch): naive and gradient-decomposition strategies."""

from .solver import InversionResult, MaskInversion, MaskInversionConfig, check_masks
from .strategies import STRATEGIES, estimate_costs

__all__ = ["STRATEGIES", "InversionResult", "MaskInversion", "MaskInversionConfig", "check_masks", "estimate_costs"]
