"""report.json + report.html: schema, self-contained HTML referencing every plot, Markdown table."""
from __future__ import annotations

import base64
import json
from html.parser import HTMLParser

import numpy as np
import pytest

from dcs.robustness.attacks.toy_oracles import ArrayOracle
from dcs.robustness.audit import audit
from dcs.robustness.report import comparison_table, load_report, write_report
from dcs.robustness.testing import fit_mlp, load_digits_nchw

PNG = b"\x89PNG\r\n\x1a\n"


class Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.figures: list[str] = []
        self.images: list[str] = []
        self.external: list[str] = []
        self.stack: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "figure":
            self.figures.append(a.get("id", ""))
        if tag == "img":
            self.images.append(a.get("src", ""))
        for key in ("src", "href"):
            v = a.get(key)
            if v and not v.startswith(("data:", "#")):
                self.external.append(v)


class ProbeOracle(ArrayOracle):
    """A digits MLP that also answers ``probe`` like a polarizing package (features, z, weights)."""

    has_probe = True

    def probe(self, x):
        w1 = self.model.w1.T.reshape(-1, 1, 8, 8)[:6]
        feats = np.einsum("nchw,kchw->nk", x, w1)[:, :, None, None] * np.ones((1, 1, 4, 4), np.float32)
        return {"features": feats.astype(np.float32), "z": x.reshape(len(x), -1) @ self.model.w1[:, :6],
                "weights": w1}


@pytest.fixture(scope="module")
def model():
    xtr, ytr, xte, yte = load_digits_nchw()
    return fit_mlp(xtr, ytr, 10), xte[:60], yte[:60]


def parse(path) -> Collect:
    c = Collect()
    c.feed(path.read_text(encoding="utf-8"))
    c.close()
    return c


def test_html_parses_and_references_every_plot(model, tmp_path):
    w, x, y = model
    oracle = ProbeOracle(w, 10, (1, 8, 8))
    rep = audit(oracle, x, y, "quick", seed=0, class_names=[str(i) for i in range(10)])
    j, h = write_report(rep, tmp_path / "out", oracle=oracle)
    assert j.name == "report.json" and h.name == "report.html"
    c = parse(h)
    assert set(c.figures) == {"fig-accuracy_vs_eps", "fig-spectra", "fig-activations", "fig-filters", "fig-examples"}
    assert len(c.images) == len(c.figures)
    for src in c.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG)
    assert c.external == [], "report.html must be self-contained"
    text = h.read_text()
    for check in rep.checks:
        assert check["name"] in text
    d = load_report(j)
    assert d == json.loads(json.dumps(rep.to_dict()))


def test_html_without_probe_has_core_plots(model, tmp_path):
    w, x, y = model
    oracle = ArrayOracle(w, 10, (1, 8, 8))
    rep = audit(oracle, x, y, "quick", seed=0)
    _, h = write_report(rep, tmp_path)
    assert set(parse(h).figures) == {"fig-accuracy_vs_eps", "fig-spectra", "fig-examples"}


def test_package_report_names_the_artifact(digits_repo, tmp_path):
    from dcs.robustness.package import load_package

    pkg = load_package(digits_repo / "digits-mlp" / "1")
    _, _, xte, yte = load_digits_nchw()
    rep = audit(pkg, xte[:30], yte[:30], "quick", seed=0)
    assert rep.package["sha256"] == pkg.sha256 and rep.package["grad_sha256"] == pkg.grad_sha256
    _, h = write_report(rep, tmp_path, oracle=pkg)
    assert pkg.sha256 in h.read_text()


def test_comparison_table(model):
    w, x, y = model
    a = audit(ArrayOracle(w, 10, (1, 8, 8)), x, y, "quick", seed=0, package_info={"name": "a", "version": 1}).to_dict()
    b = json.loads(json.dumps(a))
    b["package"] = {"name": "b", "version": 2}
    t = comparison_table([a, b])
    lines = t.strip().splitlines()
    assert lines[2] == "| model | clean | FGSM | BIM | PGD | APGD | Square | worst |"
    assert lines[4].startswith("| a v1 | ") and lines[5].startswith("| b v2 | ")
    pgd = next(r for r in a["results"] if r["attack"] == "pgd" and r["eps"] == 0.1)
    assert f"{100 * pgd['robust_accuracy']:.1f}" in lines[4].split("|")[5]
    assert "ε = 0.1" in t
    assert comparison_table([a], eps=0.123).count("—") == 6  # no results at that ε: dashes
    with pytest.raises(ValueError):
        comparison_table([])
