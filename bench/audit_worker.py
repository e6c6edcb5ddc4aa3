"""What-if for benchmark 5: the same PGD audit work in its own process instead of a server thread.

``python -m bench.audit_worker PACKAGE_DIR SECONDS`` runs PGD (ε=0.001, nothing is fooled, so
every step is a gradient batch of 128) on the package's ORT gradient twin with one intra-op
thread for about SECONDS, then prints the gradient examples it computed.
"""
from __future__ import annotations

import sys
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from dcs.robustness.attacks import build
    from dcs.robustness.package import SessionOptions, load_package

    pkg = load_package(argv[0], SessionOptions(device="cpu", intra_op_threads=1,
                                               load_bounds=False, load_probe=False))
    seconds = float(argv[1])
    x = np.random.default_rng(0).random((128, *pkg.input_shape), dtype=np.float32)
    y = pkg.logits(x).argmax(1)
    atk = build("pgd", eps=0.001, steps=20, batch_size=128)
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    grads, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds and grads < 10**8:
        grads += atk.run(pkg, x, y, rng=np.random.default_rng(grads)).gradients
    sys.stdout.write(f"{grads}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
