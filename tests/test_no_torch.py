"""The service must run where torch is not installed: importing it never pulls torch in."""

from __future__ import annotations

import subprocess
import sys


def test_service_imports_without_torch() -> None:
    code = (
        "import sys, service, service.app, service.cli\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision'))\n"
        "assert not loaded, loaded\n"
        "assert 'onnxruntime' in sys.modules  # proves the app's real imports ran\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
