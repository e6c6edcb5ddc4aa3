"""gRPC servicers: protobuf in, data-plane calls, protobuf out. No logic beyond translation."""
from __future__ import annotations

import json

import numpy as np

from dcs.proto import classifier_pb2 as cpb
from dcs.proto import classifier_pb2_grpc as cpb_grpc
from dcs.proto import grpc_predict_v2_pb2 as ipb
from dcs.proto import grpc_predict_v2_pb2_grpc as ipb_grpc
from dcs.robustness.manifest import INPUT_NAME, LOGITS_NAME
from dcs.server.answers import ClassifyAnswers, InferAnswers, classify_answer
from dcs.server.dataplane import DataPlane
from dcs.server.errors import InvalidInput
from dcs.server.repository import Served
from dcs.server.runtime import ModelRuntime

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


def infer_answers(rt: ModelRuntime) -> InferAnswers:
    """The pre-encoded ``ModelInferResponse`` pieces of ``rt``."""
    head = ipb.ModelInferResponse(model_name=rt.name, model_version=str(rt.version)).SerializeToString()
    classes = len(rt.labels)

    def tensor(n: int, k: int) -> bytes:
        return ipb.ModelInferResponse.InferOutputTensor(
            name=LOGITS_NAME, datatype="BYTES" if k else "FP32",
            shape=[n, k or classes]).SerializeToString()
    return InferAnswers(head, classes, rt.labels, tensor)


def _typed_contents(contents: ipb.InferTensorContents, dtype: str) -> bytes:
    """The raw bytes of an input sent as typed contents (``fp32_contents``/``uint_contents``).

    FP32: the message's own wire bytes are the packed little-endian floats behind a tag and a
    length, so the values are read from one ``SerializeToString`` without a Python float per
    value. UINT8 (uint32 varints on the wire) goes through numpy once, with the range check."""
    if dtype == "FLOAT32":
        wire = contents.SerializeToString()
        if not wire:
            return b""
        if wire[0] == 0x32:  # fp32_contents (6), length-delimited
            length, at = 0, 1
            for shift in range(0, 35, 7):
                byte = wire[at]
                at += 1
                length |= (byte & 0x7F) << shift
                if byte < 0x80:
                    break
            if at + length == len(wire):  # nothing but fp32_contents was set
                return wire[at:]
        return np.asarray(contents.fp32_contents, dtype="<f4").tobytes()
    values = np.fromiter(contents.uint_contents, dtype=np.int64, count=len(contents.uint_contents))
    if values.size and (values.min() < 0 or values.max() > 255):
        raise InvalidInput("inputs[0].contents.uint_contents has values outside 0..255 for UINT8")
    return values.astype(np.uint8).tobytes()


class InferenceServicer(ipb_grpc.GRPCInferenceServiceServicer):
    """KServe v2 / Open Inference Protocol subset (what tritonclient.grpc needs)."""

    def __init__(self, dataplane: DataPlane) -> None:
        self._dp = dataplane
        self._infer_answers: dict[int, tuple[ModelRuntime, InferAnswers]] = {}

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

    def _answers(self, rt: ModelRuntime) -> InferAnswers:
        """``rt``'s pre-encoded answer pieces, built on its first request (a reload brings a new
        runtime object, hence new pieces)."""
        got = self._infer_answers.get(id(rt))
        if got is None or got[0] is not rt:
            if len(self._infer_answers) > 64:  # forget unloaded versions now and then
                self._infer_answers.clear()
            got = self._infer_answers[id(rt)] = (rt, infer_answers(rt))
        return got[1]

    async def ModelInfer(self, request: ipb.ModelInferRequest, context) -> bytes:
        """One input ``x`` (FP32 or UINT8, raw or typed contents), the ``logits`` output (FP32,
        or the classification extension's strings with ``class_count``).

        The answer is bytes: the package's pre-encoded head and output tensor plus a slice of the
        batch's logits bytes, made once per batch (``server.answers``, ``BatchScores.logits_raw``)."""
        version = request.model_version
        served = self._dp.get_model(request.model_name, _version(version) if version else 0)
        inputs = request.inputs
        if len(inputs) != 1:
            raise InvalidInput(f"inputs has {len(inputs)} tensors; expected exactly one "
                               f"named {INPUT_NAME!r}")
        tensor = inputs[0]
        if tensor.name != INPUT_NAME:
            raise InvalidInput(f"inputs[0].name is {tensor.name!r}; expected {INPUT_NAME!r}")
        dtype = _KSERVE_DTYPES.get(tensor.datatype)
        if dtype is None:
            raise InvalidInput(f"inputs[0].datatype is {tensor.datatype!r}; expected FP32 or UINT8")
        raw = request.raw_input_contents
        if raw:
            if len(raw) != 1:
                raise InvalidInput(f"raw_input_contents has {len(raw)} "
                                   "entries; expected one per input (1)")
            data = raw[0]
        else:
            data = _typed_contents(tensor.contents, dtype)
        x = self._dp.decode(served, dtype=dtype, shape=tensor.shape, data=data, field="inputs[0]")
        ks = _wanted(request.outputs) if request.outputs else _LOGITS_ONLY
        scored, served = await self._dp.infer(served, x, field="inputs[0]")
        answers = self._answers(served.runtime)
        raw_logits = scored.batch.logits_raw
        if ks is _LOGITS_ONLY:
            return answers.logits(raw_logits, scored.start, scored.stop, request.id)
        bodies = []
        for k in ks:
            if k == 0:
                bodies.append((0, answers.logits_bytes(raw_logits, scored.start, scored.stop)))
            else:
                top = scored.top(min(k, answers.classes))
                bodies.append((top.indices.shape[1], answers.classification_bytes(
                    top.logits.tolist(), top.indices.tolist())))
        return answers.response(len(scored), bodies, request.id)


_LOGITS_ONLY = [0]


def _wanted(outputs) -> list[int]:
    """Per requested output (all must be ``logits``): the classification extension's
    ``class_count``, or 0 for the logits themselves."""
    ks = []
    for i, out in enumerate(outputs):
        if out.name != LOGITS_NAME:
            raise InvalidInput(f"outputs[{i}].name is {out.name!r}; expected {LOGITS_NAME!r}")
        k = 0
        params = out.parameters
        if params and "classification" in params:
            param = params["classification"]
            k = int(param.int64_param) if param.WhichOneof("parameter_choice") == "int64_param" \
                else -1
            if k < 1:
                raise InvalidInput(f"outputs[{i}].parameters['classification'] must be an "
                                   f"int64 >= 1, got {param}")
        ks.append(k)
    return _LOGITS_ONLY if ks == _LOGITS_ONLY else ks
