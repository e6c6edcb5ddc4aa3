"""A small kustomize subset renderer, the fallback for tests/test_deploy.py where neither
``kubectl`` nor ``kustomize`` is installed, and a test that it agrees with the real one.

Supported (exactly what deploy/k8s uses; anything else raises NotImplementedError):
``resources`` (files and directories), ``components`` (kind Component), ``configMapGenerator``
(``files``/``literals``, with a content-hash name suffix -- our own hash, not kustomize's exact
value -- and the name references in pod specs rewritten), ``images`` (newName/newTag), ``patches`` given as a strategic-merge file
(``path``; lists merged by ``name`` for containers/volumes/env/volumeMounts, by ``containerPort``
for ports, replaced otherwise) or as an inline JSON6902 list with a ``target`` (kind/name;
ops add/replace/remove). No namePrefix, commonLabels, vars, replacements, helm or remote bases.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

_KNOWN_KEYS = {"apiVersion", "kind", "resources", "components", "configMapGenerator", "images",
               "patches"}
_MERGE_KEYS = {"containers": "name", "initContainers": "name", "volumes": "name", "env": "name",
               "volumeMounts": "name", "ports": "containerPort", "envFrom": None}
_WORKLOADS = ("Deployment", "Job", "StatefulSet", "DaemonSet")


def _kustomization(path: Path) -> dict:
    for name in ("kustomization.yaml", "kustomization.yml", "Kustomization"):
        if (path / name).is_file():
            data = yaml.safe_load((path / name).read_text()) or {}
            unknown = set(data) - _KNOWN_KEYS
            if unknown:
                raise NotImplementedError(f"{path}: kustomize fields outside the subset: {unknown}")
            return data
    raise FileNotFoundError(f"{path}: no kustomization.yaml")


def _hash_suffix(cm: dict) -> str:
    """A 10-character content hash in kustomize's alphabet (its exact value differs)."""
    encoded = json.dumps({"data": cm.get("data", {}), "kind": "ConfigMap", "name": cm["metadata"]["name"]},
                         sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(encoded.encode()).hexdigest()[:10]
    return digest.translate(str.maketrans({"0": "g", "1": "h", "3": "k", "a": "m", "e": "t"}))


def _smp(base, patch, key: str | None = None):
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = _smp(out[k], v, k)
            else:
                out[k] = copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and _MERGE_KEYS.get(key):
        mk = _MERGE_KEYS[key]
        out = [copy.deepcopy(b) for b in base]
        for item in patch:
            match = [i for i, b in enumerate(out) if b.get(mk) == item.get(mk)]
            if match:
                out[match[0]] = _smp(out[match[0]], item)
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def _pointer(path: str) -> list[str]:
    return [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]


def _json6902(doc: dict, ops: list[dict]) -> dict:
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = _pointer(op["path"])
        node = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        kind = op["op"]
        if isinstance(node, list):
            index = len(node) if last == "-" else int(last)
            if kind == "add":
                node.insert(index, copy.deepcopy(op["value"]))
            elif kind == "replace":
                node[index] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del node[index]
            else:
                raise NotImplementedError(f"JSON6902 op {kind}")
        else:
            if kind in ("add", "replace"):
                if kind == "replace" and last not in node:
                    raise KeyError(f"replace of missing {op['path']}")
                node[last] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del node[last]
            else:
                raise NotImplementedError(f"JSON6902 op {kind}")
    return doc


def _apply_patches(docs: list[dict], patches: list[dict], root: Path) -> list[dict]:
    for entry in patches:
        if "path" in entry:
            patch = yaml.safe_load((root / entry["path"]).read_text())
            target = {"kind": patch["kind"], "name": patch["metadata"]["name"]}
        else:
            patch = yaml.safe_load(entry["patch"])
            target = entry["target"]
        hits = 0
        for i, doc in enumerate(docs):
            if all(doc.get("kind") == v if k == "kind" else doc["metadata"].get(k) == v
                   for k, v in target.items()):
                docs[i] = _json6902(doc, patch) if isinstance(patch, list) else _smp(doc, patch)
                hits += 1
        if not hits:
            raise ValueError(f"{root}: patch target {target} matches nothing")
    return docs


def _set_images(docs: list[dict], images: list[dict]) -> None:
    for doc in docs:
        if doc["kind"] not in _WORKLOADS:
            continue
        spec = doc["spec"]["template"]["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            name, _, tag = c["image"].partition(":")
            for img in images:
                if img["name"] == name:
                    c["image"] = f"{img.get('newName', name)}:{img.get('newTag', tag or 'latest')}"


def _build(path: Path, docs: list[dict] | None = None) -> tuple[list[dict], dict[str, str]]:
    """Accumulate resources, then components, generators, patches, images (kustomize's order).
    Returns the documents and {generated name: hashed name}."""
    k = _kustomization(path)
    docs = [] if docs is None else docs
    renames: dict[str, str] = {}
    for res in k.get("resources", []):
        target = path / res
        if target.is_dir():
            sub, sub_renames = _build(target)
            docs.extend(sub)
            renames.update(sub_renames)
        else:
            docs.extend(d for d in yaml.safe_load_all(target.read_text()) if d)
    for comp in k.get("components", []):
        if _kustomization(path / comp).get("kind") != "Component":
            raise ValueError(f"{comp}: not a kind: Component")
        docs, comp_renames = _build(path / comp, docs)
        renames.update(comp_renames)
    for gen in k.get("configMapGenerator", []):
        data: dict[str, str] = {}
        for f in gen.get("files", []):
            key, _, src = f.partition("=") if "=" in f else (Path(f).name, "", f)
            data[key] = (path / src).read_text()
        for lit in gen.get("literals", []):
            key, _, value = lit.partition("=")
            data[key] = value
        cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data}
        renames[gen["name"]] = f"{gen['name']}-{_hash_suffix(cm)}"
        docs.append(cm)
    docs = _apply_patches(docs, k.get("patches", []), path)
    _set_images(docs, k.get("images", []))
    return docs, renames


def _rename_configmaps(docs: list[dict], renames: dict[str, str]) -> None:
    for doc in docs:
        if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] in renames:
            doc["metadata"]["name"] = renames[doc["metadata"]["name"]]
        if doc["kind"] not in _WORKLOADS:
            continue
        spec = doc["spec"]["template"]["spec"]
        for vol in spec.get("volumes", []):
            if "configMap" in vol:
                vol["configMap"]["name"] = renames.get(vol["configMap"]["name"], vol["configMap"]["name"])
        for c in spec.get("initContainers", []) + spec["containers"]:
            for src in c.get("envFrom", []):
                if "configMapRef" in src:
                    ref = src["configMapRef"]
                    ref["name"] = renames.get(ref["name"], ref["name"])
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("configMapKeyRef")
                if ref:
                    ref["name"] = renames.get(ref["name"], ref["name"])


def render_subset(path: Path) -> list[dict]:
    """Render the kustomization at ``path`` with the subset above."""
    docs, renames = _build(Path(path))
    _rename_configmaps(docs, renames)
    return docs


def _unhashed(docs: list[dict], generated: set[str]) -> list[str]:
    """YAML per document with generated names' hash suffixes masked, sorted by kind/name."""
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, generated)) + r")-[a-z0-9]{10}\b")
    return sorted(pattern.sub(r"\1-HASH", yaml.safe_dump(d, sort_keys=True)) for d in docs)


# ----------------------------------------------------------------------------- self-check
def _key(doc: dict) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


def test_subset_renderer_matches_real_kustomize(tmp_path):
    """Every target tests/test_deploy.py renders comes out the same from kubectl kustomize."""
    from tests.test_deploy import K8S, TARGETS, write_target

    cmd = (["kustomize", "build"] if shutil.which("kustomize")
           else ["kubectl", "kustomize"] if shutil.which("kubectl") else None)
    if cmd is None:
        pytest.skip("no real kustomize to compare with")
    for target in TARGETS:
        where = write_target(target, tmp_path)
        real = subprocess.run([*cmd, str(where)], check=True, capture_output=True, text=True,
                              timeout=60).stdout
        ours = render_subset(where)
        generated = set(_build(where)[1]) or {"no-generated-names"}
        real_docs = [d for d in yaml.safe_load_all(real) if d]
        assert _unhashed(ours, generated) == _unhashed(real_docs, generated), target
    assert os.path.isdir(K8S)
