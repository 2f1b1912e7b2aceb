"""The baseline the service is compared with: a naive per-request PyTorch-eager endpoint.

One worker, like a plain Flask app: each request is decoded with the same preprocessing as the
service and run alone (batch of 1) through the eager model with `THREADS` torch threads, the
same budget ONNX Runtime gets in the service; no batching, no ONNX Runtime.

Run: python benchmarks/naive_torch_server.py WEIGHTS.pt MANIFEST.json PORT THREADS
"""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import torch

from models.manifest import Manifest
from models.preprocessing import preprocess

sys.path.insert(0, str(Path(__file__).parent))
from resnet_classifier import resnet18_classifier  # noqa: E402


def serve(weights: Path, manifest_path: Path, port: int, threads: int) -> None:
    torch.set_num_threads(threads)
    manifest = Manifest.model_validate_json(manifest_path.read_text())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = resnet18_classifier(len(manifest.classes))
    model.load_state_dict(torch.load(weights))
    model.to(device).eval()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            image = torch.from_numpy(preprocess(body, manifest.input))[None].to(device)
            with torch.inference_mode():
                probabilities, entropy = (output.cpu() for output in model(image))
            best = int(probabilities[0].argmax())
            answer = json.dumps({
                "label": manifest.classes[best],
                "confidence": float(probabilities[0, best]),
                "entropy": float(entropy[0]),
            }).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *_: object) -> None:
            pass

    HTTPServer(("127.0.0.1", port), Handler).serve_forever()


if __name__ == "__main__":
    serve(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
