"""halflabel's trainer: few labels + many unlabeled images → a calibrated ONNX model, published.

Public API: `trainer.data.load_dataset`, `trainer.pipeline.run_pipeline`,
`trainer.publish.export_and_publish` and `trainer.publish.evaluate_onnx` (see docs/training.md).
"""

import os

# OpenMP threads that spin while waiting for work starve everything else on a shared or busy
# machine (5-10x slower steps with two processes on two cores); sleeping costs little when idle.
# It must be set before torch loads OpenMP, hence here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
