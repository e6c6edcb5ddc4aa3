"""Cost of the adaptive audit (issue 25): the quick suite on a polarizing package as before
issue 25 (the package seen without its surrogate family: straight-through only, no calibration),
and with ``adaptive: true`` (gradient attacks across the package's BPDA surrogate family, after a
calibration run), side by side; plus ``adaptive: false`` on the full package (straight-through
attacks, but calibration and the ``surrogate_sensitivity`` check run).

Target: the adaptive audit costs at most 3x the pre-issue-25 one (wall time). The rows also give
the gradient-count ratio and the robust accuracies at ε=0.1.

Package: ``DCS_BENCH_ADAPTIVE_PACKAGE`` (a trained polarizing package, e.g. the demo's
``polarizing``; scored against the true Fashion-MNIST labels) or, by default, an untrained
pfe_cnn with a polarizing front end exported once into the bench cache (scored against its own
predictions, so every example starts correct). On the untrained model the tanh members break
almost everything at once, so its ratio is a lower bound of what a trained model costs; the
demo-model ratio is in results/README.md.
"""
from __future__ import annotations

import gzip
import logging
import os
import time
from pathlib import Path

import numpy as np

from bench.common import FMNIST_DIR, Row, Sizes, _run_py, cache_dir, fmnist_test

log = logging.getLogger("bench")
TARGET = 3.0


def _package() -> tuple[Path, bool]:
    """(package dir, trained?)."""
    env = os.environ.get("DCS_BENCH_ADAPTIVE_PACKAGE")
    if env:
        return Path(env), True
    cache = cache_dir() / "repo-adaptive-v1"
    pkg = cache / "polarizing" / "1"
    if not (pkg / "model.grad.smooth.onnx").exists():
        log.info("exporting an untrained polarizing pfe_cnn with its surrogate family into %s", cache)
        _run_py("from dcs.training.export.fixtures import export_untrained\n"
                f"export_untrained({str(cache)!r}, 'polarizing', arch='pfe_cnn', defense='pfe', "
                "input_shape=(1, 28, 28), num_classes=10, seed=0, version=1, force=True)\n")
    return pkg, False


def _labels(n: int) -> np.ndarray | None:
    path = FMNIST_DIR / "t10k-labels-idx1-ubyte.gz"
    if not path.exists():
        return None
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=8)[:n].astype(np.int64)


def bench_adaptive(repo: Path, sizes: Sizes) -> list[Row]:
    from dcs.robustness.audit import audit
    from dcs.robustness.package import SessionOptions, load_package
    from dcs.robustness.suites import PRESETS

    path, trained = _package()
    pkg = load_package(path, SessionOptions(device=sizes.device, intra_op_threads=1, load_bounds=False))
    n = 200 if sizes.full else (20 if sizes.mode == "smoke" else 100)
    x = fmnist_test(n)
    y = _labels(n) if trained else None
    if y is None:
        y = pkg.logits(x).argmax(1).astype(np.int64)
    out = {}
    for key, oracle, adaptive in (("old", _NoFamily(pkg), False), ("st", pkg, False), ("ad", pkg, True)):
        suite = PRESETS["quick"].replace(adaptive=adaptive)
        t0 = time.perf_counter()
        rep = audit(oracle, x, y, suite, seed=0)
        out[key] = (time.perf_counter() - t0, rep.to_dict())
    (w_st, st), (w_ad, ad), (_, st_only) = out["old"], out["ad"], out["st"]
    ratio = w_ad / w_st if w_st else None
    g_ratio = ad["totals"]["gradients"] / max(1, st["totals"]["gradients"])
    sec = ad.get("adaptive") or {}
    cal = sec.get("calibration") or {}
    accs = ", ".join(f"{k} {100 * v:.1f}%" for k, v in (cal.get("robust_accuracy") or {}).items())
    what = f"{'trained package ' + str(path) if trained else 'untrained polarizing pfe_cnn'}, {n} F-MNIST images"
    sens = next((c["status"] for c in st_only["checks"] if c["name"] == "surrogate_sensitivity"), "-")
    return [
        Row("adaptive", "quick suite wall, adaptive / pre-issue-25 (straight-through)", w_ad, w_st, ratio,
            target=f"<= {TARGET:g}x", passed=None if ratio is None else ratio <= TARGET, unit="s",
            note=(f"{what}; gradients {ad['totals']['gradients']} vs {st['totals']['gradients']} "
                  f"({g_ratio:.2f}x); kept {cal.get('kept')}, dropped {cal.get('dropped')}; calibration "
                  f"PGD at ε={cal.get('eps')}: {accs}"),
            extra={"gradients_ratio": g_ratio, "kept": cal.get("kept"), "calibration": cal}),
        Row("adaptive", "robust accuracy ε=0.1, adaptive (reference: straight-through)",
            ad["headline"]["robust_accuracy"], st["headline"]["robust_accuracy"],
            None, note=(f"clean {st['clean_accuracy']:.3f}; surrogate_sensitivity on the "
                        f"straight-through audit (adaptive: false): {sens}; its wall "
                        f"{out['st'][0]:.1f} s")),
    ]


class _NoFamily:
    """The package as a pre-issue-25 oracle: logits and the straight-through twin, no family."""

    def __init__(self, pkg) -> None:
        self._pkg = pkg
        self.num_classes, self.input_shape, self.bounds = pkg.num_classes, pkg.input_shape, pkg.bounds

    def logits(self, x):
        return self._pkg.logits(x)

    def loss_grad(self, x, y):
        return self._pkg.loss_grad(x, y)
