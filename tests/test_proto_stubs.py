"""The committed protobuf/gRPC stubs are what `make proto` generates from proto/*.proto, and
they load on the oldest protobuf and grpcio runtimes the package declares."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
STUBS = sorted((ROOT / "proto").glob("*_pb2*.py"))


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def _declared_floor(dist: str) -> tuple[int, ...]:
    """The lowest ``dist`` version any extra of pyproject.toml accepts (``dist>=X``)."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [*meta["dependencies"], *(r for extra in meta["optional-dependencies"].values()
                                     for r in extra)]
    floors = [_version(m.group(1)) for r in reqs
              if (m := re.fullmatch(rf"{re.escape(dist)}>=([\d.]+).*", r.split(";")[0].strip()))]
    assert floors, f"pyproject.toml declares no floor for {dist}"
    return min(floors)


def test_generated_stubs_are_fresh():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate_proto.py"), "--check"],
                            cwd=ROOT, check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_stub_gencode_loads_on_the_declared_protobuf_floor():
    """Gencode newer than the runtime refuses to load (protobuf >= 5.26 checks it at import), so
    the gencode's version may not exceed the declared floor; the same holds for gRPC stubs that
    carry ``GRPC_GENERATED_VERSION``. (Stubs from protoc 7.35 with ``protobuf>=4.25`` failed here.)"""
    protobuf_floor, grpcio_floor = _declared_floor("protobuf"), _declared_floor("grpcio")
    for stub in STUBS:
        text = stub.read_text()
        gencode = re.search(r"# Protobuf Python Version: ([\d.]+)", text)
        if gencode:
            assert _version(gencode.group(1))[:2] <= protobuf_floor[:2], (
                f"{stub.name}: gencode {gencode.group(1)} > declared protobuf floor {protobuf_floor}")
        assert "ValidateProtobufRuntimeVersion" not in text or gencode
        generated = re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", text)
        if generated:
            assert _version(generated.group(1)) <= grpcio_floor, (
                f"{stub.name}: stubs need grpcio>={generated.group(1)}, floor is {grpcio_floor}")


def test_stubs_import_as_package_for_server_and_clients():
    from dcs.proto import classifier_pb2, classifier_pb2_grpc, grpc_predict_v2_pb2_grpc

    assert classifier_pb2.DESCRIPTOR.package == "classifier.v1"
    assert hasattr(classifier_pb2_grpc, "ClassifierStub") and hasattr(classifier_pb2_grpc, "AuditStub")
    assert hasattr(grpc_predict_v2_pb2_grpc, "GRPCInferenceServiceStub")


def test_kserve_subset_keeps_field_numbers():
    from dcs.proto import grpc_predict_v2_pb2 as ipb

    req = ipb.ModelInferRequest.DESCRIPTOR.fields_by_name
    assert ipb.DESCRIPTOR.package == "inference"
    assert {n: req[n].number for n in ("model_name", "model_version", "id", "parameters", "inputs",
                                        "outputs", "raw_input_contents")} == {
        "model_name": 1, "model_version": 2, "id": 3, "parameters": 4, "inputs": 5, "outputs": 6,
        "raw_input_contents": 7}
    assert ipb.ModelInferResponse.DESCRIPTOR.fields_by_name["raw_output_contents"].number == 6
    service = ipb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
            "ModelInfer"} <= {m.name for m in service.methods}
