"""Text that echoes what a client sent, or names server files: clipped, and without server paths.

`clip` bounds any echoed input (a 1 MB dataset name must not reach a log line or a
status message whole); `scrub` replaces server paths by names before text goes to a
client.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["ECHO_LIMIT", "clip", "scrub"]

ECHO_LIMIT = 80  # characters of client input echoed into a message


def clip(text: object, limit: int = ECHO_LIMIT) -> str:
    """`repr(text)` cut to `limit` characters, with an ellipsis and the full length if cut.

    The repr quotes strings and escapes newlines and control characters, so an echoed
    value can neither forge a log line nor hide in one.
    """
    shown = repr(text)
    if len(shown) <= limit:
        return shown
    size = f" ({len(text)} characters)" if isinstance(text, str | bytes) else ""
    return f"{shown[: max(1, limit - 1)]}…{size}"


def scrub(text: str, paths: Mapping[str, str]) -> str:
    """`text` with every server path in `paths` (path -> what to say instead) replaced.

    Longer paths first, so a file inside a replaced folder is replaced whole.
    """
    for path in sorted(paths, key=len, reverse=True):
        if path:
            text = text.replace(path, paths[path])
    return text
