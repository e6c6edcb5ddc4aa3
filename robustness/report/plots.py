"""Report figures as PNG bytes (matplotlib, Agg backend; imported only when writing a report)."""
from __future__ import annotations

import io
from typing import Any

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def accuracy_vs_eps(report) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    series: dict[str, list[tuple[float, float]]] = {}
    for r in report.results:
        if not r["fixed_eps"]:
            series.setdefault(r["label"], []).append((r["eps"], r["robust_accuracy"]))
    for label, pts in series.items():
        pts = [(0.0, report.clean_accuracy)] + sorted(pts)
        ax.plot(*zip(*pts), marker="o", ms=3, label=label)
    if report.worst_case:
        pts = [(0.0, report.clean_accuracy)] + [(w["eps"], w["robust_accuracy"]) for w in report.worst_case]
        ax.plot(*zip(*pts), "k--", lw=2, label="worst case")
    ax.set_xlabel("ε (ℓ∞, pixel units in [0,1])")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    ax.set_title("Robust accuracy vs ε")
    return _png(fig)


def _as_dict(report) -> dict:
    if isinstance(report, dict):
        return report
    return report.to_dict()


def certified_methods(report) -> list[str]:
    """Certification methods with numbers in the report (issue 27: "ibp", "crown"), ibp first."""
    cert = _as_dict(report).get("certified") or {}
    got = {c.get("method", "ibp") for c in cert.get("per_eps", []) if c.get("certified_accuracy") is not None}
    return sorted(got, key=lambda m: (m != "ibp", m))


def certified_series(report, method: str | None = None) -> dict[str, Any] | None:
    """Curves of one report for ``certified_vs_empirical``: None when it has no certified numbers.

    Returns ``{"eps", "certified", "empirical", "unstable"}`` (lists over ε, with ε = 0 prepended:
    certified = empirical = clean accuracy there; unstable = None where not computed).
    ``method``: which certification method's rows (default: the first of ``certified_methods``).
    """
    d = _as_dict(report)
    cert = d.get("certified") or {}
    methods = certified_methods(d)
    method = method if method is not None else (methods[0] if methods else None)
    rows = [c for c in cert.get("per_eps", []) if c.get("certified_accuracy") is not None
            and c.get("method", "ibp") == method]
    if cert.get("status") != "ok" or not rows:
        return None
    rows = sorted(rows, key=lambda c: c["eps"])
    wc = {round(w["eps"], 9): w["robust_accuracy"] for w in d.get("worst_case", [])}
    clean = d["clean_accuracy"]
    eps = [c["eps"] for c in rows]
    out = {"eps": eps, "certified": [c["certified_accuracy"] for c in rows],
           "empirical": [c.get("empirical_robust_accuracy", wc.get(round(c["eps"], 9))) for c in rows],
           "unstable": [c.get("unstable_fraction") for c in rows]}
    if eps[0] > 0:
        out["eps"] = [0.0] + out["eps"]
        out["certified"] = [clean] + out["certified"]
        out["empirical"] = [clean] + out["empirical"]
        out["unstable"] = [None] + out["unstable"]
    return out


def certified_vs_empirical(reports, labels: list[str] | None = None, *, title: str | None = None,
                           path: str | None = None) -> bytes:
    """"Certified vs empirical robust accuracy vs ε" as PNG bytes (also written to ``path``).

    ``reports``: one report or a list (``Report`` objects or report.json dicts, e.g. from
    ``dcs.robustness.report.load_report``), each with a ``certified`` section. Per report: certified
    accuracy (solid, a provable lower bound), empirical worst-case robust accuracy over the
    attacks (dashed, an upper bound), the shaded interval between them, and, for polarizing
    models, the unstable front-end activation fraction (dotted, right axis). ``labels`` default to
    the package name (and version). Reports without certified numbers are left out; ValueError
    if none has any.
    """
    plt = _plt()
    if isinstance(reports, (dict,)) or hasattr(reports, "to_dict"):
        reports = [reports]
    dicts = [_as_dict(r) for r in reports]
    if labels is None:
        labels = []
        for d in dicts:
            pkg = d.get("package") or {}
            labels.append(str(pkg.get("name", "model")) + (f" v{pkg['version']}" if "version" in pkg else ""))
    if len(labels) != len(dicts):
        raise ValueError(f"{len(labels)} labels for {len(dicts)} reports")
    series = [(lab, [(m, certified_series(d, m)) for m in certified_methods(d)]) for lab, d in zip(labels, dicts)]
    series = [(lab, [(m, s) for m, s in per if s is not None]) for lab, per in series]
    series = [(lab, per) for lab, per in series if per]
    if not series:
        raise ValueError("no report has certified numbers (run a suite with a certify entry on a "
                         "package with model.bounds.onnx)")
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax2 = None
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = {"ibp": "-", "crown": "-."}
    for k, (lab, per) in enumerate(series):
        col = colors[k % len(colors)]
        for m, s in per:  # one certified curve per method (issue 27), the empirical one once
            e = np.asarray(s["eps"], float)
            cert = np.asarray(s["certified"], float)
            name = "certified" if len(per) == 1 and m == "ibp" else f"certified ({m.upper()})"
            ax.plot(e, cert, styles.get(m, ":"), color=col, marker="o", ms=3, label=f"{lab}: {name}")
        m, s = per[-1]
        e = np.asarray(s["eps"], float)
        cert = np.asarray(s["certified"], float)
        emp = np.asarray([np.nan if v is None else v for v in s["empirical"]], float)
        if np.isfinite(emp).any():
            ax.plot(e, emp, "--", color=col, marker="s", ms=3, label=f"{lab}: empirical (attacks)")
            ok = np.isfinite(emp)
            ax.fill_between(e[ok], cert[ok], emp[ok], color=col, alpha=0.12)
        unst = [(a, u) for a, u in zip(s["eps"], s["unstable"]) if u is not None]
        if unst:
            ax2 = ax2 or ax.twinx()
            ax2.plot(*zip(*unst), ":", color=col, marker="^", ms=3, label=f"{lab}: unstable activations")
    ax.set_xlabel("ε (ℓ∞, pixel units in [0,1])")
    ax.set_ylabel("robust accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    handles, labs = ax.get_legend_handles_labels()
    if ax2 is not None:
        ax2.set_ylabel("unstable front-end activation fraction")
        ax2.set_ylim(-0.02, 1.02)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labs = handles + h2, labs + l2
    ax.legend(handles, labs, fontsize=7, loc="best")
    ax.set_title(title or "Certified vs empirical robust accuracy vs ε")
    png = _png(fig)
    if path is not None:
        from pathlib import Path

        Path(path).write_bytes(png)
    return png


def log_spectrum(a: np.ndarray) -> np.ndarray:
    """Mean log-magnitude 2-D FFT (centred) over all leading axes of [..., H, W]."""
    f = np.fft.fftshift(np.fft.fft2(np.asarray(a, np.float64)), axes=(-2, -1))
    mag = np.log(np.abs(f) + 1e-6)
    return mag.reshape(-1, *mag.shape[-2:]).mean(0)


def spectra(x: np.ndarray, x_adv: np.ndarray, feat: np.ndarray | None, feat_adv: np.ndarray | None,
            title: str) -> bytes:
    plt = _plt()
    rows = [("input", x, x_adv)] + ([("first-layer maps", feat, feat_adv)] if feat is not None else [])
    fig, axes = plt.subplots(len(rows), 3, figsize=(11, 3.2 * len(rows)), squeeze=False)
    for i, (name, a, b) in enumerate(rows):
        sa, sb, sd = log_spectrum(a), log_spectrum(b), log_spectrum(b - a)
        lo, hi = min(sa.min(), sb.min()), max(sa.max(), sb.max())
        for j, (s, t) in enumerate(((sa, "clean"), (sb, "adversarial"), (sd, "perturbation"))):
            im = axes[i, j].imshow(s, cmap="viridis", vmin=lo if j < 2 else None, vmax=hi if j < 2 else None)
            axes[i, j].set_title(f"{name}: {t}", fontsize=9)
            axes[i, j].axis("off")
            fig.colorbar(im, ax=axes[i, j], fraction=0.046)
    fig.suptitle(f"log |FFT| ({title})", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def activation_histogram(z: np.ndarray, z_adv: np.ndarray | None) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    lo = float(min(z.min(), z_adv.min() if z_adv is not None else z.min()))
    hi = float(max(z.max(), z_adv.max() if z_adv is not None else z.max()))
    bins = np.linspace(lo, hi, 80)
    ax.hist(z.ravel(), bins=bins, alpha=0.6, density=True, label="clean")
    if z_adv is not None:
        ax.hist(z_adv.ravel(), bins=bins, alpha=0.6, density=True, label="adversarial")
    ax.set_yscale("log")
    ax.set_xlabel("front-end activation z")
    ax.legend()
    ax.set_title("Front-end activations")
    return _png(fig)


def filters(weights: np.ndarray) -> bytes:
    plt = _plt()
    w = np.asarray(weights)
    w = w.reshape(w.shape[0], -1, *w.shape[-2:])[:, 0] if w.ndim == 4 else w
    k = len(w)
    cols = int(np.ceil(np.sqrt(k)))
    rows = int(np.ceil(k / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.2 * cols, 1.2 * rows), squeeze=False)
    vmax = float(np.abs(w).max()) or 1.0
    for i, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if i < k:
            ax.imshow(w[i], cmap="bwr", vmin=-vmax, vmax=vmax)
    fig.suptitle("First-layer filters", fontsize=10)
    return _png(fig)


def _show(ax, img: np.ndarray) -> None:
    img = np.asarray(img)
    if img.shape[0] == 1:
        ax.imshow(img[0], cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(np.clip(np.transpose(img[:3], (1, 2, 0)), 0, 1))
    ax.set_xticks([])
    ax.set_yticks([])


def example_grid(x: np.ndarray, y: np.ndarray, clean_pred: np.ndarray,
                 rows: list[tuple[str, np.ndarray, np.ndarray]], names: list[str] | None) -> bytes:
    plt = _plt()
    k = len(x)
    nm = (lambda i: names[int(i)] if names and int(i) < len(names) else str(int(i)))
    fig, axes = plt.subplots(1 + len(rows), k, figsize=(1.3 * k + 1.2, 1.45 * (1 + len(rows))), squeeze=False)
    all_rows = [("clean", x, clean_pred)] + rows
    for r, (label, imgs, pred) in enumerate(all_rows):
        for c in range(k):
            ax = axes[r, c]
            _show(ax, imgs[c])
            ok = int(pred[c]) == int(y[c])
            ax.set_title(nm(pred[c]), fontsize=8, color="green" if ok else "red")
        axes[r, 0].set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center")
    fig.suptitle("Examples (title: predicted label; red = wrong)", fontsize=9, y=1.0)
    fig.tight_layout()
    return _png(fig)


def figures(report, oracle: Any = None, x: np.ndarray | None = None) -> list[tuple[str, str, bytes]]:
    """[(id, caption, png)] for every plot the report supports."""
    out = [("accuracy_vs_eps", "Robust accuracy vs ε per attack (dashed: worst case over attacks)",
            accuracy_vs_eps(report))]
    if certified_series(report) is not None:
        caption = ("Certified (solid, provable lower bound) vs empirical (dashed, worst case over "
                   "attacks) robust accuracy vs ε; the true robust accuracy lies in the shaded "
                   "interval. Dotted, right axis: fraction of unstable front-end activations "
                   "(polarizing models)")
        out.append(("certified_vs_empirical", caption, certified_vs_empirical(report)))
    xs = report.x_samples if report.x_samples is not None else x
    if xs is None or not report.samples:
        return out
    e = report.headline["eps"]
    at_head = [(label, s) for (label, eps), s in report.samples.items() if abs(eps - e) < 1e-9]
    # strongest attack at the headline ε for the spectra
    by_acc = {r["label"]: r["robust_accuracy"] for r in report.results if abs(r["eps"] - e) < 1e-9}
    cand = [(by_acc.get(label, 1.0), label, s) for label, s in at_head if label.lower() != "noise"] or \
        [(by_acc.get(label, 1.0), label, s) for label, s in at_head]
    if cand:
        _, label, s = min(cand, key=lambda t: (t[0], t[1]))
        x_adv = s["x_adv"][: len(xs)]
        xs = xs[: len(x_adv)]
        feat = feat_adv = z = z_adv = w = None
        if oracle is not None and getattr(oracle, "has_probe", False):
            p0, p1 = oracle.probe(xs), oracle.probe(x_adv)
            feat, feat_adv = p0.get("features"), p1.get("features")
            z, z_adv = p0.get("z"), p1.get("z")
            w = p0.get("weights")
        out.append(("spectra", f"log-magnitude FFT, clean vs {label} at ε={e:g} "
                    + ("(input and first-layer feature maps)" if feat is not None else "(input; the package has no probe)"),
                    spectra(xs, x_adv, feat, feat_adv, f"{label}, ε={e:g}")))
        if z is not None:
            out.append(("activations", f"front-end activation histogram, clean vs {label}", activation_histogram(z, z_adv)))
        if w is not None:
            out.append(("filters", "first-layer filters", filters(w)))
    n_img = min(int(report.suite.get("n_images", 8)), len(xs))
    order = {r["label"]: i for i, r in enumerate(report.results)}
    keys = sorted(report.samples, key=lambda k: (order.get(k[0], 0), k[1]))
    grid_rows = [(f"{label}\nε={eps:g}", report.samples[(label, eps)]["x_adv"][:n_img],
                  report.samples[(label, eps)]["pred"][:n_img]) for label, eps in keys]
    if grid_rows:
        out.append(("examples", f"example adversarial images at ε={e:g} (and fixed-ε attacks)",
                    example_grid(xs[:n_img], report.y_samples[:n_img], report.clean_pred_samples[:n_img],
                                 grid_rows, report.class_names)))
    return out
