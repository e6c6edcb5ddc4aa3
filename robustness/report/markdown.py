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
    """Markdown: model | clean | FGSM | BIM | PGD | APGD | Square | worst (accuracy %, at ε)."""
    if not reports:
        raise ValueError("no reports to compare")
    e = pick_eps(reports) if eps is None else float(eps)

    def cell(vals):
        return "—" if not vals else f"{100 * min(vals):.1f}"

    lines = [f"Accuracy (%) at ε = {e:g} (ℓ∞); worst = per-example worst case over all attacks.", "",
             "| model | clean | " + " | ".join(c for c, _ in COLUMNS) + " | worst |",
             "|---|" + "---:|" * (len(COLUMNS) + 2)]
    for r in reports:
        pkg = r.get("package") or {}
        name = pkg.get("name", "model") + (f" v{pkg['version']}" if "version" in pkg else "")
        rows = [x for x in r["results"] if not x["fixed_eps"] and abs(x["eps"] - e) < 1e-9]
        cols = [cell([x["robust_accuracy"] for x in rows if x["attack"] in names]) for _, names in COLUMNS]
        wc = [w["robust_accuracy"] for w in r["worst_case"] if abs(w["eps"] - e) < 1e-9]
        lines.append(f"| {name} | {100 * r['clean_accuracy']:.1f} | " + " | ".join(cols) + f" | {cell(wc)} |")
    return "\n".join(lines) + "\n"
