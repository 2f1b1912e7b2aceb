"""`pip install ".[service]"` (and `.[trainer]`) picks an ONNX Runtime that has wheels for the
platform: onnxruntime-gpu on Linux x86_64 and Windows AMD64, onnxruntime everywhere else."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

PYPROJECT = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
# sys_platform and platform_machine as Python reports them on each platform.
PLATFORMS = {
    "linux-x86_64": ("linux", "x86_64", "onnxruntime-gpu"),
    "windows-amd64": ("win32", "AMD64", "onnxruntime-gpu"),
    "linux-aarch64": ("linux", "aarch64", "onnxruntime"),
    "macos-arm64": ("darwin", "arm64", "onnxruntime"),
    "macos-x86_64": ("darwin", "x86_64", "onnxruntime"),
    "windows-arm64": ("win32", "ARM64", "onnxruntime"),
}


def installed(extra: str, sys_platform: str, machine: str) -> set[str]:
    environment = default_environment() | {
        "sys_platform": sys_platform, "platform_machine": machine, "extra": extra,
    }
    requirements = map(Requirement, PYPROJECT["optional-dependencies"][extra])
    return {r.name for r in requirements if r.marker is None or r.marker.evaluate(environment)}


@pytest.mark.parametrize("extra", ["service", "trainer"])
@pytest.mark.parametrize("platform", PLATFORMS)
def test_exactly_one_onnx_runtime_that_has_wheels_there(extra: str, platform: str) -> None:
    sys_platform, machine, runtime = PLATFORMS[platform]
    runtimes = installed(extra, sys_platform, machine) & {"onnxruntime", "onnxruntime-gpu"}
    assert runtimes == {runtime}


@pytest.mark.parametrize("platform", PLATFORMS)
def test_gpu_extra_adds_cuda_libraries_only_where_onnxruntime_gpu_runs(platform: str) -> None:
    sys_platform, machine, runtime = PLATFORMS[platform]
    gpu = installed("gpu", sys_platform, machine)
    assert ("onnxruntime-gpu" in gpu) == (runtime == "onnxruntime-gpu")
    assert "nvidia-ml-py" in gpu
