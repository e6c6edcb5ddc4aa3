"""Transfer attack: adversarial examples crafted on a *source* oracle, scored on the target.

Threat model: black-box on the target (no target gradients, one target query to score), white-box
on the source. Parameters (defaults): eps 0.1; source (an oracle with ``loss_grad``; required);
attack (the inner attack run on the source; default PGD with 10 steps); targeted False;
batch_size 128. Gradients reported are those spent on the source. The inner attack keeps its own
early-stopping rule on the source; the target sees one candidate per example.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from dcs.robustness.attacks.base import Attack, AttackError, Capabilities
from dcs.robustness.attacks.pgd import PGD
from dcs.robustness.oracle import has_gradients


@dataclass(frozen=True)
class Transfer(Attack):
    """Craft on ``source`` with ``attack``, evaluate on the oracle given to ``run``."""

    name: ClassVar[str] = "transfer"
    capabilities: ClassVar[Capabilities] = Capabilities(
        targeted=True, needs_gradients=False, needs_source=True)

    source: Any = None
    attack: Attack = field(default_factory=PGD)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.source is None or not has_gradients(self.source):
            raise AttackError("transfer: needs a source oracle with loss_grad (param 'source')")

    def gradient_cost(self, n: int) -> int:
        return self.attack.gradient_cost(n)

    def query_cost(self, n: int) -> int:
        return 3 * n

    def _perturb(self, oracle, x, y, target, rng, track) -> None:
        # The source run sees the whole batch (its random stream must not depend on which
        # examples already fool the target); only still-open examples are scored on the target.
        inner = self.attack.with_params(eps=self.eps, batch_size=self.batch_size,
                                        targeted=self.targeted)
        res = inner.run(self.source, x, y, rng=rng, target=target)
        track.extra_gradients += res.gradients
        idx = track.active
        xa = self._project(x[idx], res.x_adv[idx])
        track.offer(idx, xa, oracle.logits(xa))
