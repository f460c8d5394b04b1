"""recsys: the TensorFlow-free core shared by training and serving.

Importing this package (or anything under it) never imports TensorFlow; training code
lives in the separate `training` package and is imported lazily by the CLI.
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("recsys")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
