# syntax=docker/dockerfile:1
# Two images from one file:
#   docker build --target service -t halflabel .          (no torch; onnxruntime-gpu, CPU or CUDA)
#   docker build --target trainer -t halflabel-trainer .  (torch, torchvision, faiss)
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
RUN useradd --uid 10001 --create-home halflabel
COPY pyproject.toml README.md ./
COPY models ./models

FROM base AS service
COPY service ./service
RUN pip install --no-cache-dir ".[service]"
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready')"]
# Listening beyond loopback requires API keys (HALFLABEL_API_KEYS) or an explicit --open.
CMD ["halflabel-serve", "--host", "0.0.0.0", "--port", "8000"]

FROM base AS trainer
COPY trainer ./trainer
RUN pip install --no-cache-dir ".[trainer]"
USER 10001
ENTRYPOINT ["halflabel-train"]
CMD ["--help"]
