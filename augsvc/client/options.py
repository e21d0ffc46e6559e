"""Checks of `AugmentLoader`'s arguments: a mistake raises where it is made, naming it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from augsvc.client.discovery import canonical_target
from augsvc.core.spec import AugmentSpec

__all__ = ["check_choice", "check_flags", "check_spec", "check_targets", "check_timeout",
           "check_token"]


def check_targets(servers: str | Sequence[str]) -> tuple[str, ...]:
    """The server targets as "host:port" or "dns:///host:port" (a missing port is
    augsvc's, 50051; `augsvc.client.discovery.canonical_target`); ValueError naming a
    malformed one."""
    targets = (servers,) if isinstance(servers, str) else tuple(servers)
    if not targets or not all(isinstance(t, str) and t.strip() for t in targets):
        raise ValueError(f"servers must be 'host:port' or a non-empty list of them, "
                         f"got {servers!r}")
    return tuple(canonical_target(t) for t in targets)


def check_spec(spec: AugmentSpec | None) -> AugmentSpec:
    """The spec (None: the default training spec); TypeError for anything else."""
    spec = AugmentSpec() if spec is None else spec
    if not isinstance(spec, AugmentSpec):
        raise TypeError(f"spec must be an AugmentSpec, got {type(spec).__name__}")
    return spec


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def check_flags(**flags: Any) -> None:
    """TypeError for a flag that is not True or False."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")


def check_timeout(timeout: Any) -> float:
    if isinstance(timeout, bool) or not (isinstance(timeout, (int, float))
                                         and 0 < timeout and math.isfinite(timeout)):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


def check_token(token: Any) -> None:
    if token is not None and not (isinstance(token, str) and token):
        raise ValueError("token must be a non-empty string or None")
