"""augsvc: a GPU data-augmentation service and its client data loader.

    import augsvc
    loader = augsvc.AugmentLoader("aug-0:50051", "imagenet", augsvc.AugmentSpec(), 256)

Public names: `AugmentLoader` (the client, `augsvc.client`), `AugmentSpec` (what to do to
each image, `augsvc.core.spec`), `AugsvcError` (every failure of a request to a server) and
`__version__`. Importing the package stays light: no DALI, no torch, and the gRPC client
is imported on first use of `AugmentLoader` or `AugsvcError`.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from augsvc.core.spec import AugmentSpec

if TYPE_CHECKING:
    from augsvc.client import AugmentLoader, AugsvcError

__all__ = ["AugmentLoader", "AugmentSpec", "AugsvcError", "__version__"]

try:
    __version__ = version("augsvc")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.1.0"

_LAZY = {"AugmentLoader": "augsvc.client", "AugsvcError": "augsvc.client"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'augsvc' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
