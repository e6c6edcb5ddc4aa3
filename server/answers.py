"""Classify answers encoded once per batch, in the model's worker thread.

Building a ``ClassifyResponse`` per request on the event loop (numpy slices, ``tolist``, one upb
``add()`` per score) cost ~19 µs of loop CPU per request at 64 clients in ``bench/``, about a
tenth of the loop's whole budget. Here the batch worker writes every row's ranked
``ClassScore`` records into one buffer with a few vectorized numpy calls; the handler then
answers with bytes: the package's ``ModelRef`` field, and per image one slice of that buffer
framed as a ``Prediction``. The wire format is protobuf's own (field tags, varint lengths,
little-endian fixed32 floats), so clients parse it with the generated classes like any other
response; ``tests/test_answers.py`` checks it against upb's encoding of the same message.

KServe v2 ``ModelInfer`` answers (``InferAnswers``) are built the same way: the package's
``model_name``/``model_version`` and the output tensor's header are encoded once, the raw
contents are a slice of the batch's logits bytes, so the handler joins four pieces of bytes.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: Ranks encoded per row: requests asking for more (``top_k`` above this, with more classes than
#: this) are answered by the servicer's message-building path instead.
MAX_ENCODED_RANKS = 32

# Wire tags: (field number << 3) | wire type (0 varint, 2 length-delimited, 5 fixed32).
_TAG_REF = b"\x0a"           # ClassifyResponse.model = 1
_TAG_PREDICTION = b"\x12"    # ClassifyResponse.predictions = 2
_TAG_SCORE = b"\x0a"         # Prediction.top = 1
_TAG_INDEX = b"\x08"         # ClassScore.index = 1
_TAG_LABEL = b"\x12"         # ClassScore.label = 2
_TAG_PROBABILITY = b"\x1d"   # ClassScore.probability = 3
_TAG_LOGIT = b"\x25"         # ClassScore.logit = 4
_FLOATS = 4 + 1 + 4          # probability bytes, logit tag, logit bytes after the record head


def varint(n: int) -> bytes:
    """Protobuf base-128 varint of a non-negative int."""
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _length_delimited(tag: bytes, body: bytes) -> bytes:
    return tag + varint(len(body)) + body


class EncodedRows:
    """A batch's ClassScore records: row ``i``'s first ``k`` ranks are ``data[starts[i]:ends[i][k-1]]``."""

    __slots__ = ("data", "ends", "head", "ranks", "starts")

    def __init__(self, head: bytes, data: bytes, starts: list[int], ends: list[list[int]],
                 ranks: int) -> None:
        self.head = head
        self.data = data
        self.starts = starts
        self.ends = ends
        self.ranks = ranks


class ClassifyAnswers:
    """Pre-encoded ``ClassifyResponse`` pieces of one model package.

    ``ref``: the serialized ``ModelRef`` every answer carries; ``labels``: class names by index.
    """

    def __init__(self, ref: bytes, labels: Sequence[str], max_ranks: int = MAX_ENCODED_RANKS) -> None:
        self.head = _length_delimited(_TAG_REF, ref)
        self.ranks = min(len(labels), max_ranks)
        templates, float_at = [], []
        for j, label in enumerate(labels):
            # proto3 leaves default values off the wire: no index for class 0, no empty label.
            # The two floats are always written (explicit zeros parse to the same message).
            name = label.encode()
            head = ((_TAG_INDEX + varint(j) if j else b"")
                    + (_length_delimited(_TAG_LABEL, name) if name else b"") + _TAG_PROBABILITY)
            framed = _TAG_SCORE + varint(len(head) + _FLOATS) + head
            templates.append(framed + bytes(4) + _TAG_LOGIT + bytes(4))
            float_at.append(len(framed))
        self._templates = templates
        self._lengths = np.array([len(t) for t in templates], dtype=np.int64)
        self._float_at = np.array(float_at, dtype=np.int64)

    def encode(self, order: np.ndarray, probs: np.ndarray, ranked_logits: np.ndarray) -> EncodedRows:
        """Records of the top ``ranks`` classes of every row (``order``/``probs``/``ranked_logits``:
        ``[N, C]``, best first). Runs once per batch, in the worker thread."""
        r = self.ranks
        classes = order[:, :r]
        lengths = self._lengths[classes]
        ends = np.cumsum(lengths, axis=None).reshape(lengths.shape)
        buf = bytearray(b"".join([self._templates[j] for j in classes.ravel().tolist()]))
        if buf:
            view = np.frombuffer(buf, dtype=np.uint8)
            at = (ends - lengths + self._float_at[classes]).reshape(-1, 1) + np.arange(4)
            view[at] = np.ascontiguousarray(probs[:, :r], dtype="<f4").view(np.uint8).reshape(-1, 4)
            view[at + 5] = np.ascontiguousarray(
                ranked_logits[:, :r], dtype="<f4").view(np.uint8).reshape(-1, 4)
        starts = (ends[:, 0] - lengths[:, 0]).tolist() if r else [0] * len(order)
        return EncodedRows(self.head, bytes(buf), starts, ends.tolist(), r)


def classify_answer(rows: EncodedRows, start: int, stop: int, k: int) -> bytes | None:
    """Serialized ``ClassifyResponse`` for batch rows ``start:stop`` with ``k`` classes each, or
    None when ``k`` is beyond what was encoded (the caller builds the message instead)."""
    if not 0 < k <= rows.ranks:
        return None
    data, starts, ends = rows.data, rows.starts, rows.ends
    parts = [rows.head]
    for i in range(start, stop):
        body = data[starts[i]:ends[i][k - 1]]
        parts.append(_TAG_PREDICTION + varint(len(body)) + body)
    return b"".join(parts)


# --- KServe v2 ModelInfer ------------------------------------------------------------------------
# ModelInferResponse: model_name = 1, model_version = 2, id = 3, outputs = 5,
# raw_output_contents = 6 (every one length-delimited).
_TAG_INFER_ID = b"\x1a"
_TAG_INFER_OUTPUT = b"\x2a"
_TAG_INFER_RAW = b"\x32"


class InferAnswers:
    """Pre-encoded ``ModelInferResponse`` pieces of one model package, for the logits output.

    ``head``: the serialized ``model_name`` and ``model_version`` fields; per batch size ``n``
    the framed ``InferOutputTensor`` (name, FP32, shape ``[n, C]``), serialized once by the
    generated class and cached. The raw contents are a slice of the batch's logits bytes, which
    the batch makes once (``BatchScores.logits_raw``, in the worker): per request the handler only joins
    bytes (``tests/test_answers.py`` checks the result against upb's encoding of the same message).
    """

    __slots__ = ("_outputs", "_tensor", "classes", "head", "row_bytes", "suffixes")

    def __init__(self, head: bytes, num_classes: int, labels: Sequence[str],
                 output_tensor) -> None:
        """``head``: ``ModelInferResponse(model_name=..., model_version=...)`` serialized;
        ``output_tensor(n, k)``: the serialized ``InferOutputTensor`` of ``n`` rows (``k`` 0: the
        FP32 logits ``[n, C]``; else the classification extension's BYTES ``[n, k]``)."""
        self.head = head
        self.classes = num_classes
        self.row_bytes = 4 * num_classes
        self._tensor = output_tensor
        self._outputs: dict[tuple[int, int], bytes] = {}
        # the classification extension's "<value>:<index>:<label>" after the value, per class
        self.suffixes = [f":{j}:{label}".encode() for j, label in enumerate(labels)]

    def output(self, n: int, k: int = 0) -> bytes:
        """The framed ``outputs`` field for ``n`` rows (``k`` classes, 0: logits)."""
        framed = self._outputs.get((n, k))
        if framed is None:
            body = self._tensor(n, k)
            framed = self._outputs[(n, k)] = _TAG_INFER_OUTPUT + varint(len(body)) + body
        return framed

    def _head(self, request_id: str) -> bytes:
        return self.head if not request_id else self.head + _length_delimited(
            _TAG_INFER_ID, request_id.encode())

    def logits_bytes(self, raw: bytes, start: int, stop: int) -> bytes:
        """Rows ``start:stop`` of a batch whose logits bytes (row-major float32) are ``raw``."""
        return raw[start * self.row_bytes:stop * self.row_bytes]

    def classification_bytes(self, values: list[list[float]], indices: list[list[int]]) -> bytes:
        """The classification extension's BYTES tensor contents: per row its ``k`` best classes
        as Triton formats them, ``"<logit>:<index>:<label>"``, each behind a 4-byte length."""
        suffixes = self.suffixes
        items = []
        for vs, js in zip(values, indices):
            for v, j in zip(vs, js):
                item = b"%f" % v + suffixes[j]
                items.append(len(item).to_bytes(4, "little"))
                items.append(item)
        return b"".join(items)

    def logits(self, raw: bytes, start: int, stop: int, request_id: str = "") -> bytes:
        """Serialized response with the FP32 logits of batch rows ``start:stop`` (the common
        case: one output, answered with one join)."""
        body = raw[start * self.row_bytes:stop * self.row_bytes]
        return b"".join((self._head(request_id), self.output(stop - start), _TAG_INFER_RAW,
                         varint(len(body)), body))

    def response(self, n: int, outputs: list[tuple[int, bytes]], request_id: str = "") -> bytes:
        """Serialized response of ``n`` rows with ``outputs``: per requested output its ``k``
        (0: logits) and raw contents, in request order."""
        parts = [self._head(request_id)]
        parts += [self.output(n, k) for k, _ in outputs]
        for _, body in outputs:
            parts += (_TAG_INFER_RAW, varint(len(body)), body)
        return b"".join(parts)
