"""ONNX Runtime sessions for a package's graphs: provider choice (CUDA only when it really
loads, checked with ``session.get_providers()``), thread settings, and the checks of a graph's
inputs and outputs against the manifest."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dcs.robustness.manifest import INPUT_NAME, PackageError

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
#: CUDA provider options. The exhaustive cuDNN search costs ~23 ms at every change of input
#: shape (4 ms for the heuristic one) but picks kernels 1.2-1.5x faster; CUDA sessions run
#: fixed batch shapes (``static_batch``, robustness/padding.py), so it is paid once per session.
CUDA_OPTIONS = {"cudnn_conv_algo_search": "EXHAUSTIVE"}


@dataclass(frozen=True)
class SessionOptions:
    """How to build ORT sessions. ``device``: 'auto' (CUDA if it really loads), 'cuda' or 'cpu'."""

    device: str = "auto"
    intra_op_threads: int = 0  # 0 lets ORT decide
    inter_op_threads: int = 1
    load_grad: bool = True
    load_bounds: bool = True
    load_probe: bool = True
    #: pad every call to a fixed batch (robustness/padding.py); None = on for CUDA sessions
    static_batch: bool | None = None


def _ort():
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise PackageError(f"onnxruntime is not installed ({exc}); pip install onnxruntime") from None
    return ort


def make_session(path: Path, opts: SessionOptions):
    """Create an ORT session; returns ``(session, provider_in_use)``."""
    ort = _ort()
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(opts.intra_op_threads)
    so.inter_op_num_threads = int(opts.inter_op_threads)
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    cuda_wanted = opts.device in ("auto", "cuda") and CUDA in ort.get_available_providers()
    wanted: list = [(CUDA, dict(CUDA_OPTIONS)), CPU] if cuda_wanted else [CPU]
    try:
        sess = ort.InferenceSession(str(path), sess_options=so, providers=wanted)
    except Exception as exc:  # noqa: BLE001 - ORT raises several private exception types
        raise PackageError(f"{path}: onnxruntime could not load the graph ({exc})") from None
    in_use = sess.get_providers()[0]
    if opts.device == "cuda" and in_use != CUDA:
        raise PackageError(f"{path}: CUDA was requested but {in_use} is what loaded")
    if opts.device == "auto" and cuda_wanted and in_use != CUDA:
        log.warning("%s: CUDA provider is available but did not load; running on %s", path, in_use)
    return sess, in_use


def check_io(path: Path, sess, inputs: Sequence[str], outputs: Sequence[str]) -> None:
    """The graph's input and output names are exactly the manifest's, in order."""
    got_in = [i.name for i in sess.get_inputs()]
    got_out = [o.name for o in sess.get_outputs()]
    if got_in != list(inputs):
        raise PackageError(f"{path}: graph inputs {got_in}, expected {list(inputs)}")
    if got_out != list(outputs):
        raise PackageError(f"{path}: graph outputs {got_out}, expected {list(outputs)}")


def check_input_shape(path: Path, sess, input_shape: tuple[int, ...]) -> None:
    """The graph's image input is float32 of the manifest's shape (any batch size)."""
    shape = sess.get_inputs()[0].shape
    dtype = sess.get_inputs()[0].type
    if dtype != "tensor(float)":
        raise PackageError(f"{path}: input {INPUT_NAME!r} has type {dtype}, expected tensor(float)")
    if len(shape) != 1 + len(input_shape):
        raise PackageError(f"{path}: input rank {len(shape)}, manifest says {1 + len(input_shape)}")
    for got, want in zip(shape[1:], input_shape):
        if isinstance(got, int) and got != want:
            raise PackageError(
                f"{path}: input shape {shape} does not match the manifest's {list(input_shape)}")


def open_checked(path: Path, opts: SessionOptions, inputs: Sequence[str], outputs: Sequence[str],
                 input_shape: tuple[int, ...]):
    """``make_session`` then ``check_io`` and ``check_input_shape``; returns ``(session, provider_in_use)``."""
    sess, provider = make_session(path, opts)
    check_io(path, sess, inputs, outputs)
    check_input_shape(path, sess, input_shape)
    return sess, provider
