"""Shallow2deep: train a small "enhancer" U-Net on random-forest predictions.

Recipe (Matskevych et al. 2022, "From Shallow to Deep"): many small random
forests are trained on random patches with random sparse labels; each forest's
foreground probability on a larger crop becomes one training input of a U-Net
whose target is the dense ground truth. The trained network turns the noisy
probability map of *any* new forest (trained interactively on a new domain)
into a clean foreground map. With ``ndim=3`` (``--ndim 3``) the forests work
on cubes of 3D volumes and the network is a 3D U-Net.

Functions
---------
:func:`make_forest_predictions`
    (probability, ground truth) pairs from many small forests.
:func:`build_unet` / :func:`train_unet`
    A small 2D or 3D U-Net and its seeded training loop (flip/rot90 + noise
    augmentation, BCE + Dice loss, optional checkpoint).
:func:`export_enhancer`
    TorchScript weights plus a bioimage.io format-0.5 model package.
:func:`train_enhancer`
    All of the above; :func:`add_train_enhancer_parser` registers it as the
    ``tda train-enhancer`` sub-command.

torch and bioimageio are imported inside the functions that need them, so
importing this module (and :mod:`tda_graph`) stays light.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tda_graph.errors import SettingsError, TdaError
from tda_graph.roi import Roi

__all__ = [
    "SHALLOW2DEEP_FEATURES",
    "ForestPair",
    "TrainResult",
    "make_forest_predictions",
    "forest_probability",
    "build_unet",
    "train_unet",
    "export_enhancer",
    "train_enhancer",
    "measure_halo",
    "check_package",
    "read_stack",
    "add_train_enhancer_parser",
    "cmd_train_enhancer",
    "main",
]

#: The ilastik features used by the shallow2deep forests: every feature at σ 0.7, 1.6, 3.5 and 5.0
#: (32 channels in 2D).
SHALLOW2DEEP_FEATURES: tuple[tuple[str, float], ...] = tuple(
    (f, s)
    for s in (0.7, 1.6, 3.5, 5.0)
    for f in (
        "GaussianSmoothing",
        "LaplacianOfGaussian",
        "GaussianGradientMagnitude",
        "DifferenceOfGaussians",
        "StructureTensorEigenvalues",
        "HessianOfGaussianEigenvalues",
    )
)

_CITATION = {
    "text": (
        "Matskevych, A., Wolny, A., Pape, C., Kreshuk, A. (2022). From Shallow to Deep: Exploiting Feature-Based "
        "Classifiers for Domain Adaptation in Semantic Segmentation. Frontiers in Computer Science 4:805166."
    ),
    "doi": "10.3389/fcomp.2022.805166",
}


@dataclass(frozen=True)
class ForestPair:
    """One training example: a forest's foreground probability and the dense ground truth (same 2D or 3D shape)."""

    probability: np.ndarray  # float32 in [0, 1]
    target: np.ndarray  # float32, 0 or 1
    source: tuple[int, int, int, int]  # (image index, slice, y0, x0) of a 2D crop; (image index, z0, y0, x0) in 3D
    n_labels: int  # labelled pixels the forest was trained on


@dataclass
class TrainResult:
    """What :func:`train_enhancer` measured."""

    package: Path
    n_pairs: int
    iterations: int
    forest_seconds: float
    train_seconds: float
    final_loss: float
    n_parameters: int
    package_bytes: int
    test_status: str | None = None
    losses: list[float] = field(default_factory=list)


# --------------------------------------------------------------------------- forests
def _as_slices(stack: np.ndarray) -> np.ndarray:
    a = np.asarray(stack)
    if a.ndim == 2:
        return a[np.newaxis]
    if a.ndim != 3:
        raise ValueError(f"expected a 2D image or a (z, y, x) stack, got shape {a.shape}")
    return a


def _as_volume(volume: np.ndarray) -> np.ndarray:
    a = np.asarray(volume)
    if a.ndim != 3:
        raise ValueError(f"3D training needs (z, y, x) volumes, got shape {a.shape}")
    return a


def _sparse_labels(
    target: np.ndarray,
    window: tuple[slice, ...],
    rng: np.random.Generator,
    avoid: np.ndarray | None = None,
    inside: bool = False,
) -> np.ndarray:
    """Random sparse labels (0 = unlabelled, 1 = background, 2 = foreground) inside ``window``.

    Half of the forests get balanced random points (20-300 per class), the other
    half simulated brush strokes, so the forests range from poor to good.
    ``avoid`` (same shape as ``target``): background labels stay off these pixels,
    or, with ``inside``, on them only (where the window has such background).
    """
    from .strokes import simulate_strokes

    labels = np.zeros(target.shape, np.uint8)
    sub = target[window].astype(bool)
    background = ~sub
    if avoid is not None:
        on_mask = avoid[window].astype(bool)
        kept = background & (on_mask if inside else ~on_mask)
        if kept.any():
            background = kept
    n = int(rng.integers(20, 301))
    if rng.random() < 0.5:
        for value, mask in ((1, background), (2, sub)):
            pts = np.flatnonzero(mask)
            pick = rng.choice(pts, size=min(n, len(pts)), replace=False)
            view = labels[window]
            view[np.unravel_index(pick, sub.shape)] = value
    else:
        strokes = simulate_strokes(
            {1: background, 2: sub},
            pixels_per_class=n,
            length=int(rng.integers(10, 40)),
            width=int(rng.integers(0, 2)),
            seed=int(rng.integers(2**31)),
        )
        view = labels[window]
        for s in strokes:
            view[s.roi.to_slices()][s.mask] = s.label
    return labels


def forest_probability(
    image: np.ndarray,
    labels: np.ndarray,
    *,
    n_trees: int = 15,
    seed: int = 0,
    features: Sequence[tuple[str, float]] = SHALLOW2DEEP_FEATURES,
    feature_image: np.ndarray | None = None,
) -> np.ndarray:
    """Train a random forest on sparse labels of a 2D image and predict its foreground probability.

    Parameters
    ----------
    image : ndarray, shape (y, x)
        Raw image.
    labels : ndarray, shape (y, x)
        0 = unlabelled, 1 = background, 2 = foreground.
    n_trees : int
        Number of trees.
    seed : int
        Forest seed.
    features : sequence of (feature id, sigma)
        ilastik features to compute (ignored when ``feature_image`` is given).
    feature_image : ndarray, optional
        Precomputed features ``(y, x, n_features)``.

    Returns
    -------
    ndarray, float32, shape (y, x)
        Probability of class 2 (foreground).
    """
    from operators.classifier import ClassifierSettings, train_forest
    from operators.kernels import features_cpu, forest_cpu

    if feature_image is None:
        feature_image = features_cpu.compute_features(np.asarray(image)[..., np.newaxis], list(features))
    mask = labels > 0
    X = feature_image[mask]
    y = labels[mask].astype(np.int64)
    if len(np.unique(y)) < 2:
        raise ValueError("labels must contain both background (1) and foreground (2)")
    forest = train_forest(X, y, ClassifierSettings(n_trees=n_trees, seed=seed, n_jobs=1))
    proba = forest_cpu.predict_proba_image(forest, feature_image)
    col = int(np.flatnonzero(np.asarray(forest.classes) == 2)[0])
    return np.clip(proba[..., col], 0.0, 1.0).astype(np.float32)


def _bin(a: np.ndarray, f: int) -> np.ndarray:
    """Mean of each ``f x f`` (2D) or ``f x f x f`` (3D) block of an array whose sides are multiples of ``f``."""
    if f == 1:
        return a.astype(np.float32)
    split = [n for side in a.shape for n in (side // f, f)]
    every_f = tuple(range(1, 2 * a.ndim, 2))
    return a.reshape(split).mean(axis=every_f, dtype=np.float64).astype(np.float32)


def _random_feature_subset(features: Sequence[tuple[str, float]], rng: np.random.Generator) -> list[tuple[str, float]]:
    """Keep each feature type and each scale with probability 0.6 (at least one of each)."""
    names = list(dict.fromkeys(f for f, _ in features))
    sigmas = list(dict.fromkeys(s for _, s in features))
    keep_n = [n for n in names if rng.random() < 0.6] or [names[int(rng.integers(len(names)))]]
    keep_s = [s for s in sigmas if rng.random() < 0.6] or [sigmas[int(rng.integers(len(sigmas)))]]
    chosen = [(f, s) for f, s in features if f in keep_n and s in keep_s]
    return chosen or [features[int(rng.integers(len(features)))]]


def make_forest_predictions(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    n_forests: int,
    *,
    patch: int = 256,
    crop: int | None = None,
    n_trees: int = 15,
    min_foreground: float = 0.005,
    seed: int = 0,
    features: Sequence[tuple[str, float]] = SHALLOW2DEEP_FEATURES,
    scales: Sequence[int] = (1,),
    vary_features: bool = False,
    ndim: int = 2,
    avoid: Sequence[np.ndarray] | None = None,
    avoid_share: float = 0.5,
    avoid_inside: float = 0.0,
    log: Callable[[str], None] | None = None,
) -> list[ForestPair]:
    """Train ``n_forests`` small forests on random sparse labels; return their predictions.

    For each forest: pick a random image, a random slice and a random crop
    (``crop`` pixels per side, clipped to the slice); inside a random
    ``patch``-sized window of that crop sample sparse labels from the ground
    truth (balanced random points or simulated strokes, 20-300 pixels per
    class); compute the ilastik ``features`` of the crop, train an
    ``n_trees`` forest and predict the foreground probability on the whole
    crop. With ``ndim=3`` the crop, the window, the labels (3D strokes) and
    the features are 3D cubes of a volume instead.

    Parameters
    ----------
    images, masks : sequence of ndarray
        Raw images and their binary ground truth: with ``ndim=2`` each 2D
        ``(y, x)`` or a stack ``(z, y, x)`` of independent 2D slices; with
        ``ndim=3`` each a ``(z, y, x)`` volume.
    n_forests : int
        Number of forests (= returned pairs).
    patch : int
        Side of the window the labels are drawn in.
    crop : int, optional
        Side of the predicted crop (default ``2 * patch``).
    n_trees : int
        Trees per forest.
    min_foreground : float
        Minimum foreground fraction of the label window (windows are resampled
        up to 20 times to find one).
    seed : int
        Everything (crop positions, labels, forests) is derived from it.
    features : sequence of (feature id, sigma)
        ilastik features.
    scales : sequence of int
        Integer downsampling factors; each forest picks one at random and sees its
        slice binned by it (raw: mean of each f x f block; ground truth: majority).
        Factors above 1 show the network thinner membranes and smaller objects, as
        in data of a coarser pixel size (3D: ``f x f x f`` blocks).
    vary_features : bool
        Each forest uses a random part of ``features``: every feature type and every
        scale is kept with probability 0.6 (at least one of each), as users pick
        different feature sets; their forests err in different ways.
    ndim : {2, 3}
        Train forests on 2D slices (for a 2D enhancer) or on 3D cubes (3D enhancer).
    avoid : sequence of ndarray, optional
        One binary mask per image (same shape): structures that users rarely paint as
        background although they are, e.g. membranes for a mitochondria enhancer.  In
        ``avoid_share`` of the forests the background labels stay off them, so those
        forests mistake such structures for foreground, as a user's forest does, and
        the network learns to remove them.
    avoid_share : float
        Share of the forests whose background labels avoid ``avoid``.
    avoid_inside : float
        Share of those forests whose background labels lie *on* ``avoid`` only, as
        when a user paints background on membranes alone: such a forest takes the
        cytoplasm for foreground.  0 (default): all of them stay off it.
    log : callable, optional
        Receives progress lines.

    Returns
    -------
    list of ForestPair
        ``probability`` float32 in [0, 1] and ``target`` float32 in {0, 1}.
    """
    from operators.kernels import features_cpu

    if len(images) != len(masks) or not images:
        raise ValueError("need the same, non-zero number of images and masks")
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim!r}")
    as_data = _as_slices if ndim == 2 else _as_volume
    stacks = [as_data(i) for i in images]
    gts = [as_data(m) for m in masks]
    for s, g in zip(stacks, gts):
        if s.shape != g.shape:
            raise ValueError(f"image and mask shapes differ: {s.shape} vs {g.shape}")
    avoids = None
    if avoid is not None:
        avoids = [as_data(a) for a in avoid]
        if len(avoids) != len(stacks) or any(a.shape != s.shape for a, s in zip(avoids, stacks)):
            raise ValueError("need one avoid mask per image, of the image's shape")
        if not 0.0 <= avoid_share <= 1.0:
            raise ValueError(f"avoid_share must be in [0, 1], got {avoid_share}")
        if not 0.0 <= avoid_inside <= 1.0:
            raise ValueError(f"avoid_inside must be in [0, 1], got {avoid_inside}")
    elif avoid_inside:
        raise ValueError("avoid_inside needs avoid masks: it picks where the background labels of those forests lie")
    crop = 2 * patch if crop is None else int(crop)
    scales = [int(f) for f in scales]
    if not scales or min(scales) < 1:
        raise ValueError(f"scales must be integer downsampling factors >= 1, got {scales}")
    rng = np.random.default_rng(seed)
    pairs: list[ForestPair] = []
    t0 = time.perf_counter()
    for k in range(int(n_forests)):
        f = scales[int(rng.integers(len(scales)))] if len(scales) > 1 else scales[0]
        for _attempt in range(20):
            i = int(rng.integers(len(stacks)))
            if ndim == 2:  # one slice of the stack (the random draws are those of the 2D-only version)
                z = int(rng.integers(stacks[i].shape[0]))
                image, truth = stacks[i][z], gts[i][z]
                shun = None if avoids is None else avoids[i][z]
            else:
                image, truth = stacks[i], gts[i]
                shun = None if avoids is None else avoids[i]
            sides = [n // f for n in image.shape]
            if min(sides) < 1:
                kind = "slices" if ndim == 2 else "volumes"
                raise ValueError(f"{kind} of shape {image.shape} are smaller than the scale factor {f}")
            crops = [min(crop, n) for n in sides]
            origin = [int(rng.integers(n - c + 1)) for n, c in zip(sides, crops)]
            patches = [min(patch, c) for c in crops]
            offset = [int(rng.integers(c - p + 1)) for c, p in zip(crops, patches)]
            region = tuple(slice(o * f, (o + c) * f) for o, c in zip(origin, crops))
            target = _bin(truth[region] > 0, f) >= 0.5
            window = tuple(slice(o, o + p) for o, p in zip(offset, patches))
            frac = float(target[window].mean())
            if min_foreground <= frac <= 1 - min_foreground:
                break
        else:
            raise ValueError("could not find a patch with both classes; check the masks")
        raw = image[region] if f == 1 else _bin(image[region], f)
        away = None
        inside = False
        if shun is not None and rng.random() < avoid_share:  # no draw without ``avoid``: same forests as before
            away = _bin(shun[region] > 0, f) > 0  # any pixel of a binned block: thin membranes stay
            inside = avoid_inside > 0 and rng.random() < avoid_inside  # no draw at 0: same forests as before
        labels = _sparse_labels(target, window, rng, away, inside)
        chosen = _random_feature_subset(features, rng) if vary_features else list(features)
        feats = features_cpu.compute_features(raw[..., np.newaxis], chosen)
        prob = forest_probability(raw, labels, n_trees=n_trees, seed=int(rng.integers(2**31)), feature_image=feats)
        source = (i, z, *origin) if ndim == 2 else (i, *origin)
        pairs.append(ForestPair(prob, target.astype(np.float32), source, int((labels > 0).sum())))
        if log is not None and ((k + 1) % 10 == 0 or k + 1 == n_forests):
            log(f"forests {k + 1}/{n_forests}  ({time.perf_counter() - t0:.1f} s)")
    return pairs


# --------------------------------------------------------------------------- network
def build_unet(depth: int = 3, width: int = 16, in_channels: int = 1, out_channels: int = 1, *, ndim: int = 2) -> Any:
    """A small 2D or 3D U-Net with a sigmoid output.

    Each level has two 3x3 (3D: 3x3x3) convolutions (same padding) with ReLU;
    the encoder halves the resolution ``depth`` times (max pooling) and doubles
    the channels; the decoder upsamples with 2x2 transposed convolutions and
    concatenates the skip connection. Input sizes must be multiples of
    ``2 ** depth``; the output has the input's size.

    Parameters
    ----------
    depth : int
        Number of down-sampling steps.
    width : int
        Channels of the first level.
    in_channels, out_channels : int
        Input and output channels.
    ndim : {2, 3}
        Spatial dimensions: input ``(b, c, y, x)`` or ``(b, c, z, y, x)``.

    Returns
    -------
    torch.nn.Module
    """
    import torch
    from torch import nn

    if depth < 1 or width < 1:
        raise SettingsError(f"--depth {depth} / --width {width}: both must be at least 1")
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim!r}")
    conv, pool, up_conv = (
        (nn.Conv2d, nn.MaxPool2d, nn.ConvTranspose2d) if ndim == 2 else (nn.Conv3d, nn.MaxPool3d, nn.ConvTranspose3d)
    )

    def block(cin: int, cout: int) -> nn.Module:
        return nn.Sequential(
            conv(cin, cout, 3, padding=1),
            nn.ReLU(inplace=True),
            conv(cout, cout, 3, padding=1),
            nn.ReLU(inplace=True),
        )

    class UNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            chans = [width * 2**i for i in range(depth + 1)]
            self.encoders = nn.ModuleList(
                [block(in_channels if i == 0 else chans[i - 1], chans[i]) for i in range(depth)]
            )
            self.pool = pool(2)
            self.bottom = block(chans[depth - 1], chans[depth])
            self.ups = nn.ModuleList([up_conv(chans[i + 1], chans[i], 2, stride=2) for i in reversed(range(depth))])
            self.decoders = nn.ModuleList([block(2 * chans[i], chans[i]) for i in reversed(range(depth))])
            self.head = conv(chans[0], out_channels, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            skips: list[torch.Tensor] = []
            for enc in self.encoders:
                x = enc(x)
                skips.append(x)
                x = self.pool(x)
            x = self.bottom(x)
            for i, (up, dec) in enumerate(zip(self.ups, self.decoders)):
                x = up(x)
                x = dec(torch.cat([x, skips[len(skips) - 1 - i]], dim=1))
            return torch.sigmoid(self.head(x))

    net = UNet()
    net.depth = depth  # type: ignore[assignment]
    net.ndim = ndim  # type: ignore[assignment]
    return net


def _torchscript_state(path: Path) -> dict[str, Any] | None:
    """The weights of a TorchScript file, or ``None`` if ``path`` is not one."""
    import torch

    try:
        return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    except Exception:
        return None


def load_initial_weights(model: Any, source: str | Path) -> None:
    """Load the weights of an earlier enhancer into ``model`` (to fine-tune it).

    Parameters
    ----------
    model : torch.nn.Module
        From :func:`build_unet`, with the depth, width and ``ndim`` of the source.
    source : path
        An enhancer package folder written by :func:`export_enhancer` (e.g. a
        bundled one, ``tda_graph/models/enhancers/mitochondria_em2d``), its
        TorchScript weights file, or a training checkpoint (``--checkpoint``).

    Raises
    ------
    SettingsError
        When the source is missing, unreadable, or holds another architecture.
    """
    import torch

    path = Path(source)
    if not path.exists():
        raise SettingsError(f"--init {source}: no such file or folder; give an enhancer package folder or a checkpoint")
    if path.is_dir():
        import yaml

        rdf_path = path / "bioimageio.yaml"
        if not rdf_path.is_file():
            raise SettingsError(f"--init {source}: the folder has no bioimageio.yaml; give an enhancer package folder")
        rdf = yaml.safe_load(rdf_path.read_text())
        ts = ((rdf or {}).get("weights") or {}).get("torchscript") or {}
        if "source" not in ts:
            raise SettingsError(f"--init {source}: the package has no TorchScript weights to start from")
        path = path / str(ts["source"])
    state = _torchscript_state(path)
    if state is None:  # not TorchScript: a training checkpoint?
        try:  # weights_only: a checkpoint is read without running pickled code
            ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise SettingsError(
                f"--init {source}: not TorchScript weights or a training checkpoint ({type(exc).__name__}: {exc})"
            ) from None
        state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SettingsError(f"--init {source}: the checkpoint holds no state_dict of tensors")
    own = model.state_dict()
    wrong = sorted(k for k in own if k not in state or tuple(state[k].shape) != tuple(own[k].shape))
    if wrong or len(state) != len(own):
        raise SettingsError(
            f"--init {source}: its network does not match a {getattr(model, 'ndim', 2)}D U-Net of depth "
            f"{model.depth} and width {model.encoders[0][0].out_channels} "
            f"(first mismatch: {wrong[0] if wrong else 'extra weights'}); "
            "give --depth, --width and --ndim of the model you start from"
        )
    model.load_state_dict({k: state[k] for k in own})


def _recalibrate(prob: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Random monotone remap of a probability map: ``sigmoid(a * logit(p) + b)``.

    WHY: a trained enhancer reads probability *levels*: where a weak forest leaves
    cell interiors near 0.5 it sees objects, and shifting that map down by hand
    fixes it. Remapping with ``b ~ U(-s, s)``, ``log a ~ U(-s/2, s/2)`` shows the
    network the same shapes at other levels (measured effect: docs/enhancers.md,
    "Tried, not adopted").
    """
    a = float(np.exp(rng.uniform(-strength / 2, strength / 2)))
    b = float(rng.uniform(-strength, strength))
    p = np.clip(prob.astype(np.float64), 1e-4, 1 - 1e-4)
    return (1.0 / (1.0 + np.exp(-(a * np.log(p / (1 - p)) + b)))).astype(np.float32)


def _augment(
    prob: np.ndarray, target: np.ndarray, rng: np.random.Generator, calibration: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    k = int(rng.integers(4))
    prob, target = np.rot90(prob, k, axes=(-2, -1)), np.rot90(target, k, axes=(-2, -1))
    if rng.random() < 0.5:
        prob, target = prob[..., ::-1], target[..., ::-1]
    # 3D: also mirror z (turns stay in the yx plane: z may be sampled more coarsely); 2D draws unchanged
    if prob.ndim == 3 and rng.random() < 0.5:
        prob, target = prob[::-1], target[::-1]
    # drawn only when enabled, so that runs without it keep their random stream (old training cards)
    if calibration > 0 and rng.random() < 0.75:
        prob = _recalibrate(prob, rng, calibration)
    if rng.random() < 0.5:
        prob = prob + rng.normal(0.0, rng.uniform(0.0, 0.1), prob.shape).astype(np.float32)
        prob = np.clip(prob, 0.0, 1.0)
    return np.ascontiguousarray(prob, np.float32), np.ascontiguousarray(target, np.float32)


def _sample_batch(
    pairs: Sequence[ForestPair], batch_size: int, patch: int, rng: np.random.Generator, calibration: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for _ in range(batch_size):
        p = pairs[int(rng.integers(len(pairs)))]
        prob, target = p.probability, p.target
        if min(prob.shape) < patch:  # a crop of a small (or binned) volume: mirror it up to the patch
            grow = [(0, max(0, patch - n)) for n in prob.shape]
            prob, target = np.pad(prob, grow, mode="symmetric"), np.pad(target, grow, mode="symmetric")
        sl = tuple(slice(o, o + patch) for o in (int(rng.integers(n - patch + 1)) for n in prob.shape))
        x, y = _augment(prob[sl], target[sl], rng, calibration)
        xs.append(x)
        ys.append(y)
    return np.stack(xs)[:, None], np.stack(ys)[:, None]


def _loss(pred: Any, target: Any) -> Any:
    import torch

    bce = torch.nn.functional.binary_cross_entropy(pred.clamp(1e-6, 1 - 1e-6), target)
    inter = (pred * target).sum()
    dice = 1.0 - (2.0 * inter + 1.0) / (pred.sum() + target.sum() + 1.0)
    return bce + dice


def train_unet(
    model: Any,
    pairs: Sequence[ForestPair],
    *,
    iterations: int = 1000,
    batch_size: int = 4,
    patch: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    calibration: float = 0.0,
    time_limit_s: float | None = None,
    checkpoint: str | Path | None = None,
    log: Callable[[str], None] | None = None,
    log_every: int = 50,
) -> list[float]:
    """Train ``model`` on random patches of ``pairs`` (Adam, BCE + Dice loss).

    Patches get a random rot90, a random flip, with ``calibration > 0`` (three
    times in four) a random monotone remap of the probability input, and half the
    time Gaussian noise on it. Given the same seed, model initialisation and
    thread count, the run is deterministic (torch's deterministic algorithms
    are enabled for its duration).

    Parameters
    ----------
    model : torch.nn.Module
        E.g. from :func:`build_unet`; trained in place.
    pairs : sequence of ForestPair
        Training data.
    iterations : int
        Optimiser steps.
    batch_size, patch : int
        Batch size and patch side (a multiple of ``2 ** depth``).
    lr : float
        Learning rate (cosine-annealed to 5% of it).
    seed : int
        Seed of patch sampling and augmentation (and torch's RNG).
    calibration : float
        Strength ``s`` of the remap ``sigmoid(a * logit(p) + b)``, ``b ~ U(-s, s)``,
        ``log a ~ U(-s/2, s/2)``: robustness to forests that are more or less
        confident than the training forests (0 = off).
    time_limit_s : float, optional
        Stop early once training has taken this long.
    checkpoint : path, optional
        Where to save ``{"state_dict", "iteration", "losses"}`` (every
        ``10 * log_every`` steps and at the end).
    log : callable, optional
        Receives progress lines.
    log_every : int
        Progress interval in steps.

    Returns
    -------
    list of float
        Loss of every step.
    """
    import torch

    if not (calibration >= 0 and np.isfinite(calibration)):
        raise SettingsError(f"calibration must be a finite number >= 0 (0 = off), got {calibration!r}")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    prev_det = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, iterations), eta_min=0.05 * lr)
    losses: list[float] = []
    model.train()
    t0 = time.perf_counter()

    def save(step: int) -> None:
        if checkpoint is not None:
            save_checkpoint(model, checkpoint, step, losses)

    try:
        for step in range(1, int(iterations) + 1):
            x, y = _sample_batch(pairs, batch_size, patch, rng, calibration)
            opt.zero_grad()
            loss = _loss(model(torch.from_numpy(x)), torch.from_numpy(y))
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            elapsed = time.perf_counter() - t0
            if log is not None and (step % log_every == 0 or step == iterations):
                recent = float(np.mean(losses[-log_every:]))
                log(f"step {step}/{iterations}  loss {recent:.4f}  ({elapsed:.0f} s)")
            if checkpoint is not None and step % (10 * log_every) == 0:
                save(step)
            if time_limit_s is not None and elapsed > time_limit_s:
                if log is not None:
                    log(f"time limit reached after {step} steps ({elapsed:.0f} s)")
                break
    finally:
        torch.use_deterministic_algorithms(prev_det)
        model.eval()
    save(len(losses))
    return losses


def save_checkpoint(model: Any, path: str | Path, iteration: int, losses: Sequence[float]) -> None:
    """Write a training checkpoint (``--init`` reads it) atomically: a temp file, then a rename.

    An interrupted write leaves the previous checkpoint whole.
    """
    import torch

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save({"state_dict": model.state_dict(), "iteration": iteration, "losses": list(losses)}, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- export
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cover(path: Path, test_input: np.ndarray, test_output: np.ndarray) -> None:
    from PIL import Image

    if test_input.ndim == 3:  # a 3D model: show the middle z slice
        test_input, test_output = test_input[len(test_input) // 2], test_output[len(test_output) // 2]
    a = (np.clip(test_input, 0, 1) * 255).astype(np.uint8)
    b = (np.clip(test_output, 0, 1) * 255).astype(np.uint8)
    row = np.concatenate([a, np.full((a.shape[0], 8), 255, np.uint8), b], axis=1)
    Image.fromarray(row).convert("RGB").save(path, format="PNG")


_NAME_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_+- ()")


def check_model_name(name: str) -> None:
    """Refuse a model name that bioimage.io would reject, before any training time is spent.

    Raises
    ------
    SettingsError
        Unless ``name`` has 5-128 characters, all letters, digits, spaces or ``_+-()``.
    """
    bad = sorted(set(name) - _NAME_CHARACTERS)
    if not 5 <= len(name) <= 128 or bad:
        why = f"has the characters {''.join(bad)!r}" if bad else f"has {len(name)} characters"
        raise SettingsError(
            f"model name {name!r} {why}; bioimage.io needs 5-128 characters, only letters, digits, "
            "spaces and _+-(): give another --name"
        )


def export_enhancer(
    model: Any,
    path: str | Path,
    *,
    name: str,
    description: str,
    halo: int,
    min_size: int,
    step: int,
    test_input: np.ndarray,
    documentation: str | None = None,
    tags: Sequence[str] = (),
    training: dict[str, Any] | None = None,
    overwrite: bool = True,
) -> Path:
    """Write ``model`` as a bioimage.io format-0.5 model package folder.

    The package holds TorchScript weights (traced), ``test_input.npy`` /
    ``test_output.npy``, a cover image, a README and ``bioimageio.yaml``:
    input ``probability`` (axes ``b, c, y, x``, or ``b, c, z, y, x`` for a
    3D model, one channel, sizes
    ``min_size + n * step``, values in [0, 1], no normalisation), output
    ``foreground`` (same size, ``halo`` per spatial side), MIT licence and the
    shallow2deep citation.

    Parameters
    ----------
    model : torch.nn.Module
        Maps ``(b, 1, y, x)`` probabilities to ``(b, 1, y, x)`` probabilities (3D:
        ``(b, 1, z, y, x)``; the dimensionality is that of ``test_input``).
    path : path
        Package folder to create.
    name, description : str
        Model name and one-line description.
    halo : int
        Output halo per spatial side (pixels of unreliable border).
    min_size, step : int
        Valid spatial input sizes are ``min_size + n * step``.
    test_input : ndarray, shape (y, x) or (z, y, x)
        A forest probability map of a valid size.
    documentation : str, optional
        README text (markdown); a default one is written otherwise.
    tags : sequence of str
        Extra tags.
    training : dict, optional
        Training facts stored under ``config.tda_graph.training``.
    overwrite : bool
        Replace an existing folder.

    Returns
    -------
    Path
        The package folder (its ``bioimageio.yaml`` is the model source).
    """
    import torch
    from bioimageio.spec import save_bioimageio_package_as_folder
    from bioimageio.spec.model import v0_5

    check_model_name(name)
    path = Path(path)
    test_input = np.asarray(test_input, np.float32)
    if test_input.ndim not in (2, 3):
        raise ValueError(f"test_input must be 2D (y, x) or 3D (z, y, x), got shape {test_input.shape}")
    spatial = ("z", "y", "x")[-test_input.ndim :]
    for n in test_input.shape:
        if n < min_size or (n - min_size) % step:
            raise ValueError(f"test_input shape {test_input.shape} is not min_size + n * step ({min_size}, {step})")
    if path.exists():
        if not overwrite:
            raise FileExistsError(path)
        shutil.rmtree(path)
    model = model.eval()
    x = torch.from_numpy(test_input[None, None].copy())
    with torch.no_grad():
        traced = torch.jit.trace(model, x)
        out = traced(x).numpy().astype(np.float32)

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        torch.jit.save(traced, str(tmp / "weights_torchscript.pt"))
        np.save(tmp / "test_input.npy", x.numpy())
        np.save(tmp / "test_output.npy", out)
        _cover(tmp / "cover.png", test_input, out[0, 0])
        doc = documentation or _default_readme(name, description, halo, min_size, step, test_input.ndim)
        (tmp / "README.md").write_text(doc, encoding="utf-8")

        def fd(fname: str) -> Any:
            return v0_5.FileDescr(source=tmp / fname, sha256=_sha256(tmp / fname))

        in_id = v0_5.TensorId("probability")
        space_in = [
            v0_5.SpaceInputAxis(id=v0_5.AxisId(a), size=v0_5.ParameterizedSize(min=min_size, step=step))
            for a in spatial
        ]
        space_out = [
            v0_5.SpaceOutputAxisWithHalo(
                id=v0_5.AxisId(a), halo=halo, size=v0_5.SizeReference(tensor_id=in_id, axis_id=v0_5.AxisId(a))
            )
            for a in spatial
        ]
        ensure = v0_5.EnsureDtypeDescr(kwargs=v0_5.EnsureDtypeKwargs(dtype="float32"))
        inp = v0_5.InputTensorDescr(
            id=in_id,
            description="foreground probability of a random forest (values in [0, 1])",
            axes=[v0_5.BatchAxis(), v0_5.ChannelAxis(channel_names=[v0_5.Identifier("forest_probability")]), *space_in],
            test_tensor=fd("test_input.npy"),
            data=v0_5.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
            preprocessing=[ensure],
        )
        outp = v0_5.OutputTensorDescr(
            id=v0_5.TensorId("foreground"),
            description="enhanced foreground probability (values in [0, 1])",
            axes=[v0_5.BatchAxis(), v0_5.ChannelAxis(channel_names=[v0_5.Identifier("foreground")]), *space_out],
            test_tensor=fd("test_output.npy"),
            data=v0_5.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
            postprocessing=[ensure],
        )
        descr = v0_5.ModelDescr(
            name=name,
            description=description,
            covers=[fd("cover.png")],
            documentation=fd("README.md"),
            authors=[v0_5.Author(name="tda-graph contributors")],
            cite=[v0_5.CiteEntry(text=_CITATION["text"], doi=v0_5.Doi(_CITATION["doi"]))],
            license=v0_5.LicenseId("MIT"),
            tags=["shallow2deep", "enhancer", "electron-microscopy", f"unet{test_input.ndim}d", "pytorch", *tags],
            version="0.1.0",
            inputs=[inp],
            outputs=[outp],
            weights=v0_5.WeightsDescr(
                torchscript=v0_5.TorchscriptWeightsDescr(
                    source=tmp / "weights_torchscript.pt",
                    sha256=_sha256(tmp / "weights_torchscript.pt"),
                    pytorch_version=v0_5.Version(torch.__version__.split("+")[0]),
                )
            ),
            config={"tda_graph": {"training": dict(training or {})}},
        )
        save_bioimageio_package_as_folder(descr, output_path=path)
    rdf = path / "rdf.yaml"
    if rdf.exists() and not (path / "bioimageio.yaml").exists():
        rdf.rename(path / "bioimageio.yaml")
    return path


def _default_readme(name: str, description: str, halo: int, min_size: int, step: int, ndim: int = 2) -> str:
    axes = "b, c, y, x" if ndim == 2 else "b, c, z, y, x"
    return f"""# {name}

{description}

A shallow2deep *enhancer*: a small {ndim}D U-Net that takes the foreground probability of a random forest
(trained on sparse labels with ilastik filter features) and returns a cleaner foreground probability.

- Input `probability`: axes `{axes}`, one channel, float32 in [0, 1], no normalisation;
  spatial size `{min_size} + n * {step}` along each spatial axis.
- Output `foreground`: same size, float32 in [0, 1] (sigmoid inside the network); discard {halo} pixels of
  halo on each side when tiling.
- Weights: TorchScript.

Method: {_CITATION["text"]} doi:{_CITATION["doi"]}

Licence: MIT.
"""


def check_package(path: str | Path) -> str:
    """Run ``bioimageio.core.test_model`` on a package and return its status (``"passed"`` or ``"failed"``)."""
    from bioimageio.core import test_model

    src = Path(path)
    if src.is_dir():
        src = next(src / n for n in ("bioimageio.yaml", "rdf.yaml") if (src / n).exists())
    return str(test_model(src).status)


def measure_halo(model: Any, probe: np.ndarray, *, step: int = 16, positions: int = 5) -> tuple[int, int]:
    """Measure how far the network's output reacts to one input pixel; return (radius, halo).

    WHY measured, not computed: a U-Net's nominal receptive field counts every level, but
    levels whose ReLUs died in training add nothing (a trained depth-4 enhancer reacted
    to pixels 31 px away, a depth-3 one 51 px), and a declared halo smaller than the
    real reach leaves seams between tiles (16 px on a depth-3 model changed 0.2 % of the
    thresholded pixels of an EPFL slice).

    Parameters
    ----------
    model : torch.nn.Module
        Maps ``(1, 1, y, x)`` (3D: ``(1, 1, z, y, x)``) to an output of the same size.
    probe : ndarray, shape (y, x) or (z, y, x)
        A realistic input (a forest probability map); ReLU paths depend on the input.
        A 3D probe is cut to its central 64³ and padded less, to bound memory.
    step : int
        The halo is the radius rounded up to a multiple of this (the model's size step).
    positions : int
        Number of single-pixel changes tried (the largest reach is kept).

    Returns
    -------
    (radius, halo) : tuple of int
        Largest distance (Chebyshev, pixels) at which any output value changed, and
        the halo to declare (``>= radius``, a multiple of ``step``).
    """
    import torch

    probe = np.asarray(probe, np.float32)
    if probe.ndim not in (2, 3) or min(probe.shape) < 2:
        raise ValueError(f"probe must be a 2D or 3D image, got shape {probe.shape}")
    if probe.ndim == 3:  # a 3D network on a 2D-sized padding would need GBs: cut and pad less
        probe = probe[tuple(slice(max(0, (n - 64) // 2), max(0, (n - 64) // 2) + 64) for n in probe.shape)]
    pad, max_pad = (128, 512) if probe.ndim == 2 else (32, 128)
    rng = np.random.default_rng(0)

    def run(batch: np.ndarray) -> np.ndarray:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return model(torch.from_numpy(np.ascontiguousarray(batch))).numpy()
        finally:
            model.train(was_training)

    while True:
        # reflect-pad so the reach is not clipped by the probe's borders; grow if it was
        x = np.pad(probe, pad, mode="reflect")
        shape = [-(-n // step) * step for n in x.shape]
        x = np.pad(x, [(0, n - m) for n, m in zip(shape, x.shape)], mode="reflect")
        centre = np.array([n // 2 for n in shape])
        where = [tuple(int(c) for c in centre + d) for d in rng.integers(-8, 9, size=(positions, probe.ndim))]
        batch = np.repeat(x[np.newaxis, np.newaxis], positions + 1, axis=0)
        for k, at in enumerate(where, start=1):
            v = batch[(k, 0, *at)]
            batch[(k, 0, *at)] = 1.0 - v if v != 0.5 else 0.0
        # 2D: one batch; 3D: one volume at a time (memory)
        out = run(batch) if probe.ndim == 2 else np.concatenate([run(batch[k : k + 1]) for k in range(len(batch))])
        radius = 0
        for k, at in enumerate(where, start=1):
            moved = np.nonzero(out[k, 0] != out[0, 0])
            if moved[0].size:
                radius = max(radius, *(int(np.abs(idx - c).max()) for idx, c in zip(moved, at)))
        if radius < int(centre.min()) - 16 or pad >= max_pad:
            break
        pad *= 2
    return radius, max(step, -(-radius // step) * step)


# --------------------------------------------------------------------------- all together
#: Label window, forest crop, U-Net patch, batch and test tensor sizes by dimensionality
#: (the defaults of :func:`train_enhancer` and of the CLI).
_SIZES = {
    2: {"label_patch": 256, "crop": 384, "train_patch": 128, "batch_size": 4, "test_size": 128},
    3: {"label_patch": 64, "crop": 96, "train_patch": 48, "batch_size": 2, "test_size": 0},  # test: smallest input
}


def train_enhancer(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    out: str | Path,
    *,
    name: str,
    description: str,
    n_forests: int = 60,
    iterations: int = 1500,
    seed: int = 0,
    depth: int = 3,
    width: int = 16,
    label_patch: int | None = None,
    crop: int | None = None,
    train_patch: int | None = None,
    batch_size: int | None = None,
    lr: float = 1e-3,
    n_trees: int = 15,
    halo: int | None = None,
    min_size: int | None = None,
    test_size: int | None = None,
    scales: Sequence[int] = (1,),
    calibration: float = 0.0,
    vary_features: bool = False,
    ndim: int = 2,
    avoid: Sequence[np.ndarray] | None = None,
    avoid_share: float = 0.5,
    avoid_inside: float = 0.0,
    init: str | Path | None = None,
    time_limit_s: float | None = None,
    checkpoint: str | Path | None = None,
    threads: int | None = 1,
    run_test: bool = True,
    training_info: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = print,
) -> TrainResult:
    """Forest predictions → U-Net training → bioimage.io package, in one call.

    Parameters
    ----------
    images, masks : sequence of ndarray
        Training raw images and binary ground truth (2D or stacks of 2D slices;
        ``(z, y, x)`` volumes with ``ndim=3``).
    out : path
        Package folder to write.
    name, description : str
        Model name and description.
    n_forests, iterations, seed, depth, width : int
        Number of forests, optimiser steps, seed, U-Net depth and first-level width.
    label_patch, crop, train_patch : int, optional
        Label window, forest prediction crop and U-Net training patch sides
        (default 256, 384, 128; cubes of 64, 96, 48 in 3D).
    batch_size : int, optional
        U-Net batch size (default 4; 2 in 3D).
    lr : float
        Learning rate.
    n_trees : int
        Trees per forest.
    halo, min_size : int, optional
        Declared output halo and minimum input size (the step is ``2 ** depth``,
        at least 16). Default: the halo is measured on the trained network
        (:func:`measure_halo`), the minimum size is ``2 * halo + step``.
    test_size : int, optional
        Side of the stored test tensor (rounded down to a valid size; keeps the package small;
        default 128 in 2D, the smallest valid input in 3D).
    scales : sequence of int
        Downsampling factors the forests see (see :func:`make_forest_predictions`).
    calibration : float
        Strength of the probability remap augmentation (see :func:`train_unet`; 0 = off).
    vary_features : bool
        Each forest uses a random subset of the features (see :func:`make_forest_predictions`).
    avoid, avoid_share, avoid_inside
        Masks of structures the background labels of ``avoid_share`` of the forests stay
        off, or (``avoid_inside`` of those) lie on only (see :func:`make_forest_predictions`).
    ndim : {2, 3}
        A 2D enhancer (forests on slices, 2D U-Net) or a 3D one (forests on cubes of
        the volumes with 3D features, 3D U-Net, a ``z, y, x`` package).
    init : path, optional
        Start from these weights instead of a random initialisation (fine-tuning;
        see :func:`load_initial_weights`).
    time_limit_s : float, optional
        Stop the U-Net training after this many seconds.
    checkpoint : path, optional
        Training checkpoint file.
    threads : int, optional
        ``torch.set_num_threads`` during training (``None`` leaves it).
    run_test : bool
        Run ``bioimageio.core.test_model`` on the package.
    training_info : dict, optional
        Extra facts stored in the package config (e.g. data sources).
    log : callable, optional
        Progress output.

    Returns
    -------
    TrainResult
    """
    import torch

    if ndim not in _SIZES:
        raise ValueError(f"ndim must be 2 or 3, got {ndim!r}")
    default = _SIZES[ndim]
    label_patch = default["label_patch"] if label_patch is None else int(label_patch)
    crop = default["crop"] if crop is None else int(crop)
    train_patch = default["train_patch"] if train_patch is None else int(train_patch)
    batch_size = default["batch_size"] if batch_size is None else int(batch_size)
    test_size = default["test_size"] if test_size is None else int(test_size)
    if train_patch > crop:
        raise SettingsError(
            f"--train-patch {train_patch} is larger than the forest crop {crop}; "
            "give a smaller --train-patch or a larger --crop"
        )
    check_model_name(name)  # export would refuse it only after the whole training
    # settings that would otherwise fail only after the forests or the whole training
    for option, value in (("--forests", n_forests), ("--iterations", iterations), ("--batch-size", batch_size)):
        if int(value) < 1:
            raise SettingsError(f"{option} {value}: give at least 1")
    if Path(out).exists() and not Path(out).is_dir():
        raise SettingsError(f"--out {out}: a file of that name exists; give a folder for the package")
    if checkpoint is not None and not Path(checkpoint).parent.is_dir():
        raise SettingsError(
            f"--checkpoint {checkpoint}: the folder {str(Path(checkpoint).parent)!r} does not exist; "
            "create it or give another path"
        )
    torch.manual_seed(seed)
    model = build_unet(depth=depth, width=width, ndim=ndim)
    if init is not None:
        load_initial_weights(model, init)
    prev_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        t0 = time.perf_counter()
        pairs = make_forest_predictions(
            images,
            masks,
            n_forests,
            patch=label_patch,
            crop=crop,
            n_trees=n_trees,
            seed=seed,
            scales=scales,
            vary_features=vary_features,
            ndim=ndim,
            avoid=avoid,
            avoid_share=avoid_share,
            avoid_inside=avoid_inside,
            log=log,
        )
        t_forest = time.perf_counter() - t0
        n_params = sum(p.numel() for p in model.parameters())
        if log is not None:
            log(f"{ndim}D U-Net depth {depth} width {width}: {n_params} parameters")
        t1 = time.perf_counter()
        losses = train_unet(
            model,
            pairs,
            iterations=iterations,
            batch_size=batch_size,
            patch=train_patch,
            lr=lr,
            seed=seed,
            calibration=calibration,
            time_limit_s=time_limit_s,
            checkpoint=checkpoint,
            log=log,
        )
        t_train = time.perf_counter() - t1
        step = max(16, 2**depth)
        if halo is None:
            reach, halo = measure_halo(model, pairs[0].probability, step=step)
            if log is not None:
                log(f"output reacts to input up to {reach} px away: halo {halo}")
        if min_size is None:
            # smaller tiles would keep nothing (and bioimage.io requires a minimum size above 2 * halo);
            # in 3D the test tensors are min_size³ float32, so the halo sets the package size
            min_size = 2 * halo + step
        probe = pairs[0].probability
        if min(probe.shape) < min_size:  # small (3D) crops: mirror one up to a valid test input
            probe = np.pad(probe, [(0, max(0, min_size - n)) for n in probe.shape], mode="symmetric")
        avail = min(probe.shape)
        size = min_size + ((min(max(test_size, min_size), avail) - min_size) // step) * step
        test_input = np.ascontiguousarray(probe[(slice(0, size),) * probe.ndim])
        info = {
            "n_forests": n_forests,
            "iterations": len(losses),
            "seed": seed,
            "depth": depth,
            "width": width,
            **({"ndim": 3} if ndim == 3 else {}),  # absent: 2D, as in packages written before 3D existed
            "n_trees": n_trees,
            "scales": [int(f) for f in scales],
            "calibration": float(calibration),
            "vary_features": bool(vary_features),
            "lr": float(lr),
            **({"init": str(init)} if init is not None else {}),
            "features": [list(f) for f in SHALLOW2DEEP_FEATURES],
            "final_loss": float(np.mean(losses[-50:])),
            "forest_seconds": round(t_forest, 1),
            "train_seconds": round(t_train, 1),
            **(training_info or {}),
        }
        try:
            pkg = export_enhancer(
                model,
                out,
                name=name,
                description=description,
                halo=halo,
                min_size=min_size,
                step=step,
                test_input=test_input,
                training=info,
            )
        except Exception as exc:  # the trained network is the expensive part: never lose it
            kept = Path(checkpoint) if checkpoint is not None else Path(f"{out}.unexported.ckpt")
            if checkpoint is None:
                save_checkpoint(model, kept, len(losses), losses)
            exc.add_note(f"the trained weights are kept in {kept}; start from them with --init {kept}")
            raise
    finally:
        torch.set_num_threads(prev_threads)
    status = check_package(pkg) if run_test else None
    if log is not None and status is not None:
        log(f"bioimageio.core test_model: {status}")
    size_bytes = sum(f.stat().st_size for f in Path(pkg).rglob("*") if f.is_file())
    return TrainResult(
        package=Path(pkg),
        n_pairs=len(pairs),
        iterations=len(losses),
        forest_seconds=t_forest,
        train_seconds=t_train,
        final_loss=info["final_loss"],
        n_parameters=n_params,
        package_bytes=size_bytes,
        test_status=status,
        losses=losses,
    )


# --------------------------------------------------------------------------- CLI
def read_stack(spec: str, slices: str | None = None, axes: str | None = None) -> np.ndarray:
    """Read a 2D image or a stack of 2D slices from HDF5, zarr or TIFF, optionally only some ``slices``.

    Parameters
    ----------
    spec : str
        ``file.h5:dataset`` (the dataset may be left out when the file holds one image),
        ``file.zarr[:array]`` or ``file.tif``, as :func:`operators.file_sources.open_image` reads.
    slices : str, optional
        Inclusive range ``"0-19"`` or a comma list of indices along the stack axis (``z``,
        or ``t`` for a time series of 2D frames).
    axes : str, optional
        Stored axes (e.g. ``"yxz"``, ``"cyx"``); default from the file's metadata or its
        number of dimensions (2 → ``"yx"``, 3 → ``"zyx"``).

    Returns
    -------
    ndarray
        ``(y, x)`` or ``(slices, y, x)``; singleton ``t`` and ``c`` axes are dropped.

    Raises
    ------
    SettingsError
        A missing or unreadable file, a missing dataset (the message lists the file's
        datasets), wrong ``axes``, several channels, ``z`` and ``t`` both longer than 1,
        ``slices`` on a single 2D image, or slices outside the stack.
    """
    from operators.file_sources import open_image

    try:
        source = open_image(spec, axes)
    except TdaError as e:  # the reader's message names the file and the fix
        raise SettingsError(str(e)) from None
    out = source.output_spec({})
    kept = [i for i, (a, n) in enumerate(zip(out.axes, out.shape, strict=True)) if not (a in "tc" and n == 1)]
    layout = "".join(out.axes[i] for i in kept)
    if layout not in ("yx", "zyx", "tyx"):
        described = f"axes {out.axes!r}, shape {tuple(out.shape)}"
        if "c" in layout:
            fix = "an enhancer learns from one grey-value image: save one channel, or give --axes if 'c' is wrong"
        elif layout == "tzyx":
            fix = "give one time point of the volume"
        else:
            fix = "give a 2D image or a stack of 2D slices, or give --axes (e.g. zyx) if the axes are wrong"
        raise SettingsError(f"{spec}: {described}; {fix}")
    axis = out.axes.index(layout[0])  # the stack axis (y for a single image, which then has no slices)
    if slices is None:
        bounds = [(0, out.shape[axis])]
    else:
        if layout == "yx":
            raise SettingsError(f"--slices {slices}: {spec} is one 2D image {tuple(out.shape)}, not a stack of slices")
        n = out.shape[axis]
        chosen = parse_index_list(slices, "--slices")
        if chosen[-1] >= n:
            raise SettingsError(f"--slices {slices}: {spec} has {n} slices along its {layout[0]} axis (0-{n - 1})")
        bounds = []
        for k in chosen:  # contiguous runs of the chosen indices, one read each
            if bounds and bounds[-1][1] == k:
                bounds[-1] = (bounds[-1][0], k + 1)
            else:
                bounds.append((k, k + 1))
    parts = []
    for lo, hi in bounds:
        start, stop = [0] * len(out.shape), list(out.shape)
        start[axis], stop[axis] = lo, hi
        parts.append(source.compute(Roi(start, stop), {}))
    data = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=axis)
    return data.reshape(tuple(data.shape[i] for i in kept))  # the dropped t/c axes have length 1


def parse_index_list(text: str, option: str = "--slices") -> list[int]:
    """``"0-19"``, ``"0,2,7"`` or a mix of both -> sorted distinct indices >= 0.

    Raises
    ------
    SettingsError
        Naming ``option`` and the expected form, for anything else (a backwards range says
        how to write it).
    """
    chosen: set[int] = set()
    for part in (t.strip() for t in str(text).split(",")):
        if not part:
            continue
        lo_text, dash, hi_text = part.partition("-")
        if not lo_text.isdigit() or (dash and not hi_text.isdigit()):
            raise SettingsError(f"{option} {text!r}: give indices >= 0 as a range and/or a list, e.g. 0-19 or 0,2,7")
        lo, hi = int(lo_text), int(hi_text or lo_text)
        if hi < lo:
            raise SettingsError(f"{option} {text!r}: the range {part} runs backwards; write {hi}-{lo}")
        chosen.update(range(lo, hi + 1))
    if not chosen:
        raise SettingsError(f"{option} {text!r}: give indices >= 0 as a range and/or a list, e.g. 0-19 or 0,2,7")
    return sorted(chosen)


def _parse_scales(text: str) -> list[int]:
    try:
        out = [int(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise SettingsError(f"--scales {text!r}: give integer downsampling factors >= 1, e.g. 1,2,4")
    return out


def cmd_train_enhancer(args: argparse.Namespace) -> int:
    """Body of ``tda train-enhancer``; returns the exit code."""
    ndim = int(getattr(args, "ndim", 2))
    if ndim == 3 and args.slices is not None:
        chosen = parse_index_list(args.slices, "--slices")
        if chosen != list(range(chosen[0], chosen[-1] + 1)):
            raise SettingsError(
                f"--slices {args.slices}: a 3D enhancer trains on a volume, so give one contiguous z range (e.g. 0-159)"
            )
    specs = [(args.images, args.ground_truth)] + [tuple(p) for p in (args.add_data or [])]
    avoid_specs = list(args.avoid or [])
    if not 0.0 <= args.avoid_share <= 1.0:
        raise SettingsError(f"--avoid-share {args.avoid_share}: give a share of the forests between 0 and 1")
    if not 0.0 <= args.avoid_inside <= 1.0:
        raise SettingsError(f"--avoid-inside {args.avoid_inside}: give a share of the --avoid forests between 0 and 1")
    if args.avoid_inside and not avoid_specs:
        raise SettingsError("--avoid-inside needs --avoid MASK (one per data pair): give the mask it refers to")
    if avoid_specs and len(avoid_specs) != len(specs):
        raise SettingsError(
            f"{len(avoid_specs)} --avoid mask(s) for {len(specs)} data pair(s); give one --avoid per pair "
            "(the first pair, then each --add-data, in order)"
        )
    raws, gts, avoids = [], [], []
    axes = getattr(args, "axes", None)
    for k, (im_spec, gt_spec) in enumerate(specs):
        raw = read_stack(im_spec, args.slices, axes)
        gt = read_stack(gt_spec, args.slices, axes)
        if raw.shape != gt.shape:
            raise SettingsError(
                f"{im_spec} has shape {raw.shape} but its ground truth {gt_spec} has {gt.shape}; "
                "give an image and a ground truth of the same shape"
            )
        if ndim == 3 and raw.ndim != 3:
            raise SettingsError(f"{im_spec} has shape {raw.shape}; a 3D enhancer (--ndim 3) needs (z, y, x) volumes")
        raws.append(raw)
        gts.append(gt)
        if avoid_specs:
            mask = read_stack(avoid_specs[k], args.slices, axes)
            if mask.shape != raw.shape:
                raise SettingsError(
                    f"--avoid {avoid_specs[k]} has shape {mask.shape} but its image has {raw.shape}; "
                    "give a mask of the image's shape"
                )
            avoids.append(mask)
    # the default name from the folder name, with what bioimage.io refuses in a name replaced
    folder = "".join(c if c in _NAME_CHARACTERS else "_" for c in Path(args.out).name)
    name = args.name or f"shallow2deep enhancer {folder}"[:128]
    images, truths = [a for a, _ in specs], [b for _, b in specs]
    one = len(specs) == 1  # a single pair is recorded as plain strings, as before
    data = {"images": images[0] if one else images, "ground_truth": truths[0] if one else truths, "slices": args.slices}
    if avoid_specs:
        data["avoid"] = avoid_specs[0] if one else avoid_specs
        data["avoid_share"] = float(args.avoid_share)
        if args.avoid_inside:
            data["avoid_inside"] = float(args.avoid_inside)
    res = train_enhancer(
        raws,
        gts,
        args.out,
        name=name,
        description=args.description or f"shallow2deep enhancer trained on {', '.join(truths)}",
        n_forests=args.forests,
        iterations=args.iterations,
        seed=args.seed,
        depth=args.depth,
        width=args.width,
        time_limit_s=args.time_limit,
        scales=_parse_scales(args.scales),
        calibration=args.calibration,
        vary_features=args.vary_features,
        ndim=ndim,
        avoid=avoids or None,
        avoid_share=args.avoid_share,
        avoid_inside=args.avoid_inside,
        label_patch=args.label_patch,
        crop=args.crop,
        train_patch=args.train_patch,
        batch_size=args.batch_size,
        init=args.init,
        lr=args.lr,
        checkpoint=args.checkpoint,
        threads=args.threads,
        run_test=not args.no_test,
        training_info=data,
    )
    summary = {k: v for k, v in res.__dict__.items() if k != "losses"}
    summary["package"] = str(res.package)
    print(json.dumps(summary, indent=2))
    return 0 if res.test_status in (None, "passed", "valid-format") else 1


def add_train_enhancer_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``train-enhancer`` sub-command on an ``argparse`` sub-parser set.

    Parameters
    ----------
    subparsers
        The object returned by ``ArgumentParser.add_subparsers()``.

    Returns
    -------
    argparse.ArgumentParser
        The new sub-parser (its ``func`` default is :func:`cmd_train_enhancer`).
    """
    p = subparsers.add_parser(
        "train-enhancer", help="train a shallow2deep enhancer U-Net and write a bioimage.io package"
    )
    p.add_argument(
        "images",
        help="raw images: file.h5:dataset, file.zarr[:array] or file.tif; one 2D image or a stack of slices",
    )
    p.add_argument("ground_truth", help="binary ground truth (0 = background), same forms, same shape")
    p.add_argument("--out", required=True, help="package folder to write")
    p.add_argument(
        "--add-data",
        nargs=2,
        action="append",
        metavar=("IMAGES", "GROUND_TRUTH"),
        help="another raw/ground-truth pair (same forms), e.g. a second acquisition; repeatable",
    )
    p.add_argument(
        "--axes",
        default=None,
        help="stored axes of every image, ground truth and mask, e.g. zyx or yxz (default: metadata or ndim)",
    )
    p.add_argument(
        "--slices", default=None, help="slices (along z, or t) to train on, of every pair, e.g. 0-19 (default all)"
    )
    p.add_argument("--forests", type=int, default=60, help="number of random forests (default 60)")
    p.add_argument("--iterations", "--epochs", type=int, default=1500, help="U-Net optimiser steps (default 1500)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--depth", type=int, default=3, help="U-Net depth (default 3)")
    p.add_argument("--width", type=int, default=16, help="U-Net first-level channels (default 16)")
    p.add_argument(
        "--ndim",
        type=int,
        choices=(2, 3),
        default=2,
        help="2: forests on 2D slices and a 2D U-Net (default); 3: forests on 3D cubes of the volume "
        "(3D features and strokes) and a 3D U-Net, for 3D data (--slices then selects one z range)",
    )
    p.add_argument("--label-patch", type=int, default=None, help="side of the label window (default 256; 3D: 64)")
    p.add_argument("--crop", type=int, default=None, help="side of each forest's predicted crop (default 384; 3D: 96)")
    p.add_argument("--train-patch", type=int, default=None, help="U-Net training patch side (default 128; 3D: 48)")
    p.add_argument("--batch-size", type=int, default=None, help="U-Net batch size (default 4; 3D: 2)")
    p.add_argument(
        "--scales",
        default="1",
        help="downsampling factors the forests see, e.g. 1,2,4 (robustness to pixel size; default 1)",
    )
    p.add_argument(
        "--calibration",
        type=float,
        default=0.0,
        help="strength of a random remap sigmoid(a*logit(p)+b) of the forest probability, b in [-s, s], "
        "log a in [-s/2, s/2]: robustness to more or less confident forests (default 0 = off)",
    )
    p.add_argument(
        "--vary-features",
        action="store_true",
        help="each forest uses a random subset of the feature types and scales (forests that err differently)",
    )
    p.add_argument(
        "--avoid",
        action="append",
        metavar="MASK",
        help="binary mask (same forms as the images, the image's shape) of structures users rarely paint as "
        "background although they are, e.g. membranes for a mitochondria enhancer: in --avoid-share of the forests "
        "the background labels stay off them; one per data pair (the first, then each --add-data)",
    )
    p.add_argument(
        "--avoid-share",
        type=float,
        default=0.5,
        help="share of the forests whose background labels avoid --avoid (default 0.5)",
    )
    p.add_argument(
        "--avoid-inside",
        type=float,
        default=0.0,
        help="share of the --avoid forests whose background labels lie on the mask only (e.g. on membranes "
        "alone, so the forest takes the cytoplasm for foreground) instead of off it (default 0)",
    )
    p.add_argument(
        "--init",
        default=None,
        help="fine-tune: start from this enhancer package folder, TorchScript file or checkpoint "
        "(same --depth/--width)",
    )
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate, cosine-annealed to 5%% (default 1e-3)")
    p.add_argument("--time-limit", type=float, default=None, help="stop training after this many seconds")
    p.add_argument("--checkpoint", default=None, help="training checkpoint file")
    p.add_argument("--threads", type=int, default=1, help="torch threads during training (default 1)")
    p.add_argument("--name", default=None)
    p.add_argument("--description", default=None)
    p.add_argument("--no-test", action="store_true", help="skip bioimageio.core.test_model")
    p.set_defaults(func=cmd_train_enhancer)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tda_graph.workflows.shallow2deep train-enhancer ...`` (same as ``tda train-enhancer``)."""
    parser = argparse.ArgumentParser(prog="python -m tda_graph.workflows.shallow2deep")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_enhancer_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except TdaError as exc:  # a user's mistake: the message, not a traceback (as ``tda`` does)
        print(f"train-enhancer: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
