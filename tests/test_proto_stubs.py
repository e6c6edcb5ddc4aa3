"""The committed protobuf/gRPC stubs are what `make proto` generates from proto/*.proto."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_are_fresh():
    result = subprocess.run([sys.executable, "-m", "proto.generate", "--check"], cwd=ROOT,
                            check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_stubs_import_as_package_for_server_and_clients():
    from proto import classifier_pb2, classifier_pb2_grpc, grpc_predict_v2_pb2_grpc

    assert classifier_pb2.DESCRIPTOR.package == "classifier.v1"
    assert hasattr(classifier_pb2_grpc, "ClassifierStub") and hasattr(classifier_pb2_grpc, "AuditStub")
    assert hasattr(grpc_predict_v2_pb2_grpc, "GRPCInferenceServiceStub")


def test_kserve_subset_keeps_field_numbers():
    from proto import grpc_predict_v2_pb2 as ipb

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
