"""ModelInfer (KServe v2, through ``tritonclient.grpc``) and Classify (through ``dcs.clients``)
give the same answers for the same images: same top-1, probabilities and logits, and the
classification extension names the same classes. Both answers are encoded once per batch in the
model's worker (``server.answers``), from the same batch output; this ties the two encodings
together, in single requests and in requests batched with others."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from dcs.clients.client import Client
from tests.server_helpers import ROOT, start_server_process

MODEL = "digits-mlp"
# The dev extra; only the child below imports it (importing it here would register tritonclient's
# ``inference.*`` protobuf symbols beside ours in this process's descriptor pool).
if importlib.util.find_spec("tritonclient") is None:
    pytest.skip("tritonclient not installed (dev extra)", allow_module_level=True)

# tritonclient's stubs define the same ``inference.*`` protobuf symbols as ours: it runs in a child.
TRITON = r"""
import json, sys
from concurrent.futures import ThreadPoolExecutor
import numpy as np
import tritonclient.grpc as tc
url, path = sys.argv[1], sys.argv[2]
x = np.load(path)
c = tc.InferenceServerClient(url=url)

def infer(xs, class_count=0, request_id=""):
    inp = tc.InferInput("x", list(xs.shape), "FP32"); inp.set_data_from_numpy(xs)
    out = tc.InferRequestedOutput("logits", class_count=class_count)
    r = c.infer("digits-mlp", [inp], outputs=[out], request_id=request_id)
    return r

whole = infer(x, request_id="req-7")
classes = infer(x, class_count=3).as_numpy("logits")
# one image per request, 16 at once: they share batches in the server
with ThreadPoolExecutor(16) as pool:
    single = list(pool.map(lambda i: infer(x[i:i + 1]).as_numpy("logits")[0].tolist(), range(len(x))))
print("RESULT " + json.dumps({
    "logits": whole.as_numpy("logits").tolist(), "id": whole.get_response().id,
    "shape": list(whole.get_response().outputs[0].shape),
    "classes": [[v.decode() for v in row] for row in classes], "single": single}))
"""


@pytest.fixture(scope="module")
def server(digits_repo, tmp_path_factory):
    sp = start_server_process(digits_repo, "--max-queue-delay-ms", "2",
                              log_dir=tmp_path_factory.mktemp("srv"))
    yield sp
    sp.stop()


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_model_infer_and_classify_agree(server, tmp_path):
    x = np.random.default_rng(11).random((12, 1, 8, 8), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    res = subprocess.run([sys.executable, "-c", TRITON, server.target, str(tmp_path / "x.npy")],
                         check=False, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.split("RESULT ", 1)[1])
    logits = np.array(out["logits"], dtype=np.float32)
    assert out["shape"] == [12, 10] and logits.shape == (12, 10)
    assert out["id"] == "req-7"  # the request id comes back
    # requests batched with others get the same rows as the whole batch
    np.testing.assert_allclose(np.array(out["single"]), logits, atol=1e-5)

    with Client(server.target) as client:
        preds = client.classify(x, MODEL, top_k=10)
    probs = _softmax(logits.astype(np.float64))
    for i, p in enumerate(preds):
        top = p.top
        assert top[0].index == int(np.argmax(logits[i]))  # same top-1
        got_p = np.zeros(10)
        got_z = np.zeros(10)
        for s in top:
            got_p[s.index], got_z[s.index] = s.probability, s.logit
        np.testing.assert_allclose(got_p, probs[i], atol=1e-6)  # same probabilities
        np.testing.assert_allclose(got_z, logits[i], atol=1e-5)
        # the classification extension: "<logit>:<index>:<label>" of the same 3 best classes
        ranked = [row.split(":") for row in out["classes"][i]]
        assert [int(j) for _, j, _ in ranked] == [s.index for s in top[:3]]
        assert [label for _, _, label in ranked] == [s.label for s in top[:3]]
        assert [float(v) for v, _, _ in ranked] == pytest.approx([s.logit for s in top[:3]],
                                                                 abs=1e-5)
