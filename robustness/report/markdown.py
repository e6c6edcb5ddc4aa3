"""Comparison table across reports, in the papers' style (rows: models; columns: attacks)."""
from __future__ import annotations

from collections.abc import Sequence

COLUMNS = (("FGSM", ("fgsm",)), ("BIM", ("bim",)), ("PGD", ("pgd",)), ("APGD", ("apgd-ce", "apgd-dlr")),
           ("Square", ("square",)))


def pick_eps(reports: Sequence[dict]) -> float:
    """The headline ε shared by the reports, else the largest ε they all evaluated."""
    heads = {round(r["headline"]["eps"], 9) for r in reports}
    if len(heads) == 1:
        return heads.pop()
    common = set.intersection(*({round(x["eps"], 9) for x in r["results"] if not x["fixed_eps"]} for r in reports))
    if not common:
        raise ValueError("the reports share no ε; pass one explicitly")
    return max(common)


def comparison_table(reports: Sequence[dict], eps: float | None = None) -> str:
    """Markdown: model | clean | FGSM | BIM | PGD | APGD | Square | worst [| certified] (%, at ε).

    The ``certified`` column (certified robust accuracy, a lower bound; ``dcs.robustness.certify``)
    appears when any report has a ``certified`` section with status "ok"; "—" for the others
    (no certify in the suite, skipped, or not run at this ε).
    """
    if not reports:
        raise ValueError("no reports to compare")
    e = pick_eps(reports) if eps is None else float(eps)

    def cell(vals):
        return "—" if not vals else f"{100 * min(vals):.1f}"

    with_cert = any((r.get("certified") or {}).get("status") == "ok" for r in reports)
    lines = [f"Accuracy (%) at ε = {e:g} (ℓ∞); worst = per-example worst case over all attacks"
             + ("; certified = provable lower bound (interval bounds)" if with_cert else "") + ".", "",
             "| model | clean | " + " | ".join(c for c, _ in COLUMNS) + " | worst |"
             + (" certified |" if with_cert else ""),
             "|---|" + "---:|" * (len(COLUMNS) + 2 + int(with_cert))]
    for r in reports:
        pkg = r.get("package") or {}
        name = pkg.get("name", "model") + (f" v{pkg['version']}" if "version" in pkg else "")
        rows = [x for x in r["results"] if not x["fixed_eps"] and abs(x["eps"] - e) < 1e-9]
        cols = [cell([x["robust_accuracy"] for x in rows if x["attack"] in names]) for _, names in COLUMNS]
        wc = [w["robust_accuracy"] for w in r["worst_case"] if abs(w["eps"] - e) < 1e-9]
        line = f"| {name} | {100 * r['clean_accuracy']:.1f} | " + " | ".join(cols) + f" | {cell(wc)} |"
        if with_cert:
            cert = [c["certified_accuracy"] for c in (r.get("certified") or {}).get("per_eps", [])
                    if abs(c["eps"] - e) < 1e-9 and c.get("certified_accuracy") is not None]
            line += f" {cell(cert)} |"
        lines.append(line)
    notes = [adaptive_note(r) for r in reports if r.get("adaptive")]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def adaptive_note(r: dict) -> str:
    """One line on a report's BPDA surrogate family (``dcs.robustness.adaptive``)."""
    pkg = r.get("package") or {}
    a = r["adaptive"]
    cal = a.get("calibration") or {}
    accs = ", ".join(f"{k} {100 * v:.1f}" for k, v in (cal.get("robust_accuracy") or {}).items())
    how = (f"adaptive: gradient attacks ran through {', '.join(a['used'])} (worst case per example)"
           if a.get("used") else "NOT adaptive: straight-through only")
    return (f"- {pkg.get('name', 'model')}: BPDA surrogates {how}; calibration {cal.get('attack')} at "
            f"ε={cal.get('eps')} on {cal.get('n')} examples: {accs}.")
