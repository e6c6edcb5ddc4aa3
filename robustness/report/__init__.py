"""Reports: ``Report`` (schema in ``schema.py``), ``write_report`` (report.json + self-contained
report.html with embedded PNG figures) and the Markdown comparison table.

matplotlib is imported only inside ``write_report``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from dcs.robustness.manifest import atomic_write_text
from dcs.robustness.report.markdown import comparison_table
from dcs.robustness.report.schema import SCHEMA_VERSION, Report, strip_nondeterministic

JSON_NAME = "report.json"
HTML_NAME = "report.html"


def write_report(report: Report, out_dir: str | Path, *, oracle: Any = None,
                 x: np.ndarray | None = None) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.html`` into ``out_dir`` (created); returns both paths.

    ``oracle``: when it has ``probe`` (``has_probe`` True), the HTML adds first-layer feature-map
    spectra, front-end activation histograms and filter pictures. ``x``: clean inputs, used only
    when the report carries no samples.
    """
    from dcs.robustness.report import html as H
    from dcs.robustness.report import plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    d = report.to_dict()
    figs = plots.figures(report, oracle=oracle, x=x)
    json_path, html_path = out / JSON_NAME, out / HTML_NAME
    atomic_write_text(json_path, json.dumps(d, indent=2, sort_keys=False) + "\n")
    atomic_write_text(html_path, H.render(d, figs))
    return json_path, html_path


def load_report(path: str | Path) -> dict:
    """Read a report.json; raises ValueError naming the file on a wrong schema version."""
    path = Path(path)
    d = json.loads(path.read_text())
    ver = str(d.get("schema_version", ""))
    if ver.split(".")[0] != SCHEMA_VERSION.split(".")[0]:
        raise ValueError(f"{path}: report schema_version {ver!r}, this tool reads {SCHEMA_VERSION}")
    return d


__all__ = [
    "HTML_NAME",
    "JSON_NAME",
    "SCHEMA_VERSION",
    "Report",
    "comparison_table",
    "load_report",
    "strip_nondeterministic",
    "write_report",
]
