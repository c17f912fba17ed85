"""The operator library of tda-graph.

Kernels (``operators.kernels``) are plain functions on arrays and import
nothing of the engine; the operator classes here wrap them and import only
the engine core (``tda_graph``).
"""

from .channels import ChannelSelector
from .classifier import ClassifierNotReady, PixelClassifier, Segmentation, Uncertainty
from .enhancer import Enhancer, EnhancerModel, ModelError, load_enhancer_model
from .features import DEFAULT_SELECTION, FeatureFilters, normalize_selection
from .file_sources import Hdf5Source, SourceError, TiffSource, ZarrSource, open_image
from .filters import GaussianSmoothing, MeanFilter, Scale
from .labels import LabelClass, LabelError, LabelStore
from .sources import ArraySource

__all__ = [
    "ArraySource",
    "ChannelSelector",
    "ClassifierNotReady",
    "DEFAULT_SELECTION",
    "Enhancer",
    "EnhancerModel",
    "FeatureFilters",
    "GaussianSmoothing",
    "Hdf5Source",
    "LabelClass",
    "LabelError",
    "LabelStore",
    "MeanFilter",
    "ModelError",
    "PixelClassifier",
    "Scale",
    "Segmentation",
    "SourceError",
    "TiffSource",
    "Uncertainty",
    "ZarrSource",
    "load_enhancer_model",
    "normalize_selection",
    "open_image",
]
