"""Why ``fastckpt._core`` (the compiled extension) did not import, in words a user can act on.

The common case: ``pip install .`` put the compiled core in site-packages, and Python was started
from the root of a clone, so ``import fastckpt`` found the source tree (which has no compiled core)
before the installed package. Imports no torch and no ``_core``.
"""

from __future__ import annotations

import glob
import os
import sys

__all__ = ["DISTRIBUTION", "explain"]

#: This project's distribution name (pyproject's ``[project].name``); the import name is
#: ``fastckpt``. PyPI's "fastckpt" is an unrelated project, so the clone is what gets installed.
DISTRIBUTION = "fastckpt-loader"


def _installed_core() -> str | None:
    """Where the installed distribution put its compiled core, if one is installed."""
    try:
        from importlib import metadata

        dist = metadata.distribution(DISTRIBUTION)
    except Exception:  # not installed, or broken metadata: nothing to point at
        return None
    for file in dist.files or ():
        name = str(file)
        if "_core" in os.path.basename(name) and name.endswith((".so", ".pyd")):
            return str(dist.locate_file(file))
    return None


def explain(error: ImportError, package_dir: str | None = None) -> ImportError:
    """An ``ImportError`` that says what happened and what to do."""
    if package_dir is None:
        package_dir = os.path.dirname(os.path.abspath(__file__))
    built = glob.glob(os.path.join(package_dir, "_core*.so")) + glob.glob(
        os.path.join(package_dir, "_core*.pyd")
    )
    if built:
        msg = (
            f"fastckpt's compiled core {built[0]} is there but failed to load ({error}); it was "
            f"probably built for another Python or torch: reinstall fastckpt "
            f"(pip install --force-reinstall --no-deps .) with Python {sys.version.split()[0]}"
        )
    else:
        installed = _installed_core()
        if installed is not None and os.path.dirname(installed) != package_dir:
            msg = (
                f"Python imported fastckpt from {package_dir}, a source tree without the compiled "
                f"core (fastckpt._core), instead of the installed package "
                f"({os.path.dirname(installed)}): the current directory or PYTHONPATH shadows it. "
                "Run Python from another directory, or install the clone in editable mode "
                "(pip install -e .) to use it from here"
            )
        else:
            msg = (
                f"fastckpt's compiled core (fastckpt._core) is not built in {package_dir}: install "
                "fastckpt with pip (pip install . from a clone; pip install -e . to work on it), "
                "which compiles it"
            )
    out = ImportError(msg, name="fastckpt._core")
    return out
