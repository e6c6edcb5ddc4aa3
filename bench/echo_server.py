"""Reference: a no-op ``grpc.aio`` Classifier that returns one fixed response (RPC-overhead limit).

It takes the same ``classifier.v1.ClassifyRequest`` (parsed by the generated stubs) and answers a
prebuilt ``ClassifyResponse`` shaped like the real server's (model ref + ``top_k`` scores per
image), so message sizes match. Run as its own process: ``python -m bench.echo_server --port P``.
It also answers the KServe v2 ``inference.GRPCInferenceService/ModelInfer`` the same way: the
request is parsed by the generated stubs, the answer is a prebuilt ``ModelInferResponse`` with an
FP32 ``logits`` output of the request's batch (``[n, 10]`` in ``raw_output_contents``), or the
classification extension's ``class_count`` strings when asked; ``ServerLive``/``ServerReady``/
``ModelReady`` answer true.

``--batching`` turns it into the *floor of any batching design* on grpc.aio: each handler parks
on a future, one task collects the parked requests (up to ``--delay-ms``, like the server's
``--max-queue-delay-ms``), hands the batch to a worker thread that does nothing, and wakes the
handlers. No model, no validation, no metrics: what is left is the cost of suspending a
handler and of one thread hand-off per batch.

``--model PATH`` adds the one thing no design can skip: the batch (or, without ``--batching``,
each request, on the event loop) really runs through ONNX Runtime with 1 intra-op thread. Still
no validation, no softmax/top-k, no metrics and a fixed response, so it is an upper bound for any
Python ``grpc.aio`` server that serves this model on the same cores.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np

from bench.common import PROVIDERS
from dcs.proto import classifier_pb2 as cpb
from dcs.proto import classifier_pb2_grpc as cpb_grpc
from dcs.proto import grpc_predict_v2_pb2 as ipb
from dcs.proto import grpc_predict_v2_pb2_grpc as ipb_grpc
from dcs.robustness.padding import BatchPadder, pad_rows
from dcs.robustness.sessions import SessionOptions, make_session
from dcs.server.config import EVENT_LOOPS, ServerConfig
from dcs.server.priority import lower_thread_priority


def fixed_response(images: int, top_k: int) -> cpb.ClassifyResponse:
    pred = cpb.Prediction(top=[cpb.ClassScore(index=j, label=f"class_{j}", probability=0.1,
                                              logit=0.5) for j in range(top_k)])
    return cpb.ClassifyResponse(
        model=cpb.ModelRef(name="pfe", version=1, sha256="0" * 64, provider="CPUExecutionProvider"),
        predictions=[pred] * images)


class EchoClassifier(cpb_grpc.ClassifierServicer):
    def __init__(self, batching: bool = False, delay_s: float = 0.002, model: str = "",
                 device: str = "cpu", worker_niceness: int = ServerConfig.worker_niceness) -> None:
        self._cache: dict[tuple[int, int], cpb.ClassifyResponse] = {}
        self._session = None
        if model:
            # the server's own session (providers, options, CUDA check): the floor differs from
            # the server only in what it skips
            self._session, _ = make_session(Path(model), SessionOptions(device=device,
                                                                        intra_op_threads=1))
            # and the server's fixed batch on CUDA (robustness/padding.py)
            self._padder = BatchPadder(device == "cuda")
            inp = self._session.get_inputs()[0]
            self._input = inp.name
            self._shape = tuple(inp.shape[1:])
        self._batching = batching
        self._delay_s = delay_s
        self._queue: asyncio.Queue | None = None
        # the server's thread priorities too (server.priority): the batch worker below the loop
        self._pool = ThreadPoolExecutor(1, initializer=lower_thread_priority,
                                        initargs=(worker_niceness,)) if batching else None

    async def Classify(self, request: cpb.ClassifyRequest, context) -> cpb.ClassifyResponse:
        shape = request.images.shape
        n = int(shape[0]) if len(shape) == 4 else 1
        k = min(request.top_k or 5, 10)
        resp = self._cache.get((n, k))
        if resp is None:
            resp = self._cache[(n, k)] = fixed_response(n, k)
        await self.park(request.images.data)
        return resp

    async def park(self, data: bytes) -> None:
        """What ``Classify`` does with its images, for another API's handler (``EchoInference``)."""
        if self._batching:
            loop = asyncio.get_running_loop()
            if self._queue is None:
                self._queue = asyncio.Queue()
                loop.create_task(self._collect())
            parked = loop.create_future()
            self._queue.put_nowait((parked, data))
            await parked
        elif self._session is not None:
            self._run([data])

    def _run(self, blobs: list[bytes]) -> int:
        """Run the model on the concatenated images (no-op without ``--model``)."""
        if self._session is None:
            return len(blobs)
        x = np.frombuffer(b"".join(blobs), dtype="<f4").reshape(-1, *self._shape)
        x = pad_rows(x, self._padder.size_for(len(x)))
        return len(self._session.run(None, {self._input: x})[0])

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self._delay_s
            while len(batch) < 32:
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), deadline - loop.time()))
                except asyncio.TimeoutError:
                    break
            await loop.run_in_executor(self._pool, self._run, [data for _, data in batch])
            for parked, _ in batch:
                parked.set_result(None)


NUM_CLASSES = 10  # the benchmark models' class count (fixed answers are shaped like theirs)


def fixed_infer_response(model: str, images: int, class_count: int) -> bytes:
    """A serialized ``ModelInferResponse`` shaped like the real server's for ``images`` images:
    FP32 ``logits [images, 10]``, or the classification extension's ``[images, class_count]``
    BYTES tensor of ``"value:index:label"`` strings."""
    if class_count:
        k = min(class_count, NUM_CLASSES)
        item = b"0.500000:3:class_3"
        raw = (len(item).to_bytes(4, "little") + item) * (images * k)
        out = ipb.ModelInferResponse.InferOutputTensor(name="logits", datatype="BYTES",
                                                       shape=[images, k])
    else:
        raw = bytes(4 * NUM_CLASSES * images)
        out = ipb.ModelInferResponse.InferOutputTensor(name="logits", datatype="FP32",
                                                       shape=[images, NUM_CLASSES])
    return ipb.ModelInferResponse(model_name=model, model_version="1", outputs=[out],
                                  raw_output_contents=[raw]).SerializeToString()


class EchoInference(ipb_grpc.GRPCInferenceServiceServicer):
    """``ModelInfer`` answered with a prebuilt response (per model, batch and class_count); with
    ``--batching``/``--model`` the request's raw images go through the classifier's batching and
    ORT first, exactly as its ``Classify`` does."""

    def __init__(self, classifier: EchoClassifier) -> None:
        self._classifier = classifier
        self._cache: dict[tuple[str, int, int], ipb.ModelInferResponse] = {}

    async def ServerLive(self, request, context):
        return ipb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return ipb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request, context):
        return ipb.ModelReadyResponse(ready=True)

    async def ModelInfer(self, request: ipb.ModelInferRequest, context):
        shape = request.inputs[0].shape
        n = int(shape[0]) if len(shape) == 4 else 1
        k = 0
        if request.outputs:
            params = request.outputs[0].parameters
            if "classification" in params:
                k = int(params["classification"].int64_param)
        key = (request.model_name, n, k)
        resp = self._cache.get(key)
        if resp is None:
            resp = self._cache[key] = ipb.ModelInferResponse.FromString(
                fixed_infer_response(request.model_name, n, k))
        c = self._classifier
        if c._batching or c._session is not None:
            await c.park(request.raw_input_contents[0])
        return resp


async def serve(port: int, max_message_bytes: int, batching: bool = False, delay_ms: float = 2.0,
                model: str = "", device: str = "cpu",
                worker_niceness: int = ServerConfig.worker_niceness) -> None:
    opts = [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)]
    server = grpc.aio.server(options=opts)
    servicer = EchoClassifier(batching, delay_ms / 1000, model, device, worker_niceness)
    cpb_grpc.add_ClassifierServicer_to_server(servicer, server)
    ipb_grpc.add_GRPCInferenceServiceServicer_to_server(EchoInference(servicer), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    sys.stdout.write(f"READY {bound}\n")
    sys.stdout.flush()
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--max-message-bytes", type=int, default=16 << 20)
    p.add_argument("--batching", action="store_true", help="park each request until a batch forms")
    p.add_argument("--delay-ms", type=float, default=2.0, help="batch window with --batching")
    p.add_argument("--model", default="", help="model.onnx to run per batch (per request without "
                   "--batching): the floor of any design that serves this model")
    p.add_argument("--device", default="cpu", choices=sorted(PROVIDERS),
                   help="where --model runs (ORT provider)")
    p.add_argument("--worker-niceness", type=int, default=ServerConfig.worker_niceness,
                   choices=range(20),
                   metavar="0..19", help="niceness added to the --batching worker thread (the "
                   "server's --worker-niceness default)")
    p.add_argument("--event-loop", default="asyncio", choices=EVENT_LOOPS,
                   help="same choice and default as the server's, so the reference runs on the "
                   "loop the server runs on")
    args = p.parse_args(argv)
    from dcs.server.__main__ import loop_factory, run
    try:
        run(serve(args.port, args.max_message_bytes, args.batching, args.delay_ms, args.model,
                  args.device, args.worker_niceness),
            loop_factory(args.event_loop)[1])
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
