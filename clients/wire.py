"""Client-side encoding of request parts (images, attack specs), validated before they are sent."""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from dcs.clients.errors import InvalidArgument
from dcs.proto import classifier_pb2 as cpb


def attack_spec(spec: str | tuple[str, Mapping[str, Any]] | Mapping[str, Any]) -> cpb.AttackSpec:
    """An attack as the wire message: a name, (name, params) or {"name": ..., "params": ...}."""
    if isinstance(spec, str):
        return cpb.AttackSpec(name=spec)
    if isinstance(spec, Mapping):
        params = spec.get("params") or {}
        return cpb.AttackSpec(name=str(spec["name"]),
                              params_json=json.dumps(params) if params else "")
    name, params = spec
    return cpb.AttackSpec(name=name, params_json=json.dumps(dict(params)) if params else "")


def as_wire_array(images: Any) -> np.ndarray:
    """[N, C, H, W] uint8 or float32 (little-endian), validated locally."""
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise InvalidArgument(f"images has shape {list(x.shape)}; expected [N, C, H, W] or "
                              f"[C, H, W]")
    if len(x) == 0:
        raise InvalidArgument("images is an empty batch; send at least one image")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise InvalidArgument(f"images dtype is {x.dtype}; expected float32 in [0, 1] or uint8 "
                              f"(clients.images converts other inputs)")
    return np.ascontiguousarray(x, dtype="<f4")
