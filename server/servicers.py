"""gRPC servicers: protobuf in, data-plane calls, protobuf out. No logic beyond translation."""
from __future__ import annotations

import json
import struct

import numpy as np

from proto import classifier_pb2 as cpb
from proto import classifier_pb2_grpc as cpb_grpc
from proto import grpc_predict_v2_pb2 as ipb
from proto import grpc_predict_v2_pb2_grpc as ipb_grpc
from robustness.manifest import INPUT_NAME, LOGITS_NAME
from server.answers import ClassifyAnswers, classify_answer
from server.dataplane import DataPlane
from server.errors import InvalidInput
from server.repository import Served
from server.runtime import ModelRuntime

SERVER_NAME = "defended-classifier-service"
SERVER_VERSION = "0.1.0"
CLASSIFIER_SERVICE = "classifier.v1.Classifier"
AUDIT_SERVICE = "classifier.v1.Audit"
INFERENCE_SERVICE = "inference.GRPCInferenceService"

_DTYPE_NAMES = {cpb.FLOAT32: "FLOAT32", cpb.UINT8: "UINT8"}
_KSERVE_DTYPES = {"FP32": "FLOAT32", "UINT8": "UINT8"}


def runtime_ref(rt: ModelRuntime) -> cpb.ModelRef:
    """The ``ModelRef`` naming a loaded package (what every answer it computes carries)."""
    return cpb.ModelRef(name=rt.name, version=rt.version, sha256=rt.sha256, provider=rt.provider)


def model_ref(served: Served) -> cpb.ModelRef:
    return runtime_ref(served.runtime)


def classify_answers(rt: ModelRuntime) -> ClassifyAnswers:
    """The pre-encoded answer pieces of ``rt`` (its batch worker encodes with them)."""
    return ClassifyAnswers(runtime_ref(rt).SerializeToString(), rt.labels)


def model_summary(served: Served, ready: bool) -> cpb.ModelSummary:
    rt = served.runtime
    defense = rt.manifest.get("defense", {})
    return cpb.ModelSummary(ref=model_ref(served), labels=rt.labels, input_shape=rt.input_shape,
                            dataset=str(rt.manifest.get("dataset", "")),
                            defense=str(defense.get("kind", "") if isinstance(defense, dict) else defense),
                            ready=ready)


class ClassifierServicer(cpb_grpc.ClassifierServicer):
    def __init__(self, dataplane: DataPlane) -> None:
        self._dp = dataplane

    async def Classify(self, request: cpb.ClassifyRequest, context) -> cpb.ClassifyResponse | bytes:
        served = self._dp.get_model(request.model, request.version)
        images = request.images
        x = self._dp.decode(served, dtype=_DTYPE_NAMES.get(images.dtype, ""),
                            shape=images.shape, data=images.data)
        k = self._dp.resolve_top_k(request.top_k, served)
        scored, served = await self._dp.infer(served, x)
        encoded = scored.batch.encoded
        if encoded is not None:  # encoded in the batch worker: answer with its bytes
            answer = classify_answer(encoded, scored.start, scored.stop, k)
            if answer is not None:
                return answer
        top = scored.top(k)
        labels = served.runtime.labels
        # add() on the repeated fields builds in place: half the cost of nested constructors
        response = cpb.ClassifyResponse(model=model_ref(served))
        for idx, probs, zs in zip(top.indices.tolist(), top.probs.tolist(), top.logits.tolist()):
            scores = response.predictions.add().top
            for j, p, z in zip(idx, probs, zs):
                scores.add(index=j, label=labels[j], probability=p, logit=z)
        return response

    async def ListModels(self, request, context) -> cpb.ListModelsResponse:
        repo = self._dp.repository
        return cpb.ListModelsResponse(models=[
            model_summary(s, self._dp.model_ready(s.runtime.name)) for s in repo.served()])

    async def GetModel(self, request: cpb.GetModelRequest, context) -> cpb.GetModelResponse:
        served = self._dp.get_model(request.model, request.version)
        rt = served.runtime
        rng = rt.manifest.get("input", {}).get("range", [0.0, 1.0])
        spec = cpb.InputSpec(name=INPUT_NAME, shape=rt.input_shape,
                             accepted_dtypes=[cpb.FLOAT32, cpb.UINT8], min_value=float(rng[0]),
                             max_value=float(rng[1]),
                             layout=str(rt.manifest.get("input", {}).get("layout", "NCHW")),
                             max_batch=self._dp.max_batch)
        return cpb.GetModelResponse(summary=model_summary(served, self._dp.model_ready(rt.name)),
                                    manifest_json=json.dumps(rt.manifest, sort_keys=True),
                                    input=spec)


def _version(text: str, field: str = "model_version") -> int:
    if not text:
        return 0
    try:
        return int(text)
    except ValueError:
        raise InvalidInput(f"{field} is {text!r}; expected an integer version or empty") from None


def _serialize_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


class InferenceServicer(ipb_grpc.GRPCInferenceServiceServicer):
    """KServe v2 / Open Inference Protocol subset (what tritonclient.grpc needs)."""

    def __init__(self, dataplane: DataPlane) -> None:
        self._dp = dataplane

    async def ServerLive(self, request, context):
        return ipb.ServerLiveResponse(live=self._dp.live)

    async def ServerReady(self, request, context):
        return ipb.ServerReadyResponse(ready=self._dp.ready)

    async def ModelReady(self, request, context):
        return ipb.ModelReadyResponse(ready=self._dp.model_ready(request.name, _version(request.version, "version")))

    async def ServerMetadata(self, request, context):
        return ipb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION,
                                          extensions=["classification"])

    async def ModelMetadata(self, request, context):
        served = self._dp.get_model(request.name, _version(request.version, "version"))
        rt = served.runtime
        tm = ipb.ModelMetadataResponse.TensorMetadata
        return ipb.ModelMetadataResponse(
            name=rt.name, versions=[str(rt.version)], platform="onnxruntime_onnx",
            inputs=[tm(name=INPUT_NAME, datatype="FP32", shape=[-1, *rt.input_shape])],
            outputs=[tm(name=LOGITS_NAME, datatype="FP32", shape=[-1, len(rt.labels)])])

    async def ModelInfer(self, request: ipb.ModelInferRequest, context):
        served = self._dp.get_model(request.model_name, _version(request.model_version))
        if len(request.inputs) != 1:
            raise InvalidInput(f"inputs has {len(request.inputs)} tensors; expected exactly one "
                               f"named {INPUT_NAME!r}")
        tensor = request.inputs[0]
        if tensor.name != INPUT_NAME:
            raise InvalidInput(f"inputs[0].name is {tensor.name!r}; expected {INPUT_NAME!r}")
        dtype = _KSERVE_DTYPES.get(tensor.datatype)
        if dtype is None:
            raise InvalidInput(f"inputs[0].datatype is {tensor.datatype!r}; expected FP32 or UINT8")
        if request.raw_input_contents:
            if len(request.raw_input_contents) != 1:
                raise InvalidInput(f"raw_input_contents has {len(request.raw_input_contents)} "
                                   "entries; expected one per input (1)")
            data = request.raw_input_contents[0]
        elif dtype == "FLOAT32":
            data = np.asarray(tensor.contents.fp32_contents, dtype="<f4").tobytes()
        else:
            values = np.asarray(tensor.contents.uint_contents, dtype=np.int64)
            if values.size and (values.min() < 0 or values.max() > 255):
                raise InvalidInput("inputs[0].contents.uint_contents has values outside 0..255 for UINT8")
            data = values.astype(np.uint8).tobytes()
        x = self._dp.decode(served, dtype=dtype, shape=list(tensor.shape), data=data,
                            field="inputs[0]")
        wanted: list[tuple[str, int]] = []  # (name, classification k or 0)
        for i, out in enumerate(request.outputs):
            if out.name != LOGITS_NAME:
                raise InvalidInput(f"outputs[{i}].name is {out.name!r}; expected {LOGITS_NAME!r}")
            k = 0
            if "classification" in out.parameters:
                param = out.parameters["classification"]
                k = int(param.int64_param) if param.WhichOneof("parameter_choice") == "int64_param" \
                    else -1
                if k < 1:
                    raise InvalidInput(f"outputs[{i}].parameters['classification'] must be an "
                                       f"int64 >= 1, got {param}")
            wanted.append((out.name, k))
        if not wanted:
            wanted = [(LOGITS_NAME, 0)]
        scored, served = await self._dp.infer(served, x, field="inputs[0]")
        logits = scored.logits
        rt = served.runtime
        outputs, raws = [], []
        for name, k in wanted:
            if k == 0:
                outputs.append(ipb.ModelInferResponse.InferOutputTensor(
                    name=name, datatype="FP32", shape=list(logits.shape)))
                raws.append(np.ascontiguousarray(logits, dtype="<f4").tobytes())
            else:
                k = min(k, logits.shape[1])
                top = scored.top(k)
                # Triton's format: "<value>:<index>:<label>", value = the output tensor's value.
                items = [f"{top.logits[i, j]:f}:{int(top.indices[i, j])}:"
                         f"{rt.labels[int(top.indices[i, j])]}".encode()
                         for i in range(len(logits)) for j in range(k)]
                outputs.append(ipb.ModelInferResponse.InferOutputTensor(
                    name=name, datatype="BYTES", shape=[len(logits), k]))
                raws.append(_serialize_bytes(items))
        return ipb.ModelInferResponse(model_name=rt.name, model_version=str(rt.version),
                                      id=request.id, outputs=outputs, raw_output_contents=raws)
