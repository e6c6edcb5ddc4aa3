"""Per-example random streams for attacks (reproducible under any batching or sharding)."""
from __future__ import annotations

import numpy as np

from dcs.robustness.attacks.errors import AttackError


class ExampleRNG:
    """Random draws whose row ``k`` comes from example ``k``'s own generator.

    ``dcs.robustness.audit`` builds one per job from ``default_rng([seed, job, example_index])``
    (global example index), so an example's random numbers do not depend on its batch, its
    position or which other examples run with it: a shard of the test set reproduces the
    unsharded per-example results. Supports the draws attacks make (``uniform``, ``integers``,
    ``choice``, ``random``, ``normal``); ``size`` must start with the number of examples.
    """

    def __init__(self, generators) -> None:
        self._gens = list(generators)

    @classmethod
    def for_examples(cls, words, example_ids) -> ExampleRNG:
        return cls(np.random.default_rng([*map(int, words), int(g)]) for g in example_ids)

    def __len__(self) -> int:
        return len(self._gens)

    def rows(self, index) -> ExampleRNG:
        """The generators of a subset (slice or index array) of the examples, sharing state."""
        if isinstance(index, slice):
            return ExampleRNG(self._gens[index])
        return ExampleRNG(self._gens[int(i)] for i in np.asarray(index).reshape(-1))

    def _draw(self, method: str, size, *args, **kw) -> np.ndarray:
        size = (len(self._gens),) if size is None else ((size,) if np.isscalar(size) else tuple(size))
        if size[0] != len(self._gens):
            raise AttackError(f"ExampleRNG: size {size} must start with the {len(self._gens)} examples")
        rest = size[1:] or None
        draws = [getattr(g, method)(*args, size=rest, **kw) for g in self._gens]
        return np.stack(draws) if draws else np.empty(size)

    def uniform(self, low=0.0, high=1.0, size=None) -> np.ndarray:
        return self._draw("uniform", size, low, high)

    def integers(self, low, high=None, size=None) -> np.ndarray:
        return self._draw("integers", size, low, high)

    def choice(self, a, size=None) -> np.ndarray:
        return self._draw("choice", size, a)

    def random(self, size=None) -> np.ndarray:
        return self._draw("random", size)

    def normal(self, loc=0.0, scale=1.0, size=None) -> np.ndarray:
        return self._draw("normal", size, loc, scale)
