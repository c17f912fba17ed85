"""The operator library of tda-graph.

Kernels (``operators.kernels``) are plain functions on arrays and import
nothing of the engine; the operator classes here wrap them and import only
the engine core (``tda_graph``).
"""

from .filters import GaussianSmoothing, MeanFilter, Scale
from .sources import ArraySource

__all__ = ["ArraySource", "GaussianSmoothing", "MeanFilter", "Scale"]
