"""The extension points docs/architecture.md names are real: its worked examples run here."""
from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from dcs.robustness.attacks import REGISTRY, AttackError, register
from dcs.robustness.audit import audit
from dcs.robustness.package import load_package
from dcs.robustness.suites import AttackSpec, CheckConfig, Suite
from dcs.robustness.testing import load_digits_nchw

DOC = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"


def _section(title: str) -> str:
    text = DOC.read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def _python_block(section: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 1, "the worked example is one python block"
    return blocks[0]


@pytest.fixture()
def mifgsm():
    """Execute the documented attack module, then remove it from the registry again."""
    module = types.ModuleType("docs_mifgsm")
    sys.modules[module.__name__] = module
    code = compile(_python_block(_section("Adding an attack")), str(DOC), "exec", dont_inherit=True)
    try:
        exec(code, module.__dict__)  # noqa: S102 - the documented example, from our own docs
        yield module.MIFGSM
    finally:
        REGISTRY.pop("mifgsm", None)
        sys.modules.pop(module.__name__, None)


def test_documented_attack_registers_and_runs_in_a_suite(mifgsm, digits_repo):
    assert REGISTRY["mifgsm"] is mifgsm
    pkg = load_package(digits_repo / "digits-mlp" / "1")
    _, _, x, y = load_digits_nchw()
    x, y = x[:100], y[:100]
    suite = Suite(name="ext", attacks=(AttackSpec("mifgsm", {"steps": 5}),), eps=(0.2,),
                  checks=CheckConfig(enabled=False))
    report = audit(pkg, x, y, suite, seed=0).to_dict()
    row = next(r for r in report["results"] if r["attack"] == "mifgsm")
    assert row["robust_accuracy"] < report["clean_accuracy"] - 0.3


def test_documented_attack_stays_in_the_eps_ball(mifgsm, digits_repo):
    pkg = load_package(digits_repo / "digits-mlp" / "1")
    _, _, x, y = load_digits_nchw()
    res = mifgsm(eps=0.1, steps=4).run(pkg, x[:50], y[:50], rng=np.random.default_rng(0))
    assert np.abs(res.x_adv - x[:50]).max() <= 0.1 + 1e-6
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    assert res.gradients <= 4 * 50


def test_register_refuses_a_taken_name(mifgsm):
    clash = type("Clash", (mifgsm,), {"__module__": __name__})
    with pytest.raises(AttackError, match="already registered"):
        register(clash)


def test_documented_defense_touch_points_exist():
    """The `tv` walk-through names real code: config kind, flag, penalty, trainer, twin tests."""
    from dcs.training.config import DEFENSES, DefenseSpec
    from dcs.training.defenses import tv_penalty

    section = _section("Adding a defense")
    assert "tv" in DEFENSES and DefenseSpec(kind="tv").tv_alpha == 1e-4
    root = DOC.parent.parent
    assert "--tv-alpha" in (root / "training/commands/train.py").read_text()
    assert "tv_penalty(" in (root / "training/trainer.py").read_text()
    assert "\"tv\"" in (root / "tests/test_twin_families.py").read_text()
    for path in re.findall(r"`((?:training|tests)/[\w/]+\.py)`", section):
        assert (root / path).is_file(), path
    assert callable(tv_penalty)
