"""The one exception hierarchy of tda-graph.

Every error a user can cause is raised as a subclass of :class:`TdaError`, with a
message that names the problem and, where there is one, the fix.
"""

from __future__ import annotations

__all__ = [
    "TdaError",
    "RoiError",
    "SpecError",
    "IncompatibleInputError",
    "GraphError",
    "CycleError",
    "SettingsError",
    "OperatorError",
    "RequestCancelled",
]


class TdaError(Exception):
    """Base class of every exception raised by tda-graph on purpose."""


class RoiError(TdaError, ValueError):
    """A region of interest is malformed, empty, negative or outside the array."""


class SpecError(TdaError, ValueError):
    """An array spec is invalid (bad axes string, shape, dtype or channel names)."""


class IncompatibleInputError(SpecError):
    """An output was connected to an input that cannot accept it (names both ends)."""


class GraphError(TdaError):
    """A graph operation is invalid: unknown node, missing input, node of another graph."""


class CycleError(GraphError):
    """Connecting these nodes would create a cycle."""


class SettingsError(TdaError, ValueError):
    """An operator setting has an invalid value."""


class OperatorError(TdaError):
    """An operator's compute raised; the original exception is chained as ``__cause__``.

    Attributes
    ----------
    operator : str
        Label of the operator that failed.
    roi : Roi
        The output region it was computing.
    """

    def __init__(self, message: str, *, operator: str, roi: object) -> None:
        super().__init__(message)
        self.operator = operator
        self.roi = roi


class RequestCancelled(TdaError):
    """The request was cancelled before it finished."""
