"""The attack contract: ``Attack.run`` owns batching, projection, counting and timing.

Subclasses implement ``_perturb(oracle, x, y, target, rng, track)`` for one batch and never
override ``run``. Everything is numpy; the oracle is the only way to reach the model.

Early-stopping semantics (the same for every attack)
----------------------------------------------------
For each example the attack keeps a *record* (``Tracker``): the returned ``x_adv`` is

* the **first iterate at which the example was adversarial** (untargeted: predicted label != y;
  targeted: predicted label == target), if any iterate ever was; the clean input counts as
  iterate 0, so an example the model already gets wrong is returned unchanged;
* otherwise the iterate the attack itself prefers (the last iterate, or the highest-loss one for
  attacks that say so in their docstring).

Once an example is adversarial its record can no longer change, so the attack stops spending
queries on it. Stopping it therefore changes neither ``x_adv`` nor ``success``: results with and
without early stopping are identical (bit for bit on an oracle whose per-example output does not
depend on the batch it came in; ``Attack.early_stop=False`` exists to test exactly this). Random numbers are drawn for the whole batch at every step
(and then indexed by the still-active examples), so the random stream does not depend on which
examples stopped. Results are reproducible for a fixed ``rng`` seed and ``batch_size``; with an
``ExampleRNG`` (one generator per example, what ``dcs.robustness.audit`` passes) they do not depend
on ``batch_size`` or on the other examples in the batch either.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from dcs.robustness.attacks.errors import AttackError, BudgetExceeded, Stopped
from dcs.robustness.attacks.rng import ExampleRNG
from dcs.robustness.oracle import ScoreOnlyView, has_gradients, surrogate_view

__all__ = ["Attack", "AttackError", "AttackResult", "Budget", "BudgetExceeded", "Capabilities", "CountingOracle",
           "ExampleRNG", "Stopped", "Tracker", "cross_entropy", "margin", "predict_success", "project"]


@dataclass(frozen=True)
class Capabilities:
    """What an attack needs and supports; tests and suites read this, not the class names.

    norm: 'linf' (the ε-ball) or 'mask' (ℓ∞ ε-ball intersected with a pixel mask).
    targeted: a target label may be given. needs_gradients: calls ``loss_grad``.
    score_only: calls ``logits`` only (runs through ``ScoreOnlyView``).
    needs_source: crafts on a second oracle (transfer). iterative: more than one gradient step.
    control: a baseline, not an attack (random noise).
    """

    norm: str = "linf"
    targeted: bool = False
    needs_gradients: bool = True
    score_only: bool = False
    needs_source: bool = False
    iterative: bool = True
    control: bool = False


@dataclass
class AttackResult:
    """Outcome of one run. Arrays are per example, in input order.

    x_adv: float32 [N, C, H, W] in [0, 1] and within ε of x. logits: oracle logits of x_adv.
    success: bool [N] (untargeted: argmax != y; targeted: argmax == target).
    queries: examples sent to ``logits`` (including the final scoring pass); gradients: examples
    sent to ``loss_grad``; wall_s: seconds.
    """

    x_adv: np.ndarray
    logits: np.ndarray
    success: np.ndarray
    queries: int
    gradients: int
    wall_s: float

    @property
    def pred(self) -> np.ndarray:
        return self.logits.argmax(1)


class CountingOracle:
    """Counts examples sent to ``logits``/``loss_grad`` and enforces an optional shared budget."""

    def __init__(self, oracle: Any, budget: Budget | None = None) -> None:
        self._oracle = oracle
        self.num_classes = int(oracle.num_classes)
        self.input_shape = tuple(oracle.input_shape)
        self.bounds = tuple(getattr(oracle, "bounds", (0.0, 1.0)))
        self.queries = 0
        self.gradients = 0
        self._budget = budget
        if has_gradients(oracle):
            self.loss_grad = self._loss_grad  # only reachable when the oracle has it

    def logits(self, x: np.ndarray) -> np.ndarray:
        if self._budget is not None:
            self._budget.spend(queries=len(x))
        self.queries += len(x)
        return np.asarray(self._oracle.logits(np.ascontiguousarray(x, np.float32)), np.float32)

    def _loss_grad(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._budget is not None:
            self._budget.spend(gradients=len(x))
        self.gradients += len(x)
        lg, g = self._oracle.loss_grad(np.ascontiguousarray(x, np.float32), np.asarray(y, np.int64))
        return np.asarray(lg, np.float32), np.asarray(g, np.float32)


class Budget:
    """A gradient/query allowance shared by every run of an audit (``None`` = unlimited)."""

    def __init__(self, max_gradients: int | None = None, max_queries: int | None = None) -> None:
        self.max_gradients = max_gradients
        self.max_queries = max_queries
        self.gradients = 0
        self.queries = 0

    def spend(self, *, gradients: int = 0, queries: int = 0) -> None:
        if self.max_gradients is not None and self.gradients + gradients > self.max_gradients:
            raise BudgetExceeded(f"gradient budget of {self.max_gradients} examples is spent "
                                 f"({self.gradients} used, {gradients} more requested)")
        if self.max_queries is not None and self.queries + queries > self.max_queries:
            raise BudgetExceeded(f"query budget of {self.max_queries} examples is spent "
                                 f"({self.queries} used, {queries} more requested)")
        self.gradients += gradients
        self.queries += queries


def project(x: np.ndarray, x_adv: np.ndarray, eps: float, mask: np.ndarray | None = None) -> np.ndarray:
    """Project into {|x_adv - x|∞ <= eps} ∩ [0,1] (∩ {x_adv = x outside ``mask``})."""
    out = np.clip(np.clip(x_adv, x - eps, x + eps), 0.0, 1.0)
    if mask is not None:
        out = np.where(mask, out, x)
    return out.astype(np.float32)


def predict_success(logits: np.ndarray, y: np.ndarray, target: np.ndarray | None) -> np.ndarray:
    pred = logits.argmax(1)
    return pred == target if target is not None else pred != y


class Tracker:
    """Per-example records implementing the early-stopping semantics in the module docstring.

    ``early_stop=False`` (a test hook, ``Attack.early_stop``) keeps every example in the working
    set; records of examples already adversarial are still never replaced, which is exactly why
    stopping them early cannot change the result.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, target: np.ndarray | None,
                 clean_logits: np.ndarray, early_stop: bool = True) -> None:
        self.x0 = x
        self.y = y
        self.target = target
        self.x_best = x.copy()
        self.logits = clean_logits.copy()
        self.done = predict_success(clean_logits, y, target)
        self.early_stop = early_stop
        self.extra_gradients = 0  # gradients spent on another oracle (transfer)

    @property
    def active(self) -> np.ndarray:
        """Indices of examples the attack should keep working on."""
        return np.flatnonzero(~self.done) if self.early_stop else np.arange(len(self.done))

    def offer(self, idx: np.ndarray, x_new: np.ndarray, logits: np.ndarray,
              keep: np.ndarray | None = None) -> np.ndarray:
        """Offer iterates for examples ``idx``. The first adversarial iterate is frozen as record.

        ``keep`` (bool per offered example) says whether a non-adversarial iterate replaces the
        record (default: yes, i.e. the record is the last iterate). Returns a bool mask over
        ``idx`` of the examples the attack may drop from its working set from now on.
        """
        tgt = self.target[idx] if self.target is not None else None
        ok = predict_success(logits, self.y[idx], tgt)
        open_ = ~self.done[idx]
        replace = open_ & (ok if keep is None else (ok | keep))
        sel = idx[replace]
        self.x_best[sel] = x_new[replace]
        self.logits[sel] = logits[replace]
        self.done[idx[ok & open_]] = True
        return self.done[idx] if self.early_stop else np.zeros(len(idx), bool)


def margin(logits: np.ndarray, y: np.ndarray, target: np.ndarray | None = None) -> np.ndarray:
    """Loss to *minimise*: untargeted z_y - max_{j!=y} z_j; targeted max_{j!=t} z_j - z_t."""
    z = logits.astype(np.float64)
    n = np.arange(len(z))
    lab = target if target is not None else y
    other = z.copy()
    other[n, lab] = -np.inf
    m = z[n, lab] - other.max(1)
    return -m if target is not None else m


def cross_entropy(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(1, keepdims=True)
    return np.log(np.exp(z).sum(1)) - z[np.arange(len(z)), y]


@dataclass(frozen=True)
class Attack:
    """Base of every attack. Frozen: build a fresh instance per run (``with_params``).

    eps: ℓ∞ radius in [0, 1] pixel units. targeted: use the ``target`` labels passed to ``run``.
    batch_size: examples per oracle call (the engine splits larger inputs).
    early_stop: drop examples once adversarial (default True; False only to test that it
    changes nothing). surrogate: for an oracle that declares a family of BPDA backward
    surrogates (``oracle.surrogates``), the member to take gradients through (None: the
    oracle's default twin); see ``dcs.robustness.adaptive``.
    """

    name: ClassVar[str] = "attack"
    capabilities: ClassVar[Capabilities] = Capabilities()

    eps: float = 0.1
    targeted: bool = False
    batch_size: int = 128
    early_stop: bool = True  # test hook: False must give identical results, only slower
    surrogate: str | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.eps) <= 1.0:
            raise AttackError(f"{self.name}: eps={self.eps!r}, expected a number in [0, 1]")
        if self.batch_size < 1:
            raise AttackError(f"{self.name}: batch_size={self.batch_size!r}, expected >= 1")
        if self.targeted and not self.capabilities.targeted:
            raise AttackError(f"{self.name}: targeted=True but this attack is untargeted only")

    def with_params(self, **changes: Any) -> Attack:
        return dataclasses.replace(self, **changes)

    def params(self) -> dict[str, Any]:
        """JSON-friendly parameters (for report.json)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Attack):
                v = {"attack": v.name, **v.params()}
            elif isinstance(v, np.ndarray):
                v = f"array{list(v.shape)}"
            elif not isinstance(v, (int, float, str, bool, type(None), list, tuple)):
                v = type(v).__name__
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    def gradient_cost(self, n: int) -> int:
        """Upper bound on gradient examples for ``n`` inputs (for budgets)."""
        return 0

    def query_cost(self, n: int) -> int:
        """Upper bound on logits examples for ``n`` inputs (for budgets)."""
        return 2 * n

    # -- the contract ------------------------------------------------------------------------
    def run(self, oracle: Any, x: np.ndarray, y: np.ndarray, *, rng: np.random.Generator,
            target: np.ndarray | None = None, budget: Budget | None = None,
            should_stop: Callable[[], bool] | None = None,
            on_batch: Callable[[int, int], None] | None = None) -> AttackResult:
        """Attack ``x`` [N, *input_shape] float32 in [0,1] with labels ``y`` [N] int.

        Projects every output into the ε-ball ∩ [0,1] (∩ the attack's mask), counts queries and
        gradients, and times the run. ``on_batch(done, total)`` is called after each batch and
        ``should_stop()`` is polled before each one (raises ``Stopped``).
        """
        if not isinstance(rng, (np.random.Generator, ExampleRNG)):
            raise AttackError(f"{self.name}: rng must be a numpy.random.Generator or ExampleRNG, "
                              f"got {type(rng).__name__}")
        if isinstance(rng, ExampleRNG) and len(rng) != len(x):
            raise AttackError(f"{self.name}: ExampleRNG for {len(rng)} examples but {len(x)} inputs")
        x = np.ascontiguousarray(x, dtype=np.float32)
        y = np.asarray(y, dtype=np.int64).reshape(-1)
        if len(x) != len(y):
            raise AttackError(f"{self.name}: {len(x)} inputs but {len(y)} labels")
        if x.size and (x.min() < 0.0 or x.max() > 1.0):
            raise AttackError(f"{self.name}: inputs must lie in [0, 1], got [{x.min():.3g}, {x.max():.3g}]")
        if self.targeted and target is None:
            raise AttackError(f"{self.name}: targeted=True needs target labels")
        if target is not None:
            target = np.asarray(target, dtype=np.int64).reshape(-1)
            if len(target) != len(y):
                raise AttackError(f"{self.name}: {len(target)} targets for {len(y)} labels")
        if not self.targeted:
            target = None
        if self.capabilities.needs_gradients and not has_gradients(oracle):
            raise AttackError(f"{self.name}: needs loss_grad but the oracle offers logits only")
        if self.surrogate is not None and self.capabilities.needs_gradients:
            try:
                oracle = surrogate_view(oracle, self.surrogate)
            except ValueError as exc:
                raise AttackError(f"{self.name}: {exc}") from None
        view = ScoreOnlyView(oracle) if self.capabilities.score_only else oracle
        counted = CountingOracle(view, budget)
        start = time.perf_counter()
        x_adv = np.empty_like(x)
        logits = np.empty((len(x), counted.num_classes), np.float32)
        extra = 0
        for lo in range(0, len(x), self.batch_size):
            if should_stop is not None and should_stop():
                raise Stopped(f"{self.name}: stopped after {lo} of {len(x)} examples")
            sl = slice(lo, lo + self.batch_size)
            xb, yb = x[sl], y[sl]
            tb = target[sl] if target is not None else None
            # One child generator per batch: the stream inside a batch never depends on how
            # many draws an earlier batch made after its examples stopped early.
            # ExampleRNG: each example keeps its own generator (independent of batching).
            batch_rng = (rng.rows(sl) if isinstance(rng, ExampleRNG)
                         else np.random.default_rng(rng.integers(0, 2**63 - 1)))
            mask = self._mask(xb)
            clean_logits = counted.logits(xb)
            track = Tracker(xb, yb, tb, clean_logits, self.early_stop)
            if len(track.active):
                self._perturb(counted, xb, yb, tb, batch_rng, track)
            extra += track.extra_gradients
            out = project(xb, track.x_best, float(self.eps), mask)
            x_adv[sl] = out
            logits[sl] = counted.logits(out)  # score what is returned, after projection
            if on_batch is not None:
                on_batch(min(lo + self.batch_size, len(x)), len(x))
        success = predict_success(logits, y, target)
        return AttackResult(x_adv=x_adv, logits=logits, success=success, queries=counted.queries,
                            gradients=counted.gradients + extra,
                            wall_s=time.perf_counter() - start)

    # -- hooks for subclasses ----------------------------------------------------------------
    def _mask(self, x: np.ndarray) -> np.ndarray | None:
        """Pixels the attack may change (bool, broadcastable to x), or None for all."""
        return None

    def _perturb(self, oracle: CountingOracle, x: np.ndarray, y: np.ndarray,
                 target: np.ndarray | None, rng: np.random.Generator, track: Tracker) -> None:
        raise NotImplementedError

    # -- helpers -----------------------------------------------------------------------------
    def _project(self, x: np.ndarray, x_adv: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        return project(x, x_adv, float(self.eps), mask)

    @staticmethod
    def _loss_grad(oracle: CountingOracle, x: np.ndarray, y: np.ndarray,
                   target: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(logits, loss to maximise, its gradient): CE(y) untargeted, -CE(target) targeted."""
        if target is not None:
            lg, g = oracle.loss_grad(x, target)
            return lg, -cross_entropy(lg, target), -g
        lg, g = oracle.loss_grad(x, y)
        return lg, cross_entropy(lg, y), g
