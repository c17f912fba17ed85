"""The trainable-domain-adaptation workflow: image → features → forest → (channel → enhancer).

A thin object over one :class:`~tda_graph.Graph`; it computes nothing itself.
Every output is an operator of the graph, reachable by name, so a program can
``request`` any region of any output, paint labels, and subscribe to dirty
regions exactly as with hand-built graphs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from operators import (
    ArraySource,
    ChannelSelector,
    Enhancer,
    FeatureFilters,
    LabelStore,
    PixelClassifier,
    Segmentation,
    Uncertainty,
)
from tda_graph import Graph, Operator, Roi, SettingsError
from tda_graph.listeners import DirtyEvent, Subscription


def _resolve_model(model: Any) -> Any:
    """A bundled enhancer name → its package folder; anything else unchanged."""
    if isinstance(model, str) and "/" not in model and "\\" not in model and not model.endswith((".zip", ".yaml")):
        try:
            from tda_graph.models import bundled_enhancers
        except ImportError:  # no bundled models in this installation
            return model
        found = bundled_enhancers()
        if model in found:
            return str(found[model])
    return model


OUTPUTS = ("raw", "features", "labels", "probabilities", "segmentation", "uncertainty", "enhancer_input", "enhanced")


class TrainableDomainAdaptation:
    """Pixel classification with an optional enhancer network on one chosen class.

    Parameters
    ----------
    image : ndarray or Operator
        The raw image (wrapped in an :class:`~operators.ArraySource`) or any
        source operator (e.g. a lazy HDF5/zarr source).
    axes : str, optional
        Axes of ``image`` when it is an array (default ``"yx"``/``"zyx"`` by ndim).
    selection : mapping or ``"default"``
        Feature selection, ``{feature_id: [sigmas]}`` (see :class:`~operators.FeatureFilters`).
    in_2d : bool
        Compute features per z slice.
    class_names : sequence of str
        Label classes; label value ``k`` is ``class_names[k-1]``.
    n_trees, seed, max_depth :
        Forest settings.
    channel : int
        Label value whose probability feeds the enhancer (``1..K``).
    enhancer : Operator factory, optional
        ``enhancer(graph, enhancer_input) -> Operator``; see :meth:`set_enhancer`.
    workers : int, optional
        Engine worker threads (default: CPU count).
    """

    def __init__(
        self,
        image: np.ndarray | Operator,
        *,
        axes: str | None = None,
        selection: Mapping[str, Sequence[float]] | str = "default",
        in_2d: bool = False,
        class_names: Sequence[str] = ("background", "foreground"),
        n_trees: int = 100,
        max_depth: int | None = None,
        seed: int = 0,
        channel: int | None = None,
        workers: int | None = None,
        graph: Graph | None = None,
    ) -> None:
        self.graph = graph if graph is not None else Graph(workers=workers)
        g = self.graph
        if isinstance(image, Operator):
            self.raw = image if image._graph is g else g.add(image)
        else:
            arr = np.asarray(image)
            if axes is None:
                axes = {2: "yx", 3: "zyx"}.get(arr.ndim)
                if axes is None:
                    raise SettingsError(
                        f"cannot guess the axes of a {arr.ndim}-D image; pass axes= (e.g. 'zyxc' or 'yxc')"
                    )
            self.raw = g.add(ArraySource(arr, axes=axes, name="raw"))
        spec = self.raw.spec
        self.features = g.add(FeatureFilters(selection, in_2d=in_2d, name="features"), image=self.raw)
        spatial_shape = tuple(n for a, n in zip(spec.axes, spec.shape) if a in "tzyx")
        self.labels = g.add(LabelStore(spatial_shape, spec.spatial_axes, tuple(class_names), name="labels"))
        self.probabilities = g.add(
            PixelClassifier(
                class_names=tuple(class_names), n_trees=n_trees, max_depth=max_depth, seed=seed, name="probabilities"
            ),
            features=self.features,
            labels=self.labels,
        )
        self.segmentation = g.add(Segmentation(name="segmentation"), probabilities=self.probabilities)
        self.uncertainty = g.add(Uncertainty(name="uncertainty"), probabilities=self.probabilities)
        self._channel = len(class_names) if channel is None else int(channel)
        self._check_channel(self._channel)
        # the forest's probability of the chosen class: what the enhancer sees
        self.enhancer_input: Operator | None = g.add(
            ChannelSelector(channels=(self._channel - 1,), name="enhancer_input"), image=self.probabilities
        )
        self.enhanced: Operator | None = None

    # -- outputs --------------------------------------------------------------------------------
    def output(self, name: str) -> Operator:
        """The operator behind output ``name`` (one of :data:`OUTPUTS`)."""
        if name not in OUTPUTS:
            raise SettingsError(f"unknown output {name!r}; choose one of {', '.join(OUTPUTS)}")
        op = getattr(self, name)
        if op is None:
            raise SettingsError(f"output {name!r} needs an enhancer; call set_enhancer(...) first")
        return op

    def request(self, output: str | Operator, roi: Roi | Sequence[slice] | None = None) -> np.ndarray:
        """Compute ``output`` over ``roi`` (default: all of it) and return it as a numpy array."""
        op = self.output(output) if isinstance(output, str) else output
        return self.graph.request(op, roi)

    # -- labels -------------------------------------------------------------------------------------
    def paint(self, roi: Roi, mask: np.ndarray | bool, label: int) -> None:
        """Paint ``label`` where ``mask`` is true inside ``roi`` (one stroke)."""
        self.labels.paint(roi, mask, label)

    def erase(self, roi: Roi, mask: np.ndarray | None = None) -> None:
        """Erase labels where ``mask`` is true inside ``roi``."""
        self.labels.erase(roi, mask)

    def strokes(self) -> Any:
        """Context manager: many strokes inside it propagate as one dirty event."""
        return self.graph.batch()

    # -- settings ------------------------------------------------------------------------------------
    @property
    def channel(self) -> int:
        """Label value whose probability feeds the enhancer."""
        return self._channel

    def _check_channel(self, channel: int) -> None:
        n = len(self.probabilities.settings.class_names)
        if not 1 <= channel <= n:
            raise SettingsError(f"channel must be a label value between 1 and {n}, got {channel}")

    def set_channel(self, channel: int) -> None:
        """Choose the label value whose probability feeds the enhancer (dirties enhancer input and output)."""
        self._check_channel(int(channel))
        self._channel = int(channel)
        self.graph.configure(self.enhancer_input, channels=(self._channel - 1,))

    def set_enhancer(self, model: Any, *, allow_code: bool = False, **settings: Any) -> Operator:
        """Apply an enhancer network to the chosen class's probability.

        Parameters
        ----------
        model : str, path or EnhancerModel
            A bundled enhancer name (see ``tda models``), a model package folder,
            a ``bioimageio.yaml`` or a ``.zip``.
        allow_code : bool
            Allow a package whose only usable weights run Python code shipped in
            it (``pytorch_state_dict``); see :func:`operators.enhancer.load_enhancer_model`.
            Without it such a package raises :class:`~tda_graph.SettingsError`.
        **settings
            Passed to :class:`~operators.Enhancer` (``device``, ``tile``, ``margin``, ...).
        """
        model = _resolve_model(model)
        op = Enhancer(model=model, name="enhanced", allow_code=allow_code, **settings)  # fails before any change
        if self.enhanced is not None:
            self.graph.remove(self.enhanced)
            self.enhanced = None
        self.enhanced = self.graph.add(op, image=self.enhancer_input)
        return self.enhanced

    def remove_enhancer(self) -> None:
        """Drop the enhancer network (the ``enhanced`` output is gone until :meth:`set_enhancer`)."""
        if self.enhanced is not None:
            self.graph.remove(self.enhanced)
            self.enhanced = None

    def set_features(self, selection: Mapping[str, Sequence[float]] | str, in_2d: bool | None = None) -> None:
        """Change the feature selection (dirties features and everything below; the forest retrains).

        Safe to call while other threads request outputs: a forest training in
        progress gathers its rows again with the new features.
        """
        changes: dict[str, Any] = {"selection": selection}
        if in_2d is not None:
            changes["in_2d"] = in_2d
        self.graph.configure(self.features, **changes)

    def freeze(self) -> None:
        """Live update off: predictions keep their cached state until :meth:`unfreeze`."""
        self.graph.freeze(*self._predictions())

    def unfreeze(self) -> None:
        """Live update on again; what changed meanwhile is recomputed on the next request."""
        self.graph.unfreeze(*self._predictions())

    def _predictions(self) -> list[Operator]:
        return [op for op in (self.probabilities, self.enhancer_input, self.enhanced) if op is not None]

    def subscribe(self, output: str, callback: Callable[[DirtyEvent], Any]) -> Subscription:
        """Call ``callback`` with the dirty region of ``output`` whenever it changes (held weakly)."""
        return self.graph.subscribe(self.output(output), callback)

    def close(self) -> None:
        """Stop the worker threads."""
        self.graph.close()

    def __enter__(self) -> TrainableDomainAdaptation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
