"""ONNX Runtime inference for one published model version: CUDA when present, else CPU."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

from models.errors import InvalidArtifactError
from models.repository import FP16_MODEL_FILE, Artifact
from service.errors import DeviceUnavailableError

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


@dataclass(frozen=True)
class Outputs:
    """What the model says about a batch: class probabilities (N, K) and entropy in nats (N,)."""

    probabilities: np.ndarray
    entropy: np.ndarray


class OnnxModel:
    """An ONNX Runtime session over an artifact; `run` is thread-safe and releases the GIL."""

    def __init__(
        self,
        artifact: Artifact,
        device: Literal["auto", "cpu", "cuda"] = "auto",
        intra_op_threads: int = 0,
    ) -> None:
        self.manifest = artifact.manifest
        self.session, self.path = _open_session(artifact, device, intra_op_threads)
        self.provider = self.session.get_providers()[0]
        self.precision = "fp16" if self.path.name == FP16_MODEL_FILE else "fp32"
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        self.input_dtype = np.float16 if model_input.type == "tensor(float16)" else np.float32
        outputs = self.manifest.outputs
        self.output_names = [outputs.probabilities, outputs.entropy]
        log.info("%s v%d runs on %s (%s)", self.manifest.name, self.manifest.version,
                 self.provider, self.precision)

    def run(self, batch: np.ndarray) -> Outputs:
        """Run a float32 batch (N, C, H, W) through the model."""
        batch = batch.astype(self.input_dtype, copy=False)
        if self.provider == CUDA:
            probabilities, entropy = self._run_bound(batch)
        else:
            probabilities, entropy = self.session.run(self.output_names, {self.input_name: batch})
        return Outputs(probabilities.astype(np.float32), entropy.astype(np.float32))

    def _run_bound(self, batch: np.ndarray) -> list[np.ndarray]:
        # IO binding copies the input to the GPU once and lets ORT allocate outputs there,
        # instead of round-tripping through intermediate host buffers.
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.input_name, batch)
        for name in self.output_names:
            binding.bind_output(name, "cuda")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def warm_up(self, max_batch_size: int) -> None:
        """Run the batch sizes the batcher will send once, so first requests are not slow."""
        spec = self.manifest.input
        try:
            for size in sorted({1, max_batch_size}):
                self.run(np.zeros((size, spec.channels, spec.height, spec.width), np.float32))
        except Exception as exc:  # e.g. the graph's input shape differs from the manifest's
            raise InvalidArtifactError(
                f"{self.path} fails on a warm-up batch: {exc}; republish this version"
            ) from exc


def _open_session(
    artifact: Artifact, device: str, intra_op_threads: int
) -> tuple[ort.InferenceSession, Path]:
    """A session on the GPU (FP16 file when there is one) if asked or present, else on CPU."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if device == "cuda" or (device == "auto" and _nvidia_device_present()):
        # The FP16 file only pays off on a GPU; on CPU it would be slower and less exact.
        path = artifact.fp16_onnx_path or artifact.onnx_path
        ort.preload_dlls()  # CUDA and cuDNN from the gpu extra's nvidia-* wheels, where installed
        session = _load(path, options, [CUDA, CPU])
        # Without a usable GPU (driver, CUDA libraries), ORT silently falls back to CPU.
        if session.get_providers()[0] == CUDA:
            return session, path
    if device == "cuda":
        raise DeviceUnavailableError(
            "HALFLABEL_DEVICE=cuda but ONNX Runtime cannot use a GPU here; "
            "check the CUDA install or use HALFLABEL_DEVICE=auto"
        )
    return _load(artifact.onnx_path, options, [CPU]), artifact.onnx_path


def _nvidia_device_present() -> bool:
    # Trying CUDA where there is no GPU makes ONNX Runtime print a scary error at every start.
    return any(Path("/dev").glob("nvidia[0-9]*"))


def _load(path: Path, options: ort.SessionOptions, providers: list[str]) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # ORT raises its own untyped errors for bad graphs
        raise InvalidArtifactError(f"{path} does not load in ONNX Runtime: {exc}") from exc
