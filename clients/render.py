"""Plain-text rendering for ``dcsctl``: aligned tables and an audit report's headline table."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Plain aligned columns (numbers right-aligned)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(_is_num(r[i]) for r in cells[1:]) and len(cells) > 1
               for i in range(len(headers))]
    lines = []
    for r in cells:
        lines.append("  ".join(c.rjust(w) if num else c.ljust(w)
                               for c, w, num in zip(r, widths, numeric)).rstrip())
    return "\n".join(lines)


def _is_num(text: str) -> bool:
    try:
        float(text.rstrip("%"))
        return True
    except ValueError:
        return text in ("-", "")


def percent(v: Any) -> str:
    """A fraction as "12.3%", or "-" when it is missing."""
    return "-" if v is None else f"{100 * float(v):.1f}%"


def headline_table(report: dict[str, Any]) -> str:
    """Clean, per-attack and worst-case robust accuracy from a report.json dict: one row per
    attack, one column per ε (``*`` marks the headline ε; fixed-ε attacks such as RP2 get a
    ``fixed`` column)."""
    pkg = report.get("package") or {}
    suite = report.get("suite") or {}
    head = report.get("headline") or {}
    name = pkg.get("name", "model")
    ver = f" v{pkg['version']}" if "version" in pkg else ""
    sha = str(pkg.get("sha256", ""))[:12]
    lines = [f"{name}{ver}" + (f" (sha256 {sha}...)" if sha else "")
             + f", suite {suite.get('name', '?')}, {report.get('n_examples', '?')} examples"
             + f", seed {report.get('seed', '?')}",
             f"clean accuracy: {percent(report.get('clean_accuracy'))}"]
    results = report.get("results", [])
    eps_list = sorted({round(float(r["eps"]), 9) for r in results if not r.get("fixed_eps")}
                      | {round(float(w["eps"]), 9) for w in report.get("worst_case", [])})
    head_eps = round(float(head["eps"]), 9) if head.get("eps") is not None else None
    has_fixed = any(r.get("fixed_eps") for r in results)
    columns = [f"eps={e:g}" + ("*" if e == head_eps else "") for e in eps_list]
    columns += ["fixed"] if has_fixed else []
    rows: dict[str, list[str]] = {}
    for r in results:
        label = str(r.get("label") or r.get("attack"))
        row = rows.setdefault(label, ["-"] * len(columns))
        col = len(columns) - 1 if r.get("fixed_eps") else eps_list.index(round(float(r["eps"]), 9))
        row[col] = percent(r.get("robust_accuracy"))
    worst = ["-"] * len(columns)
    for w in report.get("worst_case", []):
        worst[eps_list.index(round(float(w["eps"]), 9))] = percent(w.get("robust_accuracy"))
    table = [[label, *cells] for label, cells in rows.items()] + [["worst case", *worst]]
    lines.append(format_table(["robust accuracy", *columns], table))
    if head:
        lines.append(f"headline (*): worst-case robust accuracy "
                     f"{percent(head.get('robust_accuracy'))} at eps {head.get('eps', 0):g}")
    for c in report.get("checks", []):
        if c.get("status") == "warn":
            lines.append(f"check {c.get('name')}: WARN {c.get('detail', '')}")
    return "\n".join(lines)
