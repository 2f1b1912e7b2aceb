# syntax=docker/dockerfile:1
# Three images from one file, each tagged with the project version that k8s/ pins:
#   docker build --target service     -t halflabel-service:0.1.0 .      (no torch; ONNX Runtime)
#   docker build --target service-gpu -t halflabel-service-gpu:0.1.0 .  (+ CUDA, cuDNN, NVML)
#   docker build --target trainer     -t halflabel-trainer:0.1.0 .      (torch, torchvision, faiss)
# All run as user 10001 and write only to volumes, so they run with a read-only root filesystem
# (`docker run --read-only --tmpfs /tmp -v models:/models ...`): /models (the model repository),
# /tmp (scratch and the service's outage spool) and, for the trainer, /feedback and /data.
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    HALFLABEL_MODEL_DIR=/models
WORKDIR /app
RUN groupadd --gid 10001 halflabel \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp halflabel
COPY pyproject.toml README.md ./
COPY models ./models

FROM base AS service
COPY service ./service
RUN pip install --no-cache-dir ".[service]"
ENV HALFLABEL_HOST=0.0.0.0 HALFLABEL_PORT=8000 HALFLABEL_METRICS_PORT=9100
USER 10001
EXPOSE 8000 9100
HEALTHCHECK --interval=10s --timeout=3s \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready')"]
# Listening beyond loopback requires API keys (HALFLABEL_API_KEYS) or HALFLABEL_ALLOW_OPEN=true.
CMD ["halflabel-serve"]

FROM service AS service-gpu
USER 0
RUN pip install --no-cache-dir ".[service,gpu]"
USER 10001

FROM base AS trainer
COPY trainer ./trainer
RUN pip install --no-cache-dir ".[trainer]"
# Feedback snapshots must outlive the pod: k8s mounts a volume here. Matplotlib needs a
# writable config directory for the training plots.
ENV HALFLABEL_SNAPSHOT_DIR=/feedback MPLCONFIGDIR=/tmp/matplotlib
USER 10001
ENTRYPOINT ["halflabel-train"]
CMD ["--help"]
