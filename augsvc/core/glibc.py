"""glibc's own functions (mallopt, malloc_trim) through ctypes, where the C library is glibc."""

from __future__ import annotations

import ctypes
import functools
import platform
from typing import Any

__all__ = ["glibc_function"]


@functools.cache
def glibc_function(name: str, *argtypes: Any, restype: Any = ctypes.c_int) -> Any:
    """glibc's function `name` taking `argtypes`, or None where the C library is not glibc
    (or lacks it)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        function = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = argtypes, restype
    return function
