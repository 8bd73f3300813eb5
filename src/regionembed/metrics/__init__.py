"""Shared evaluators (torchmetrics contract, no Lightning): a stateless function and a ``Metric`` class per metric.

Every ``Metric`` keeps integer counts (``dist_reduce_fx="sum"``) or per-sample values (``"cat"``), so its result
over several processes equals the single-process result on the same data. Dict outputs are flattened by
``MetricCollection``; these keys are the dashboard contract, keep them stable:

=========================  =================================================================================
metric                      ``compute()`` keys (fractions in [0, 1] unless noted)
=========================  =================================================================================
``RegionAccuracy``          ``top{k}``, ``mean_class_top{k}`` (default k = 1, 5)
``ReferringAccuracy``       ``ref_acc``, ``ref_miou``
``MapMaskAgreement``        ``map_miou``, ``map_dice``, ``pointing_game``, ``energy_pointing_game``
``BoxLocalization``         ``gt_known_loc``, ``top{k}_loc`` (default k = 1, 5)
``MaxBoxAccV2``             ``maxboxacc_v2``, ``maxboxacc@{100 * delta}`` (default 30, 50, 70)
``RecallAtK``               ``R@{k}`` (default k = 1, 5, 10, 50)
``DeletionInsertionAUC``    a scalar: mean AUC (score units)
``ContrastiveDeletionGap``  ``contrastive_gap``, ``target_drop``, ``contrast_drop`` (score units)
=========================  =================================================================================

``ExplainerLocalization`` bundles the localization and faithfulness evaluators of one explainer (boxes from maps,
the "not present" rule, deletion/insertion curves of a class-score function); its keys are those of the metrics it
holds plus ``box_iou``, ``not_present``, ``ms_per_map``, ``deletion_auc``, ``insertion_auc``.

Functional counterparts live in :mod:`regionembed.metrics.functional` (``region_accuracy``, ``referring_accuracy``,
``map_mask_agreement``, ``box_localization``, ``max_box_acc``, ``recall_at_k``, ``deletion_insertion_curves``,
``auc``, ``contrastive_deletion_gap`` and their per-sample building blocks).
"""

from . import functional
from .classification import IterationCurve, RegionAccuracy
from .explanation import ExplainerLocalization, LocalizationQueries, class_score_curves, localization_queries
from .faithfulness import ContrastiveDeletionGap, DeletionInsertionAUC
from .functional import auc, contrastive_deletion_gap, deletion_insertion_curves
from .localization import BoxLocalization, MapMaskAgreement, MaxBoxAccV2, ReferringAccuracy
from .retrieval import RecallAtK

__all__ = [
    "BoxLocalization",
    "ContrastiveDeletionGap",
    "DeletionInsertionAUC",
    "ExplainerLocalization",
    "IterationCurve",
    "LocalizationQueries",
    "MapMaskAgreement",
    "MaxBoxAccV2",
    "RecallAtK",
    "ReferringAccuracy",
    "RegionAccuracy",
    "auc",
    "class_score_curves",
    "contrastive_deletion_gap",
    "deletion_insertion_curves",
    "functional",
    "localization_queries",
]
