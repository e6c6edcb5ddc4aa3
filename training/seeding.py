"""The one place RNGs are seeded and torch's thread count is set."""
from __future__ import annotations

import logging
import os
import random

import numpy as np

log = logging.getLogger(__name__)
THREADS_ENV = "DCS_THREADS"


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and CUDA) global RNGs once, at the start of a run."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_threads(threads: int | None) -> int | None:
    """The flag wins, then env ``DCS_THREADS``; None leaves torch's default."""
    if threads is not None:
        return threads
    env = os.environ.get(THREADS_ENV)
    if env:
        try:
            return int(env)
        except ValueError as exc:
            raise ValueError(f"{THREADS_ENV} must be an integer, got {env!r}") from exc
    return None


def set_threads(threads: int | None) -> int:
    """Apply ``torch.set_num_threads`` (when given) and return the count in effect."""
    import torch

    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    n = torch.get_num_threads()
    log.info("torch threads: %d", n)
    return n


def rng_state() -> dict:
    """All global RNG states (for checkpoints)."""
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore states saved by ``rng_state``."""
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
