"""``make test-deps``: install the built wheel the way users do, outside the repository, and test it.

Every environment is a fresh venv in a temporary folder, and the tests run from a copy of
``tests/`` there, so nothing can import from the checkout. Steps (``--only`` picks some):

``build``       ``python -m build``: a wheel and an sdist. The wheel must hold every module of the
                mapped folders (``dcs.*``), the protobuf stubs and .proto files, the three console
                scripts, and no tests.
``floors``      ``[server,client,test]`` with every direct dependency pinned to its declared floor
                (``==X`` for each ``>=X`` in pyproject.toml), then the torch-free server, client and
                engine tests and each console script's ``--help``.
``latest``      the same extras at the newest releases, no constraints, plus the newest
                ``tritonclient[grpc]`` (which pins ``protobuf<7``), then the same tests and a real
                ``tritonclient`` call against ``dcs-server``.
``neighbours``  ``[client]`` beside ``proto-plus`` (import name ``proto``) and a distribution that
                installs top-level ``server``, ``training`` and ``clients`` modules: each imports
                its own code.
``train``       ``[train]`` with ``constraints.txt`` (the training install line): ``dcs train`` a PFE on
                the 8x8 digits, ``dcs export`` it with its gradient twin, ``dcs verify`` the package.
``extras``      the resolver's install set (``pip install --dry-run --report``) for ``[server]``
                and ``[server-gpu]``: exactly one onnxruntime distribution in each.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
DIST = "defended-classifier-service"
#: Folders the wheel maps into ``dcs.*`` (pyproject.toml [tool.setuptools.package-dir]).
MAPPED = {"data": "dcs/data", "proto": "dcs/proto", "robustness": "dcs/robustness",
          "server": "dcs/server", "clients": "dcs/clients", "training": "dcs/training"}
SCRIPTS = ("dcs", "dcs-server", "dcsctl")
#: Torch-free tests: server, client and attack engine (run in the floors and latest venvs).
TORCH_FREE_TESTS = (
    "test_answers.py", "test_attacks.py", "test_batcher.py", "test_checks.py", "test_client_cli.py",
    "test_client_images.py", "test_client_lib.py", "test_interceptor.py", "test_metrics.py",
    "test_package_loader.py", "test_padding.py", "test_report.py", "test_server.py",
    "test_server_audit.py",
)
PYTEST_INI = """[pytest]
addopts = -ra -m "not slow" -p no:cacheprovider
markers =
    slow: long runs
    gpu: needs a CUDA device
timeout = 300
filterwarnings = ignore::DeprecationWarning
"""


def log(msg: str) -> None:
    print(f"[test-deps {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd: list[str], *, cwd: Path | None = None, env: dict | None = None,
        capture: bool = False) -> subprocess.CompletedProcess:
    """Run ``cmd``; a failure raises with its output (the last 4,000 characters)."""
    res = subprocess.run(cmd, cwd=cwd, env=env, text=True, check=False,
                         capture_output=capture or None)
    if res.returncode != 0:
        tail = ((res.stdout or "") + (res.stderr or ""))[-12000:]
        raise SystemExit(f"FAILED ({res.returncode}): {' '.join(map(str, cmd))}\n{tail}")
    return res


def clean_env() -> dict:
    """The environment for a user's venv: no PYTHONPATH, no user site, not inside the repo."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PYTHONNOUSERSITE="1", PIP_DISABLE_PIP_VERSION_CHECK="1", OMP_NUM_THREADS="1")
    return env


class Venv:
    """A fresh virtual environment under ``parent``."""

    def __init__(self, parent: Path, name: str) -> None:
        self.path = parent / name
        run([sys.executable, "-m", "venv", str(self.path)])
        self.python = self.path / "bin" / "python"
        self.pip_install("--upgrade", "pip")

    def pip_install(self, *args: str) -> None:
        run([str(self.python), "-m", "pip", "install", "-q", *args], env=clean_env(),
            cwd=self.path)

    def versions(self) -> dict[str, str]:
        out = run([str(self.python), "-m", "pip", "list", "--format=json"], capture=True,
                  env=clean_env(), cwd=self.path).stdout
        return {canon(p["name"]): p["version"] for p in json.loads(out)}

    def py(self, code: str, *, cwd: Path) -> str:
        return run([str(self.python), "-c", code], cwd=cwd, env=clean_env(), capture=True).stdout


def same_version(a: str, b: str | None) -> bool:
    """``1.60 == 1.60.0`` (release segments compared with trailing zeros dropped)."""
    def key(v: str) -> list[str]:
        parts = v.split(".")
        while len(parts) > 1 and parts[-1] == "0":
            parts.pop()
        return parts
    return b is not None and key(a) == key(b)


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(extras: tuple[str, ...]) -> list[str]:
    """Direct requirements of the base and ``extras``, self-references expanded."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out, todo, seen = list(meta["dependencies"]), list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for req in meta["optional-dependencies"][extra]:
            m = re.fullmatch(rf"{DIST}\[([\w,-]+)\]", req.strip())
            if m:
                todo.extend(m.group(1).split(","))
            else:
                out.append(req)
    return out


def floor_constraints(extras: tuple[str, ...]) -> dict[str, str]:
    """``{distribution: floor}`` for every ``name[extra]>=X`` requirement of ``extras``."""
    floors: dict[str, str] = {}
    for req in requirements(extras):
        spec = req.split(";")[0].strip()
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[\w,]+\])?>=([\w.]+)(?:,.*)?", spec)
        if not m:
            raise SystemExit(f"pyproject.toml: {req!r} has no '>=' floor; every dependency needs one")
        name, floor = canon(m.group(1)), m.group(2)
        if name in floors and floors[name] != floor:
            raise SystemExit(f"pyproject.toml: {name} has two floors ({floors[name]}, {floor})")
        floors[name] = floor
    return floors


def build(work: Path) -> tuple[Path, Path]:
    """Build the wheel and sdist from the checkout into ``work/dist`` and check the wheel."""
    out = work / "dist"
    run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)], capture=True)
    wheel, sdist = next(out.glob("*.whl")), next(out.glob("*.tar.gz"))
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"{MAPPED[p.relative_to(ROOT).parts[0]]}/{'/'.join(p.relative_to(ROOT).parts[1:])}"
                for folder in MAPPED for p in (ROOT / folder).rglob("*.py")
                if "__pycache__" not in p.parts}
    expected |= {"dcs/__init__.py", "dcs/proto/classifier.proto", "dcs/proto/grpc_predict_v2.proto",
                 "dcs/proto/classifier_pb2.pyi"}
    missing = sorted(expected - names)
    if missing:
        raise SystemExit(f"wheel lacks {len(missing)} files, e.g. {missing[:5]}")
    stray = sorted(n for n in names if n.startswith(("tests/", "bench/", "scripts/"))
                   or "/tests/" in n or not n.startswith(("dcs/", f"{DIST.replace('-', '_')}-")))
    if stray:
        raise SystemExit(f"wheel holds files outside dcs/: {stray[:5]}")
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry).decode()
    for script in SCRIPTS:
        if not re.search(rf"^{re.escape(script)} = dcs\.", scripts, re.MULTILINE):
            raise SystemExit(f"wheel's entry_points.txt lacks {script}: {scripts}")
    log(f"built {wheel.name} ({len(names)} files, {wheel.stat().st_size // 1024} KiB) "
        f"and {sdist.name}")
    return wheel, sdist


def copy_tests(work: Path) -> Path:
    """A copy of tests/ beside a pytest.ini, outside the repository."""
    dest = work / "t"
    shutil.copytree(ROOT / "tests", dest / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    (dest / "pytest.ini").write_text(PYTEST_INI)
    return dest


PYTEST_EXTRA: list[str] = []


def run_tests(venv: Venv, tests_dir: Path, files: tuple[str, ...], *extra: str) -> None:
    args = [str(venv.python), "-m", "pytest", "-q", *[f"tests/{f}" for f in files], *extra,
            *PYTEST_EXTRA]
    res = run(args, cwd=tests_dir, env=clean_env(), capture=True)
    log(res.stdout.strip().splitlines()[-1])


def check_scripts(venv: Venv, cwd: Path) -> None:
    for script in SCRIPTS:
        res = subprocess.run([str(venv.path / "bin" / script), "--help"], cwd=cwd,
                             env=clean_env(), capture_output=True, text=True, check=False)
        if res.returncode != 0 or "usage" not in res.stdout.lower():
            raise SystemExit(f"{script} --help failed ({res.returncode}): {res.stderr[-2000:]}")
    log(f"console scripts answer --help: {', '.join(SCRIPTS)}")


def check_imports_from(venv: Venv, cwd: Path) -> None:
    """Every dcs module the venv imports comes from its site-packages, not from a checkout."""
    where = venv.py("import dcs.server.app, dcs.clients, dcs.robustness.audit, dcs.proto; "
                    "print(dcs.server.app.__file__)", cwd=cwd).strip()
    if "site-packages" not in where:
        raise SystemExit(f"dcs.server imported from {where}, not from the installed wheel")


def step_floors(work: Path, wheel: Path, tests_dir: Path) -> None:
    extras = ("server", "client", "test")
    floors = floor_constraints(extras)
    constraints = work / "floors.txt"
    constraints.write_text("".join(f"{n}=={v}\n" for n, v in sorted(floors.items())))
    venv = Venv(work, "venv-floors")
    venv.pip_install("-c", str(constraints), f"{wheel}[{','.join(extras)}]")
    got = venv.versions()
    wrong = {n: (v, got.get(n)) for n, v in floors.items() if not same_version(v, got.get(n))}
    if wrong:
        raise SystemExit(f"floors not installed as declared: {wrong}")
    log("floors installed: " + ", ".join(f"{n}=={v}" for n, v in sorted(floors.items())))
    check_imports_from(venv, tests_dir)
    check_scripts(venv, tests_dir)
    run_tests(venv, tests_dir, TORCH_FREE_TESTS)


def step_latest(work: Path, wheel: Path, tests_dir: Path) -> None:
    venv = Venv(work, "venv-latest")
    venv.pip_install(f"{wheel}[server,client,test]", "tritonclient[grpc]")
    got = venv.versions()
    log("latest: " + ", ".join(f"{n}=={got[n]}" for n in (
        "protobuf", "grpcio", "onnxruntime", "numpy", "tritonclient") if n in got))
    check_imports_from(venv, tests_dir)
    check_scripts(venv, tests_dir)
    run_tests(venv, tests_dir, (*TORCH_FREE_TESTS, "test_server_process.py"))


NEIGHBOUR = {  # a distribution with the import names our folders would collide on
    "pyproject.toml": '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = '
                      '"setuptools.build_meta"\n[project]\nname = "neighbour-top-level"\n'
                      'version = "1.0"\n[tool.setuptools]\npy-modules = ["server", "training", '
                      '"clients"]\n',
    "server.py": "WHO = 'neighbour'\n", "training.py": "WHO = 'neighbour'\n",
    "clients.py": "WHO = 'neighbour'\n",
}


def step_neighbours(work: Path, wheel: Path, tests_dir: Path) -> None:
    src = work / "neighbour"
    src.mkdir()
    for name, text in NEIGHBOUR.items():
        (src / name).write_text(text)
    venv = Venv(work, "venv-neighbours")
    venv.pip_install("proto-plus", str(src), f"{wheel}[client]")
    out = venv.py(
        "import proto, server, training, clients\n"
        "assert hasattr(proto, 'Message') and hasattr(proto, 'Field'), proto.__file__\n"
        "assert server.WHO == training.WHO == clients.WHO == 'neighbour'\n"
        "from dcs.clients import Client\n"
        "from dcs.proto import classifier_pb2, grpc_predict_v2_pb2\n"
        "class Song(proto.Message):\n"
        "    title = proto.Field(proto.STRING, number=1)\n"
        "assert Song(title='x').title == 'x'\n"
        "assert classifier_pb2.ClassifyRequest(model='m').model == 'm'\n"
        "print(proto.__file__, Client.__module__)\n", cwd=tests_dir)
    log(f"proto-plus and top-level server/training/clients import beside dcs: {out.strip()}")


def step_train(work: Path, wheel: Path) -> None:
    venv = Venv(work, "venv-train")
    venv.pip_install("-c", str(ROOT / "constraints.txt"), f"{wheel}[train]")
    dcs, run_dir = str(venv.path / "bin" / "dcs"), work / "run"
    run([dcs, "train", "--dataset", "digits", "--limit-train", "200", "--limit-test", "50",
         "--defense", "pfe", "--pfe-stages", "1,1,1", "--threads", "1", "--no-progress",
         "--out", str(run_dir)], cwd=work, env=clean_env(), capture=True)
    run([dcs, "export", str(run_dir), "--repo", str(work / "models"), "--name", "pfe"], cwd=work,
        env=clean_env(), capture=True)
    out = run([dcs, "verify", str(work / "models" / "pfe" / "1"), "--run", str(run_dir)], cwd=work,
              env=clean_env(), capture=True).stdout
    log(f"[train]: dcs train, export and verify of a PFE on digits: {out.strip().splitlines()[-1]}")


def step_extras(work: Path, wheel: Path) -> None:
    venv = Venv(work, "venv-extras")
    for extra, want, banned in (("server", "onnxruntime", "onnxruntime-gpu"),
                                ("server-gpu", "onnxruntime-gpu", "onnxruntime")):
        report = work / f"report-{extra}.json"
        run([str(venv.python), "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed",
             "--report", str(report), f"{wheel}[{extra}]"], env=clean_env(), cwd=work)
        names = {canon(i["metadata"]["name"]) for i in json.loads(report.read_text())["install"]}
        if want not in names or banned in names:
            raise SystemExit(f"[{extra}] resolves onnxruntime distributions "
                             f"{sorted(n for n in names if n.startswith('onnxruntime'))}")
        log(f"[{extra}] installs {want} and not {banned} ({len(names)} distributions)")


STEPS = ("build", "floors", "latest", "neighbours", "train", "extras")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=STEPS, default=list(STEPS))
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("-k", dest="keyword", help="only the tests pytest -k selects (debugging)")
    args = parser.parse_args(argv)
    if args.keyword:
        PYTEST_EXTRA[:] = ["-k", args.keyword]
    work = Path(tempfile.mkdtemp(prefix="dcs-test-deps-"))
    start = time.monotonic()
    try:
        wheel, _ = build(work)
        tests_dir = copy_tests(work)
        if "floors" in args.only:
            step_floors(work, wheel, tests_dir)
        if "latest" in args.only:
            step_latest(work, wheel, tests_dir)
        if "neighbours" in args.only:
            step_neighbours(work, wheel, tests_dir)
        if "train" in args.only:
            step_train(work, wheel)
        if "extras" in args.only:
            step_extras(work, wheel)
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    log(f"all steps passed in {time.monotonic() - start:.0f} s: {', '.join(args.only)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
