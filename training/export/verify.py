"""Check an exported package: twin vs served graph, and both vs the torch model of its run."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dcs.robustness.manifest import PackageError
from dcs.robustness.package import ModelPackage, SessionOptions, load_package

log = logging.getLogger(__name__)

LOGITS_ATOL = 1e-4
GRAD_REL_TOL = 1e-3
GRAD_MIN_COS = 0.999
BOUNDS_EPS = 0.03
BOUNDS_TOL = 1e-5


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def grad_agreement(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    """``(relative error of the gradient norm, cosine similarity)`` over the whole batch."""
    g, w = got.reshape(-1).astype(np.float64), want.reshape(-1).astype(np.float64)
    ng, nw = float(np.linalg.norm(g)), float(np.linalg.norm(w))
    if nw == 0.0:
        return (0.0, 1.0) if ng == 0.0 else (float("inf"), 0.0)
    cos = float(g @ w / (ng * nw)) if ng > 0 else 0.0
    return abs(ng - nw) / nw, cos


def _inputs(pkg: ModelPackage, batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.random((batch, *pkg.input_shape), dtype=np.float32)
    y = rng.integers(0, pkg.num_classes, size=batch, dtype=np.int64)
    return x, y


def _torch_checks(pkg: ModelPackage, run_dir: Path, x: np.ndarray, y: np.ndarray) -> list[Check]:
    import torch

    from dcs.training.export.twin import bpda, reference_loss_grad
    from dcs.training.runs import load_trained

    run = load_trained(run_dir)
    checks = [Check("run matches manifest (labels, input shape)",
                    list(run.class_names) == pkg.labels and tuple(run.input_shape) == pkg.input_shape,
                    f"run {list(run.input_shape)}/{len(run.class_names)} classes, "
                    f"package {list(pkg.input_shape)}/{pkg.num_classes}")]
    grad_info = pkg.manifest["gradient"]
    use_bpda = grad_info.get("kind") == "bpda"
    with bpda(run.model, enabled=use_bpda) as layers:
        ref_logits, ref_grad = reference_loss_grad(run.model, torch.from_numpy(x), torch.from_numpy(y))
    checks.append(Check("BPDA layers match manifest", sorted(layers) == sorted(grad_info.get("bpda_layers", [])),
                        f"run {layers}, manifest {grad_info.get('bpda_layers')}"))
    diff = float(np.abs(pkg.logits(x) - ref_logits.numpy()).max())
    checks.append(Check("ORT logits == torch logits", diff <= LOGITS_ATOL,
                        f"max abs diff {diff:.2e} (≤ {LOGITS_ATOL:g})"))
    _, grad = pkg.loss_grad(x, y)
    rel, cos = grad_agreement(grad, ref_grad.numpy())
    checks.append(Check(f"twin gradient == torch autograd ({grad_info.get('kind')})",
                        rel <= GRAD_REL_TOL and cos >= GRAD_MIN_COS,
                        f"norm rel err {rel:.2e} (≤ {GRAD_REL_TOL:g}), cosine {cos:.6f} (≥ {GRAD_MIN_COS})"))
    return checks


def _bounds_checks(pkg: ModelPackage, x: np.ndarray, seed: int, eps: float = BOUNDS_EPS,
                   samples: int = 8) -> list[Check]:
    logits = pkg.logits(x)
    lo, hi = pkg.logit_bounds(x, 0.0)
    diff = float(max(np.abs(lo - logits).max(), np.abs(hi - logits).max()))
    out = [Check("bounds at eps=0 == model logits", diff <= LOGITS_ATOL,
                 f"max abs diff {diff:.2e} (≤ {LOGITS_ATOL:g})")]
    lo, hi = pkg.logit_bounds(x, eps)
    rng = np.random.default_rng(seed + 1)
    worst = 0.0
    for _ in range(samples):
        xp = np.clip(x + eps * rng.choice([-1.0, 1.0], x.shape), 0, 1).astype(np.float32)
        z = pkg.logits(xp)
        worst = max(worst, float((lo - z).max()), float((z - hi).max()))
    out.append(Check(f"logits inside bounds (eps={eps:g}, {samples} corners)", worst <= BOUNDS_TOL,
                     f"worst excess {worst:.2e} (≤ {BOUNDS_TOL:g}); mean width {float((hi - lo).mean()):.3g}"))
    if pkg.has_crown:  # issue 27: margin lower bounds, sound at the same corners, ≥ the interval margins
        y = logits.argmax(1)
        n = np.arange(len(y))
        m = pkg.margin_bounds(x, y, eps)
        ibp = lo[n, y][:, None] - hi
        ibp[n, y] = 0.0
        rng = np.random.default_rng(seed + 1)
        excess = 0.0
        for _ in range(samples):
            xp = np.clip(x + eps * rng.choice([-1.0, 1.0], x.shape), 0, 1).astype(np.float32)
            z = pkg.logits(xp)
            excess = max(excess, float((m - (z[n, y][:, None] - z)).max()))
        looser = float((ibp - m).max())
        scale = max(1.0, float(np.abs(lo).max()), float(np.abs(hi).max()))  # float32 rounding of big bounds
        out.append(Check(f"margins above crown bounds (eps={eps:g}, {samples} corners), crown ≥ interval",
                         excess <= BOUNDS_TOL * scale and looser <= BOUNDS_TOL * scale,
                         f"worst excess {excess:.2e}, worst shortfall vs interval {looser:.2e} (≤ {BOUNDS_TOL:g})"))
    return out


def verify_package(package_dir: str | Path, run_dir: str | Path | None = None, batch: int = 7,
                   seed: int = 0) -> list[Check]:
    """Run every check; never raises for a failed check (a failed load is a failed check)."""
    try:
        pkg = load_package(package_dir, SessionOptions(device="cpu"))
    except PackageError as exc:
        return [Check("package loads (sha256, manifest, graph I/O)", False, str(exc))]
    checks = [Check("package loads (sha256, manifest, graph I/O)", True,
                    f"{pkg.name} v{pkg.version} sha256 {pkg.sha256[:12]} on {pkg.provider}")]
    x, y = _inputs(pkg, batch, seed)
    logits = pkg.logits(x)
    twin_logits, grad = pkg.loss_grad(x, y)
    diff = float(np.abs(logits - twin_logits).max())
    checks.append(Check("twin logits == model logits", diff <= LOGITS_ATOL,
                        f"max abs diff {diff:.2e} (≤ {LOGITS_ATOL:g})"))
    finite = bool(np.isfinite(grad).all() and np.isfinite(logits).all())
    checks.append(Check("outputs finite, gradient shape", finite and grad.shape == x.shape,
                        f"grad {list(grad.shape)}"))
    if pkg.has_probe:
        probe = pkg.probe(x)
        checks.append(Check("probe outputs", "features" in probe and "weights" in probe,
                            ", ".join(f"{k} {list(v.shape)}" for k, v in probe.items())))
    if pkg.has_bounds:
        checks.extend(_bounds_checks(pkg, x, seed))
    if run_dir is not None:
        try:
            checks.extend(_torch_checks(pkg, Path(run_dir), x, y))
        except Exception as exc:  # a broken run is reported as a failed check, not a traceback
            log.debug("torch checks failed", exc_info=True)
            checks.append(Check("torch run loads", False, f"{type(exc).__name__}: {exc}"))
    return checks


def format_table(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"{'check':<{width}}  result  detail", f"{'-' * width}  ------  ------"]
    lines += [f"{c.name:<{width}}  {'PASS' if c.ok else 'FAIL':<6}  {c.detail}" for c in checks]
    return "\n".join(lines)
