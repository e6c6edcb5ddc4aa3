"""Export traced aten graphs to ONNX files with a dynamic batch dimension (dynamo exporter)."""
from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from dcs.robustness.manifest import (
    EPS_NAME,
    GRAD_NAME,
    INPUT_NAME,
    LABEL_NAME,
    LOGITS_NAME,
    LOWER_NAME,
    MARGINS_LOWER_NAME,
    TAU_NAME,
    UPPER_NAME,
)
from dcs.training.export.twin import (
    trace_bounds,
    trace_forward,
    trace_probe,
    trace_twin,
    trace_twin_smooth,
)

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18


def exporter_versions() -> dict[str, str]:
    """Versions of everything that shaped the exported graphs (recorded in the manifest)."""
    import onnx
    import onnxruntime
    import onnxscript

    return {"name": "torch.onnx(dynamo)+make_fx", "torch": torch.__version__,
            "onnx": onnx.__version__, "onnxscript": onnxscript.__version__,
            "onnxruntime": onnxruntime.__version__}


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's chatty loggers (initializer dedup notes etc.) for one export."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnx_ir", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_graph(gm: nn.Module, args: Sequence[torch.Tensor], path: Path,
                 input_names: Sequence[str], output_names: Sequence[str],
                 opset: int = DEFAULT_OPSET, batched: Sequence[bool] | None = None) -> Path:
    """Export ``gm(*args)`` to ``path``; dimension 0 of each ``batched`` input (default: all)
    is the shared dynamic batch."""
    import onnx

    batch = torch.export.Dim("N")
    batched = [True] * len(args) if batched is None else list(batched)
    dynamic = tuple({0: batch} if b else None for b in batched)
    with _quiet_exporter(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            gm, tuple(args), dynamo=True, dynamic_shapes=dynamic, input_names=list(input_names),
            output_names=list(output_names), opset_version=opset, optimize=True, verbose=False,
            external_data=False)
    if program is None:  # pragma: no cover - torch API guard
        raise RuntimeError("torch.onnx.export returned no program")
    program.save(str(path), external_data=False)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    got = [o.name for o in model.graph.output]
    if got != list(output_names):
        raise RuntimeError(f"{path.name}: exported outputs {got}, expected {list(output_names)}")
    for inp, b in zip(model.graph.input, batched):
        dim0 = inp.type.tensor_type.shape.dim[0]
        if b and not dim0.dim_param:
            raise RuntimeError(f"{path.name}: input {inp.name!r} has a fixed batch of "
                               f"{dim0.dim_value}; the batch must stay dynamic")
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    if opsets.get("ai.onnx") != opset:
        raise RuntimeError(f"{path.name}: exported with opset {opsets.get('ai.onnx')}, asked for {opset}")
    return path


def example_batch(input_shape: Sequence[int]) -> int:
    """A tracing batch size that stays symbolic: not 0/1 and equal to no input dimension.

    Symbolic tracing gives equal sizes one symbol ("duck sizing"), so a batch of 3 with 3
    channels would tie the batch to the channel count and bake it into the graph.
    """
    return next(b for b in (3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37) if b not in input_shape)


def example_input(input_shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    batch = example_batch([int(d) for d in input_shape])
    g = torch.Generator().manual_seed(seed)
    return torch.rand((batch, *input_shape), generator=g)


def export_model_onnx(model: nn.Module, input_shape: Sequence[int], path: Path,
                      opset: int = DEFAULT_OPSET) -> Path:
    """``model.onnx``: ``x [N,C,H,W] -> logits [N,K]``."""
    x = example_input(input_shape)
    return export_graph(trace_forward(model, x), (x,), path, [INPUT_NAME], [LOGITS_NAME], opset)


def export_twin_onnx(model: nn.Module, input_shape: Sequence[int], path: Path,
                     opset: int = DEFAULT_OPSET) -> Path:
    """``model.grad.onnx``: ``(x, y int64) -> (logits, d CE_sum / dx)`` (BPDA as set on the model)."""
    x = example_input(input_shape)
    y = torch.zeros(len(x), dtype=torch.long)
    return export_graph(trace_twin(model, x), (x, y), path, [INPUT_NAME, LABEL_NAME],
                        [LOGITS_NAME, GRAD_NAME], opset)


def export_probe_onnx(model: nn.Module, input_shape: Sequence[int], path: Path,
                      opset: int = DEFAULT_OPSET) -> list[str]:
    """``model.probe.onnx``: ``x -> features [, z], weights``; returns the output names."""
    x = example_input(input_shape)
    gm, names = trace_probe(model, x)
    export_graph(gm, (x,), path, [INPUT_NAME], names, opset)
    return names


def export_bounds_onnx(model: nn.Module, input_shape: Sequence[int], path: Path,
                       opset: int = DEFAULT_OPSET) -> Path:
    """``model.bounds.onnx``: ``(x, eps [1]) -> (logits_lower, logits_upper)`` by IBP.

    Raises ``dcs.training.export.bounds.UnsupportedBounds`` for a model with an op IBP cannot handle.
    """
    x = example_input(input_shape)
    eps = torch.tensor([0.05])
    return export_graph(trace_bounds(model, x), (x, eps), path, [INPUT_NAME, EPS_NAME],
                        [LOWER_NAME, UPPER_NAME], opset, batched=[True, False])


def export_twin_smooth_onnx(model: nn.Module, input_shape: Sequence[int], path: Path,
                            opset: int = DEFAULT_OPSET) -> Path:
    """``model.grad.smooth.onnx``: ``(x, y int64, tau [1]) -> (logits, d CE_sum / dx)`` with the
    saturations' tanh-surrogate backward at temperature ``tau`` (issue 25)."""
    x = example_input(input_shape)
    y = torch.zeros(len(x), dtype=torch.long)
    return export_graph(trace_twin_smooth(model, x), (x, y, torch.tensor([0.05])), path,
                        [INPUT_NAME, LABEL_NAME, TAU_NAME], [LOGITS_NAME, GRAD_NAME], opset,
                        batched=[True, True, False])


def export_crown_onnx(model: nn.Module, input_shape: Sequence[int], path: Path,
                      opset: int = DEFAULT_OPSET) -> Path:
    """``model.crown.onnx``: ``(x, y int64, eps [1]) -> margins_lower [N,K]`` (issue 27).

    Raises ``dcs.training.export.bounds.UnsupportedBounds`` for a model without linear rules.
    """
    from dcs.training.export.crown import trace_crown

    x = example_input(input_shape)
    y = torch.zeros(len(x), dtype=torch.long)
    eps = torch.tensor([0.05])
    return export_graph(trace_crown(model, x), (x, y, eps), path, [INPUT_NAME, LABEL_NAME, EPS_NAME],
                        [MARGINS_LOWER_NAME], opset, batched=[True, True, False])
