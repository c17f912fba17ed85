"""Model packages shipped with tda-graph.

The bundled shallow2deep enhancers live as bioimage.io model package folders
under ``enhancers/<name>/`` (each with a ``bioimageio.yaml``); see
``docs/enhancers.md`` for how they were trained and how well they do. Nothing
heavy is imported here.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["ENHANCERS_DIR", "bundled_enhancers", "bundled_enhancer"]

#: Folder holding the bundled enhancer packages.
ENHANCERS_DIR: Path = Path(__file__).resolve().parent / "enhancers"


def bundled_enhancers() -> dict[str, Path]:
    """Bundled enhancer packages by name.

    Returns
    -------
    dict of str to Path
        ``{name: package folder}`` for every folder under :data:`ENHANCERS_DIR`
        that holds a ``bioimageio.yaml``, sorted by name. A folder is a valid
        source for ``bioimageio.core.load_model_description`` and for
        :func:`operators.enhancer.load_enhancer_model`.
    """
    if not ENHANCERS_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(ENHANCERS_DIR.iterdir()) if p.is_dir() and (p / "bioimageio.yaml").is_file()}


def bundled_enhancer(name: str) -> Path:
    """The package folder of one bundled enhancer.

    Parameters
    ----------
    name : str
        E.g. ``"mitochondria_em2d"`` or ``"membranes_em2d"``.

    Returns
    -------
    Path
        The package folder.

    Raises
    ------
    KeyError
        Unknown name; the message lists the available ones.
    """
    available = bundled_enhancers()
    try:
        return available[name]
    except KeyError:
        names = ", ".join(sorted(available)) or "none installed"
        raise KeyError(f"no bundled enhancer named {name!r}; available: {names}") from None
