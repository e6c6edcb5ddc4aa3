"""Classify answers encoded in the batch worker (server/answers.py) against upb's own encoding."""
from __future__ import annotations

import asyncio

import numpy as np

from dcs.proto import classifier_pb2 as cpb
from dcs.server.answers import ClassifyAnswers, classify_answer, varint
from dcs.server.dataplane import score_batch

REF = cpb.ModelRef(name="pfe", version=3, sha256="ab" * 32, provider="CPUExecutionProvider")
# class 0 (no index on the wire), an empty label, non-ASCII, and one long enough for a 2-byte length
LABELS = ["zero", "", "Ünïcode ✓", "x" * 200, "four", "5"]


def reference(ref: cpb.ModelRef, labels, scored, k: int) -> cpb.ClassifyResponse:
    """What the servicer's message-building path answers."""
    top = scored.top(k)
    resp = cpb.ClassifyResponse(model=ref)
    for idx, probs, zs in zip(top.indices.tolist(), top.probs.tolist(), top.logits.tolist()):
        pred = resp.predictions.add()
        for j, p, z in zip(idx, probs, zs):
            pred.top.add(index=j, label=labels[j], probability=p, logit=z)
    return resp


def batch(logits: np.ndarray, answers: ClassifyAnswers):
    x = np.zeros((len(logits), 1), np.float32)
    return score_batch(lambda _: logits, x, encode=answers.encode)


def test_varint_matches_protobuf():
    for v in (1, 127, 128, 300, 16383, 16384, 2**31 + 5):
        msg = cpb.ModelRef(version=v)  # int64 field 2: tag 0x10, then the varint
        assert msg.SerializeToString() == b"\x10" + varint(v)
    assert varint(0) == b"\x00"


def test_encoded_answers_are_upbs_bytes_for_every_k_and_row_range():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(9, len(LABELS))).astype(np.float32) * 3
    answers = ClassifyAnswers(REF.SerializeToString(), LABELS)
    scored = batch(logits, answers)
    for start, stop in [(0, 9), (0, 1), (4, 7), (8, 9)]:
        rows = scored[start:stop]
        for k in range(1, len(LABELS) + 1):
            got = classify_answer(scored.encoded, rows.start, rows.stop, k)
            want = reference(REF, LABELS, rows, k)
            assert got == want.SerializeToString()  # byte for byte: same order, same framing
            assert cpb.ClassifyResponse.FromString(got) == want


def test_zero_and_negative_zero_floats_parse_to_the_same_message():
    logits = np.array([[0.0, -0.0, -200.0, 1.0, 0.0, 2.0]], np.float32)  # exp underflows to 0.0
    answers = ClassifyAnswers(REF.SerializeToString(), LABELS)
    scored = batch(logits, answers)
    got = cpb.ClassifyResponse.FromString(classify_answer(scored.encoded, 0, 1, 6))
    assert got == reference(REF, LABELS, scored[0:1], 6)
    assert got.predictions[0].top[-1].probability == 0.0


def test_k_beyond_the_encoded_ranks_is_left_to_the_caller():
    answers = ClassifyAnswers(REF.SerializeToString(), LABELS, max_ranks=3)
    logits = np.random.default_rng(1).normal(size=(2, len(LABELS))).astype(np.float32)
    scored = batch(logits, answers)
    assert scored.encoded.ranks == 3
    assert classify_answer(scored.encoded, 0, 2, 4) is None
    assert classify_answer(scored.encoded, 0, 2, 0) is None
    assert cpb.ClassifyResponse.FromString(classify_answer(scored.encoded, 0, 2, 3)) == \
        reference(REF, LABELS, scored[0:2], 3)


def test_servicer_falls_back_to_building_the_message_past_the_encoded_ranks():
    """Both paths of ``Classify`` answer the same message (and the bytes path is taken)."""
    from dcs.server.servicers import ClassifierServicer

    logits = np.random.default_rng(2).normal(size=(3, len(LABELS))).astype(np.float32)

    class Runtime:
        name, version, sha256, provider = REF.name, REF.version, REF.sha256, REF.provider
        labels = tuple(LABELS)

    class Served:
        runtime = Runtime()

    class DataPlane:
        def __init__(self, ranks: int) -> None:
            self.scored = batch(logits, ClassifyAnswers(REF.SerializeToString(), LABELS, ranks))[1:3]

        def get_model(self, name, version):
            return Served()

        def decode(self, served, **kw):
            return np.zeros((2, 1), np.float32)

        def resolve_top_k(self, k, served):
            return k

        async def infer(self, served, x):
            return self.scored, served

    request = cpb.ClassifyRequest(model="pfe", top_k=5)
    encoded = asyncio.run(ClassifierServicer(DataPlane(6)).Classify(request, None))
    built = asyncio.run(ClassifierServicer(DataPlane(2)).Classify(request, None))
    assert isinstance(encoded, bytes) and isinstance(built, cpb.ClassifyResponse)
    assert cpb.ClassifyResponse.FromString(encoded) == built
    assert built == reference(REF, LABELS, DataPlane(6).scored, 5)


# --- ModelInfer ----------------------------------------------------------------------------------
def _infer_reference(name, version, scored, ks, request_id=""):
    """ModelInferResponse built field by field with the generated classes (the previous path)."""
    from dcs.proto import grpc_predict_v2_pb2 as ipb

    logits = scored.logits
    outputs, raws = [], []
    for k in ks:
        if k == 0:
            outputs.append(ipb.ModelInferResponse.InferOutputTensor(
                name="logits", datatype="FP32", shape=list(logits.shape)))
            raws.append(np.ascontiguousarray(logits, dtype="<f4").tobytes())
        else:
            k = min(k, logits.shape[1])
            top = scored.top(k)
            items = [f"{top.logits[i, j]:f}:{int(top.indices[i, j])}:"
                     f"{LABELS[int(top.indices[i, j])]}".encode()
                     for i in range(len(logits)) for j in range(k)]
            outputs.append(ipb.ModelInferResponse.InferOutputTensor(
                name="logits", datatype="BYTES", shape=[len(logits), k]))
            raws.append(b"".join(len(b).to_bytes(4, "little") + b for b in items))
    return ipb.ModelInferResponse(model_name=name, model_version=str(version), id=request_id,
                                  outputs=outputs, raw_output_contents=raws)


def test_infer_answers_are_upbs_bytes():
    from dcs.server.servicers import infer_answers

    class Runtime:
        name, version, labels = "pfe", 12, LABELS

    answers = infer_answers(Runtime())
    logits = np.random.default_rng(5).normal(size=(9, len(LABELS))).astype(np.float32) * 30
    scores = batch(logits, ClassifyAnswers(REF.SerializeToString(), LABELS))
    for start, stop in ((0, 9), (0, 1), (3, 7), (8, 9)):
        scored = scores[start:stop]
        for rid in ("", "req-1", "ü" * 150):
            want = _infer_reference("pfe", 12, scored, [0], rid).SerializeToString()
            assert answers.logits(scores.logits_raw, start, stop, rid) == want
            for ks in ([2], [0, 3], [len(LABELS)], [1, 0]):
                bodies = []
                for k in ks:
                    if k == 0:
                        bodies.append((0, answers.logits_bytes(scores.logits_raw, start, stop)))
                    else:
                        top = scored.top(k)
                        bodies.append((top.indices.shape[1], answers.classification_bytes(
                            top.logits.tolist(), top.indices.tolist())))
                got = answers.response(stop - start, bodies, rid)
                assert got == _infer_reference("pfe", 12, scored, ks, rid).SerializeToString()


def test_typed_fp32_contents_read_from_the_wire_bytes():
    from dcs.proto import grpc_predict_v2_pb2 as ipb
    from dcs.server.servicers import _typed_contents

    for n in (0, 1, 31, 32, 1000):  # 1-, 2- and 3-byte lengths
        x = np.random.default_rng(n).random(n, dtype=np.float32)
        contents = ipb.InferTensorContents(fp32_contents=x.tolist())
        assert _typed_contents(contents, "FLOAT32") == x.astype("<f4").tobytes()
    # another field set beside fp32_contents: falls back to reading the values
    mixed = ipb.InferTensorContents(fp32_contents=[0.5, 0.25], int_contents=[3])
    assert _typed_contents(mixed, "FLOAT32") == np.array([0.5, 0.25], "<f4").tobytes()
    assert _typed_contents(ipb.InferTensorContents(uint_contents=[0, 7, 255]), "UINT8") == \
        bytes([0, 7, 255])
