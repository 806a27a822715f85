"""The library versions a result was made with, as every output file records them."""

from __future__ import annotations

import importlib.metadata
import platform

import bpo

PACKAGES = ("torch", "transformers", "datasets")


def versions() -> dict[str, str | None]:
    """bpo, Python and the packages that change numbers; None for one not installed.

    Read from package metadata rather than by importing: importing torch to read its version
    takes seconds.
    """
    found: dict[str, str | None] = {"bpo": bpo.__version__, "python": platform.python_version()}
    for package in PACKAGES:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found
