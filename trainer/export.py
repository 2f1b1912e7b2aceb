"""ONNX export with a dynamic batch axis, a parity check against PyTorch, and an FP16 variant."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from models.manifest import InputSpec, OutputSpec
from trainer.errors import ExportError
from trainer.network import Classifier, ProbabilitiesAndEntropy

OPSET = 18
PARITY_TOLERANCE = 1e-4
PARITY_BATCH = 32
OUTPUTS = OutputSpec()


def export_onnx(classifier: Classifier, spec: InputSpec, path: Path) -> Path:
    """Write `classifier` as ONNX: input `spec.input_name`, outputs probabilities and entropy."""
    graph = ProbabilitiesAndEntropy(classifier).cpu().eval()
    example = torch.zeros(2, spec.channels, spec.height, spec.width)
    # The exporter narrates every step on stdout and warns about internals; keep the CLI clean.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch").setLevel(logging.ERROR)
        torch.onnx.export(
            graph, (example,), path,
            input_names=[spec.input_name],
            output_names=[OUTPUTS.probabilities, OUTPUTS.entropy],
            dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
            opset_version=OPSET, dynamo=True, external_data=False,
        )
    return path


def check_parity(onnx_path: Path, classifier: Classifier, images: np.ndarray,
                 tolerance: float = PARITY_TOLERANCE) -> float:
    """Largest |ONNX Runtime - PyTorch| over both outputs; ExportError above `tolerance`."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    onnx_outputs = session.run([OUTPUTS.probabilities, OUTPUTS.entropy], {input_name: images})
    graph = ProbabilitiesAndEntropy(classifier).cpu().eval()
    with torch.no_grad():
        torch_outputs = graph(torch.as_tensor(images))
    difference = max(
        float(np.max(np.abs(ours - theirs.numpy())))
        for ours, theirs in zip(onnx_outputs, torch_outputs, strict=True)
    )
    if not difference <= tolerance:  # also catches NaN
        raise ExportError(
            f"ONNX output differs from PyTorch by {difference:.2e} (limit {tolerance:.0e}) on "
            f"{onnx_path.name}; nothing was published — report this with the model's weights.pt"
        )
    return difference


def convert_to_fp16(onnx_path: Path, fp16_path: Path) -> Path:
    """An FP16 copy for GPU serving; inputs and outputs stay float32 so callers need no change."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(onnx_path)), keep_io_types=True)
    onnx.save(model, str(fp16_path))
    return fp16_path
