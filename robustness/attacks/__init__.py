"""The torch-free attack engine: one module per attack, a registry keyed by name.

``REGISTRY`` maps a name to an ``Attack`` subclass; capabilities are class data
(``cls.capabilities``), so suites and tests loop over the registry instead of naming classes.
Build a fresh, frozen attack per run with ``build(name, **params)``.
"""
from __future__ import annotations

from typing import Any

from dcs.robustness.attacks.apgd import APGDCE, APGDDLR
from dcs.robustness.attacks.base import (
    Attack,
    AttackError,
    AttackResult,
    Budget,
    BudgetExceeded,
    Capabilities,
    Stopped,
    project,
)
from dcs.robustness.attacks.fgsm import FGSM
from dcs.robustness.attacks.noise import RandomNoise
from dcs.robustness.attacks.pgd import BIM, PGD
from dcs.robustness.attacks.rp2 import RP2, sticker_mask
from dcs.robustness.attacks.square import Square
from dcs.robustness.attacks.transfer import Transfer

REGISTRY: dict[str, type[Attack]] = {
    cls.name: cls for cls in (FGSM, BIM, PGD, APGDCE, APGDDLR, Square, RP2, Transfer, RandomNoise)
}


def register(cls: type[Attack]) -> type[Attack]:
    """Add an attack class to the registry under ``cls.name`` (usable as a class decorator).

    Registered attacks are usable by name in suites, ``dcs evaluate`` and server audits, and are
    covered by the registry-wide tests. A name already taken raises AttackError.
    """
    if not (isinstance(cls, type) and issubclass(cls, Attack)):
        raise AttackError(f"register() takes an Attack subclass, got {cls!r}")
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise AttackError(f"attack name {cls.name!r} is already registered")
    REGISTRY[cls.name] = cls
    return cls


def get(name: str) -> type[Attack]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise AttackError(f"unknown attack {name!r}; known: {', '.join(sorted(REGISTRY))}") from None


def build(name: str, **params: Any) -> Attack:
    """A fresh attack instance; unknown parameters raise AttackError naming them."""
    cls = get(name)
    import dataclasses

    known = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(params) - known)
    if bad:
        raise AttackError(f"{name}: unknown parameter(s) {bad}; known: {sorted(known)}")
    return cls(**params)


__all__ = [
    "APGDCE",
    "APGDDLR",
    "BIM",
    "FGSM",
    "PGD",
    "REGISTRY",
    "RP2",
    "Attack",
    "AttackError",
    "AttackResult",
    "Budget",
    "BudgetExceeded",
    "Capabilities",
    "RandomNoise",
    "Square",
    "Stopped",
    "Transfer",
    "build",
    "get",
    "project",
    "register",
    "sticker_mask",
]
