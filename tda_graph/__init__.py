"""tda-graph: a lazy, block-cached operator graph for trainable domain adaptation.

The core imports nothing of ``operators`` and nothing heavy (no torch, napari
or dask). See ``docs/engine.md`` for the specification this package follows.
"""

from .errors import (
    CycleError,
    GraphError,
    IncompatibleInputError,
    OperatorError,
    RequestCancelled,
    RoiError,
    SettingsError,
    SpecError,
    TdaError,
)
from .graph import Graph, RequestFuture
from .listeners import DirtyEvent, Subscription
from .operator import InputSlot, NoSettings, Operator, PrepareContext, Window
from .planning import Plan, Topology, plan
from .roi import Roi, bounding_roi, merge_rois
from .spec import ArraySpec

__version__ = "0.1.0"

__all__ = [
    "ArraySpec",
    "CycleError",
    "DirtyEvent",
    "Graph",
    "GraphError",
    "IncompatibleInputError",
    "InputSlot",
    "NoSettings",
    "Operator",
    "OperatorError",
    "Plan",
    "PrepareContext",
    "RequestCancelled",
    "RequestFuture",
    "Roi",
    "RoiError",
    "SettingsError",
    "SpecError",
    "Subscription",
    "TdaError",
    "Topology",
    "Window",
    "bounding_roi",
    "merge_rois",
    "plan",
]
