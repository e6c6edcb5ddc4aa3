"""``dcs evaluate``: attack one or more model packages with a suite and write report.json/html.

    dcs evaluate PACKAGE_DIR [PACKAGE_DIR ...] --dataset NAME [--data-dir D]
        [--suite quick|standard|paper|FILE] [--eps 0.1,0.2] [--limit N] [--seed S]
        [--out DIR] [--into-package] [--batch-size B] [--transfer-from PACKAGE_DIR]
        [--no-progress] [--shard I/N]

Arguments, packages, output folders and the dataset are all checked before any attack runs.
With one package the report goes to ``--out``; with several, to ``--out/<name>-v<version>``.
Torch-free: it runs the ONNX package through ONNX Runtime.

``--shard I/N`` attacks only shard I (0 <= I < N) of the (limited) test set of N_ex examples: the
contiguous global indices [floor(I*N_ex/N), floor((I+1)*N_ex/N)). Every example's random numbers
depend only on (seed, job, global index), so each example gets exactly the numbers the unsharded
run gives it; the shard report adds a ``shard`` section with the per-example outcomes, and
``dcs merge`` combines the N shard reports into the unsharded report (``dcs.robustness.shard``).
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def add_parser(sub) -> None:
    from dcs.robustness.suites import PRESETS

    p = sub.add_parser("evaluate", help="attack model packages and write report.json + report.html",
                       description=__doc__.splitlines()[0])
    p.add_argument("packages", nargs="+", metavar="PACKAGE_DIR", help="model package folder(s)")
    p.add_argument("--dataset", required=True, help="dataset name for data.load_dataset (e.g. digits, fmnist)")
    p.add_argument("--data-dir", default=None, help="dataset folder, when the dataset needs one")
    p.add_argument("--suite", default="quick", help=f"preset ({', '.join(PRESETS)}) or a .yaml/.json suite file")
    p.add_argument("--eps", default=None, help="comma-separated ε sweep overriding the suite's, e.g. 0.1,0.2")
    p.add_argument("--limit", type=int, default=None, help="attack at most N test examples")
    p.add_argument("--seed", type=int, default=0, help="audit seed (recorded in the report)")
    p.add_argument("--batch-size", type=int, default=None, help="examples per oracle call")
    p.add_argument("--transfer-from", action="append", default=[], metavar="PACKAGE_DIR",
                   help="add a transfer attack (PGD crafted on this package); repeatable")
    p.add_argument("--out", default="reports", help="output folder (default: reports)")
    p.add_argument("--into-package", action="store_true", help="also write report.json/html into each package")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="attack only shard I of N (0 <= I < N): a contiguous slice of the test set; "
                        "combine the N shard reports with dcs merge")
    p.set_defaults(run=run)


def parse_eps(text: str) -> tuple[float, ...]:
    from dcs.training.cli import CLIError

    try:
        vals = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise CLIError(f"--eps {text!r}: expected comma-separated numbers such as 0.1,0.2") from None
    if not vals or any(not 0.0 <= v <= 1.0 for v in vals):
        raise CLIError(f"--eps {text!r}: expected one or more values in [0, 1]")
    return vals


def load_test_data(name: str, data_dir: str | None, limit: int | None):
    """(x_test, y_test, class_names) via data; 'digits' falls back to sklearn's 8x8 set."""
    from dcs.training.cli import CLIError

    try:
        from dcs.data import DataError, load_dataset
    except ImportError:
        load_dataset, DataError = None, Exception
    if load_dataset is not None:
        try:
            ds = load_dataset(name, data_dir, limit_test=limit)
            return ds.x_test, ds.y_test, list(ds.class_names)
        except DataError as exc:
            if name != "digits":
                raise CLIError(f"--dataset {name!r}: {exc}") from None
    if name != "digits":
        raise CLIError(f"--dataset {name!r}: data.load_dataset is not available; only 'digits' works")
    from dcs.robustness.testing import load_digits_nchw

    _, _, x, y = load_digits_nchw()
    return x, y, [str(i) for i in range(10)]


def _check_writable(folder: Path) -> None:
    from dcs.training.cli import CLIError

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise CLIError(f"cannot write to {folder}: {exc.strerror or exc}") from None


def run(args: argparse.Namespace) -> int:
    from dcs.robustness.manifest import PackageError
    from dcs.robustness.package import load_package
    from dcs.robustness.suites import SuiteError, get_suite
    from dcs.training.cli import CLIError

    # 1. arguments and suite
    shard = _parse_shard(args)
    if args.limit is not None and args.limit < 1:
        raise CLIError(f"--limit {args.limit}: expected a positive integer")
    if args.batch_size is not None and args.batch_size < 1:
        raise CLIError(f"--batch-size {args.batch_size}: expected a positive integer")
    try:
        suite = get_suite(args.suite)
        suite = suite.replace(eps=parse_eps(args.eps) if args.eps else None,
                              max_examples=args.limit, batch_size=args.batch_size)
    except SuiteError as exc:
        raise CLIError(f"--suite {args.suite!r}: {exc}") from None
    sources = {}
    for d in args.transfer_from:
        try:
            sources[d] = load_package(d)
        except PackageError as exc:
            raise CLIError(f"--transfer-from: {exc}") from None
    if sources:
        from dcs.robustness.suites import AttackSpec

        extra = tuple(AttackSpec("transfer", {"source": d, "attack": "pgd", "attack_params": {"steps": 10}},
                                 label=f"Transfer from {src.name} v{src.version}") for d, src in sources.items())
        suite = suite.replace(attacks=suite.attacks + extra)
    # 2. packages
    packages = []
    for d in args.packages:
        try:
            packages.append(load_package(d))
        except PackageError as exc:
            raise CLIError(str(exc)) from None
    # 3. output folders
    out = Path(args.out)
    targets = []
    for pkg in packages:
        dirs = [out if len(packages) == 1 else out / f"{pkg.name}-v{pkg.version}"]
        if args.into_package:
            dirs.append(Path(pkg.path))
        for folder in dirs:
            _check_writable(folder)
        targets.append(dirs)
    # 4. data
    x, y, names = load_test_data(args.dataset, args.data_dir, args.limit)
    if args.limit is not None:
        x, y = x[: args.limit], y[: args.limit]
    for pkg in packages:
        if tuple(x.shape[1:]) != pkg.input_shape:
            raise CLIError(f"{pkg.path}: model input {list(pkg.input_shape)} but dataset {args.dataset!r} "
                           f"has examples of shape {list(x.shape[1:])}")
        if int(y.max()) >= pkg.num_classes:
            raise CLIError(f"{pkg.path}: {pkg.num_classes} classes but dataset labels reach {int(y.max())}")
    ids = None
    if shard is not None:
        from dcs.robustness.shard import ShardError, shard_range

        try:
            lo, hi = shard_range(shard[0], shard[1], len(x))
        except ShardError as exc:
            raise CLIError(str(exc)) from None
        n_total, x, y, ids = len(x), x[lo:hi], y[lo:hi], np.arange(lo, hi)
    # 5. the expensive part
    reports = []
    for pkg, dirs in zip(packages, targets):
        rep = _evaluate_one(pkg, x, y, names, suite, args, sources, ids)
        if shard is not None:
            from dcs.robustness.shard import shard_section

            rep.shard = shard_section(rep, shard[0], shard[1], n_total, args.dataset)
        reports.append(rep.to_dict())
        written = []
        from dcs.robustness.report import write_report

        for folder in dirs:
            j, h = write_report(rep, folder, oracle=pkg)
            written += [str(j), str(h)]
        _summary(rep, written)
    if len(reports) > 1:
        from dcs.robustness.report import comparison_table

        sys.stdout.write("\n" + comparison_table(reports))
    return 0


def _parse_shard(args) -> tuple[int, int] | None:
    from dcs.robustness.shard import ShardError, parse_shard
    from dcs.training.cli import CLIError

    if args.shard is None:
        return None
    try:
        shard = parse_shard(args.shard)
    except ShardError as exc:
        raise CLIError(str(exc)) from None
    if args.into_package:
        raise CLIError("--into-package: a shard report covers part of the test set; merge the shards "
                       "(dcs merge) instead")
    return shard


def _evaluate_one(pkg, x, y, names, suite, args, sources, ids=None):
    from dcs.robustness.audit import AuditError, audit
    from dcs.training.cli import CLIError

    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=1, desc=f"{pkg.name} v{pkg.version}", unit="ex", file=sys.stderr, dynamic_ncols=True)

    def on_progress(ev) -> None:
        if bar is None:
            return
        bar.total = ev.units_total
        bar.n = ev.units_done
        ra = "—" if ev.robust_accuracy_so_far is None else f"{100 * ev.robust_accuracy_so_far:.1f}%"
        bar.set_postfix_str(f"{ev.attack} ε={ev.eps:g} robust {ra}", refresh=False)
        bar.refresh()

    try:
        return audit(pkg, x, y, suite, seed=args.seed, progress=on_progress, package_info=pkg.describe(),
                     class_names=names, sources=sources, example_ids=ids)
    except AuditError as exc:
        raise CLIError(f"{pkg.path}: {exc}") from None
    finally:
        if bar is not None:
            bar.close()


def _summary(rep, written) -> None:
    d = rep.to_dict()
    pkg = d["package"]
    head = d["headline"]
    sh = d.get("shard")
    lines = [(f"{pkg.get('name')} v{pkg.get('version')} (sha256 {str(pkg.get('sha256', ''))[:12]})"
              + ("" if sh is None else f", shard {sh['index']}/{sh['count']}: {d['n_examples']} of "
                 f"{sh['n_total']} examples; checks below are for this shard only")
              + ": "
              f"clean {100 * d['clean_accuracy']:.1f}%, worst-case robust "
              f"{100 * (head['robust_accuracy'] or 0):.1f}% at ε={head['eps']:g}")]
    cert = d.get("certified")
    if cert is not None and cert["status"] != "ok":
        lines.append(f"  certified: skipped ({cert['reason']})")
    for c in (cert or {}).get("per_eps", []):
        emp = c["empirical_robust_accuracy"]
        unst = c.get("unstable_fraction")
        how = f" ({c['method']})" if len((cert or {}).get("methods") or []) > 1 else ""
        lines.append(f"  certified{how} at ε={c['eps']:g}: {100 * c['certified_accuracy']:.1f}% "
                     f"(robust accuracy in [{100 * c['certified_accuracy']:.1f}, "
                     f"{'—' if emp is None else f'{100 * emp:.1f}'}]%)"
                     + ("" if unst is None else f", unstable front-end activations {100 * unst:.2f}%"))
    for c in d["checks"]:
        lines.append(f"  [{c['status'].upper():4}] {c['name']}: {c['detail']}")
    lines += [f"  wrote {p}" for p in written]
    sys.stdout.write("\n".join(lines) + "\n")
