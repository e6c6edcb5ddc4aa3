"""``dcs evaluate --shard I/N`` + ``dcs merge`` equal an unsharded ``dcs evaluate`` (torch-free)."""
from __future__ import annotations

import json
import shutil
from itertools import pairwise

import numpy as np
import pytest

from dcs.robustness.audit import audit
from dcs.robustness.package import load_package
from dcs.robustness.report import strip_nondeterministic
from dcs.robustness.shard import ShardError, parse_shard, shard_range
from dcs.robustness.suites import Suite
from dcs.robustness.testing import digits_package, load_digits_nchw
from dcs.training.cli import main

# Covers every random draw the engine makes per example: random starts (uniform), targets
# (integers), Square (choice/integers), RP2 transforms (fixed ε), cascade on survivors, and the
# check runs (large-ε PGD, more steps, noise: no noise entry in the suite). batch_size 4 does not
# divide the shard size 10, so shards batch their examples differently from the unsharded run;
# checks.max_examples 20 < 30 leaves shard 2 with no check examples. The package has a bounds
# twin, so certify runs and its section and consistency check are merged too.
SUITE = {
    "name": "shard-test", "eps": [0.1, 0.2], "headline_eps": 0.1, "batch_size": 4, "cascade": True,
    "attacks": [{"attack": "fgsm", "label": "FGSM"},
                {"attack": "pgd", "label": "PGD", "params": {"steps": 5}},
                {"attack": "pgd", "label": "PGD-T", "params": {"steps": 5, "targeted": True}},
                {"attack": "apgd-dlr", "label": "APGD-DLR", "params": {"steps": 5}},
                {"attack": "square", "label": "Square", "params": {"n_queries": 30}},
                {"attack": "rp2", "label": "RP2", "eps": 1.0, "params": {"steps": 5}},
                {"attack": "certify", "label": "Certified"}],
    "checks": {"steps": 5, "more_steps_factor": 2, "more_restarts": 2, "max_examples": 20},
}
N_SHARDS = 3


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One package, an unsharded evaluation and its 3 shards (same seed)."""
    tmp = tmp_path_factory.mktemp("shards")
    pkg, _ = digits_package(tmp / "repo", name="mlp", seed=0, bounds=True)
    suite = tmp / "suite.json"
    suite.write_text(json.dumps(SUITE))
    common = [str(pkg), "--dataset", "digits", "--limit", "30", "--seed", "5", "--suite", str(suite),
              "--no-progress"]
    assert main(["evaluate", *common, "--out", str(tmp / "full")]) == 0
    for i in range(N_SHARDS):
        assert main(["evaluate", *common, "--shard", f"{i}/{N_SHARDS}", "--out", str(tmp / f"shard-{i}")]) == 0
    return {"tmp": tmp, "pkg": pkg, "common": common,
            "shards": [tmp / f"shard-{i}" / "report.json" for i in range(N_SHARDS)]}


def _json(path):
    return json.loads(path.read_text())


def test_shard_reports_record_shard_and_outcomes(run):
    d = _json(run["shards"][1])
    sh = d["shard"]
    assert (sh["index"], sh["count"], sh["n_total"], sh["dataset"]) == (1, 3, 30, "digits")
    assert sh["example_indices"] == list(range(10, 20)) and d["n_examples"] == 10
    assert d["seed"] == 5 and len(d["package"]["sha256"]) == 64
    oc = sh["outcomes"]
    assert len(oc["y"]) == len(oc["clean_pred"]) == 10
    assert len(oc["results"]) == len(d["results"])
    assert all(len(r["adv_pred"]) == len(r["l2"]) == 10 for r in oc["results"])
    assert oc["checks"]["example_indices"] == list(range(10, 20))
    assert _json(run["shards"][2])["shard"]["outcomes"]["checks"]["example_indices"] == []
    assert "shard" not in _json(run["tmp"] / "full" / "report.json")


def test_three_shards_merged_equal_the_unsharded_report(run, capsys):
    out = run["tmp"] / "merged"
    # folders and report.json files are both accepted; order does not matter
    args = [str(run["shards"][2]), str(run["shards"][0].parent), str(run["shards"][1])]
    assert main(["merge", *args, "--out", str(out)]) == 0
    assert "merged 3 shards" in capsys.readouterr().out
    assert (out / "report.html").is_file()
    full = strip_nondeterministic(_json(run["tmp"] / "full" / "report.json"))
    merged = strip_nondeterministic(_json(out / "report.json"))
    # the parts that matter most, separately for a readable failure, then everything
    assert merged["worst_case"] == full["worst_case"]  # per-example robust masks included
    assert merged["headline"] == full["headline"]
    assert merged["results"] == full["results"]
    assert merged["checks"] == full["checks"]  # recomputed from merged per-example data
    assert merged["certified"] == full["certified"] and full["certified"]["status"] == "ok"
    assert merged["totals"] == full["totals"]
    assert merged == full
    statuses = {c["name"]: c["status"] for c in full["checks"]}
    assert statuses["large_eps_accuracy"] != "skip" and statuses["noise_vs_attacks"] != "skip"
    assert any(r["on_survivors"] for r in full["results"]) and any(r["targeted"] for r in full["results"])


def test_per_example_results_do_not_depend_on_batching(run):
    """The engine's randomness is per (seed, job, example index): batch size changes nothing."""
    _, _, x, y = load_digits_nchw()
    x, y = x[:12], y[:12]
    pkg = load_package(run["pkg"])
    base = Suite.from_dict({**SUITE, "checks": {"enabled": False}})
    a = audit(pkg, x, y, base.replace(batch_size=5), seed=1)
    b = audit(pkg, x, y, base.replace(batch_size=128), seed=1)
    assert a.worst_case == b.worst_case
    for ra, rb in zip(a.outcomes["results"], b.outcomes["results"]):
        np.testing.assert_array_equal(ra["adv_pred"], rb["adv_pred"])
        np.testing.assert_array_equal(ra["l2"], rb["l2"])
    # a slice with its global indices reproduces those examples exactly
    c = audit(pkg, x[7:], y[7:], base, seed=1, example_ids=np.arange(7, 12))
    for ra, rc in zip(a.outcomes["results"], c.outcomes["results"]):
        np.testing.assert_array_equal(ra["adv_pred"][7:], rc["adv_pred"])
        np.testing.assert_array_equal(ra["l2"][7:], rc["l2"])


def test_parse_shard_and_ranges():
    assert parse_shard("0/3") == (0, 3) and parse_shard(" 2 / 3 ") == (2, 3)
    for bad in ("3/3", "-1/3", "1/0", "a/b", "2", ""):
        with pytest.raises(ShardError):
            parse_shard(bad)
    ranges = [shard_range(i, 4, 30) for i in range(4)]
    assert ranges[0][0] == 0 and ranges[-1][1] == 30
    assert all(hi == lo2 for (_, hi), (lo2, _) in pairwise(ranges))
    with pytest.raises(ShardError):
        shard_range(0, 31, 30)


def _one_line_error(capsys, needle):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert needle in err, err
    return err


@pytest.mark.parametrize("spec, needle", [
    ("3/3", "0 <= I < N"), ("-1/3", "0 <= I < N"), ("1/0", "N must be at least 1"),
    ("one/3", "expected I/N"), ("2", "expected I/N"), ("0/31", "at most 30 shards"),
])
def test_bad_shard_specs_fail_with_one_line(run, tmp_path, capsys, spec, needle):
    out = tmp_path / "o"
    assert main(["evaluate", *run["common"], f"--shard={spec}", "--out", str(out)]) == 2
    _one_line_error(capsys, "--shard")
    assert not (out / "report.json").exists()


def test_shard_refuses_into_package(run, tmp_path, capsys):
    assert main(["evaluate", *run["common"], "--shard", "0/3", "--into-package", "--out", str(tmp_path)]) == 2
    _one_line_error(capsys, "--into-package")


def _edited(tmp_path, src, name, edit):
    d = _json(src)
    edit(d)
    path = tmp_path / name
    path.write_text(json.dumps(d))
    return str(path)


def test_merge_refuses_bad_shard_sets(run, tmp_path, capsys):
    s0, s1, s2 = (str(p) for p in run["shards"])
    out = str(tmp_path / "m")

    def refused(paths, needle):
        assert main(["merge", *paths, "--out", out]) == 2
        return _one_line_error(capsys, needle)

    refused([s0, s1], "missing shard(s) 2/3")
    refused([s0, s1, s2, s1], "given twice")
    dup = _edited(tmp_path, run["shards"][1], "dup.json", lambda d: None)
    refused([s0, s1, s2, dup], "overlapping shards")

    def relabel(d):  # shard 2's file claiming to be shard 1 (its examples overlap nothing, index does)
        d["shard"]["index"] = 1
    refused([s0, s1, _edited(tmp_path, run["shards"][2], "relabel.json", relabel)], "overlapping shards")

    def overlap(d):
        d["shard"]["example_indices"][0] = 19
    refused([s0, s1, _edited(tmp_path, run["shards"][2], "overlap.json", overlap)], "both hold example 19")
    refused([s0, s1, _edited(tmp_path, run["shards"][2], "seed.json", lambda d: d.update(seed=6))],
            "different seeds")
    refused([s0, s1, _edited(tmp_path, run["shards"][2], "pkg.json",
                             lambda d: d["package"].update(sha256="0" * 64))], "different package sha256")
    refused([s0, s1, _edited(tmp_path, run["shards"][2], "suite.json",
                             lambda d: d["suite"].update(batch_size=8))], "different suites")
    refused([s0, s1, _edited(tmp_path, run["shards"][2], "data.json",
                             lambda d: d["shard"].update(dataset="fmnist"))], "different datasets")
    refused([s0, s1, str(run["tmp"] / "full" / "report.json")], "not a shard report")
    refused([s0, s1, str(tmp_path / "nowhere")], "no such shard report")
    assert not (tmp_path / "m" / "report.json").exists()


def test_merge_refuses_a_real_shard_from_another_seed(run, tmp_path, capsys):
    other = tmp_path / "seed6"
    common = [a if a != "5" else "6" for a in run["common"]]
    assert main(["evaluate", *common, "--shard", "2/3", "--out", str(other)]) == 0
    capsys.readouterr()
    shutil.copy(run["shards"][0], tmp_path / "s0.json")
    assert main(["merge", str(tmp_path / "s0.json"), str(run["shards"][1]), str(other),
                 "--out", str(tmp_path / "m")]) == 2
    _one_line_error(capsys, "different seeds")
