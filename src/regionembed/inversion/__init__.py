"""The MaskInversion solver (plain torch): naive and gradient-decomposition strategies."""

from .solver import InversionResult, MaskInversion, check_masks, uses_legrad_strategies
from .strategies import STRATEGIES, estimate_costs

__all__ = ["STRATEGIES", "InversionResult", "MaskInversion", "check_masks", "estimate_costs", "uses_legrad_strategies"]
