# GPU worker image for locdiff flow runs (Docker or Kubernetes work pools; see docs/orchestration.md).
# Build from the project root:   docker build -f infra/worker.Dockerfile -t locdiff-worker:0.1 .
# Not built or run in this repository's CI (no Docker daemon, no GPU there).
ARG CUDA_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04
FROM ${CUDA_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DO_NOT_TRACK=1

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3-pip git ca-certificates tini \
 && rm -rf /var/lib/apt/lists/*

RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /opt/locdiff
# Dependencies first (layer cache), then the package itself.
COPY pyproject.toml README.md ./
COPY locdiff_core ./locdiff_core
COPY locdiff ./locdiff
COPY prefect.yaml ./
RUN pip install --upgrade pip && pip install .

# No credentials in the image: PREFECT_API_URL / PREFECT_API_KEY, LOCDIFF_STORAGE (s3://bucket/prefix),
# AWS_* or LOCDIFF_S3_ENDPOINT, HF_TOKEN come from the work pool's job variables or cluster secrets.
ENV LOCDIFF_PROJECT_DIR=/opt/locdiff
USER 1000:1000
ENTRYPOINT ["/usr/bin/tini", "--"]
# The worker replaces the command with `prefect flow-run execute` for each flow run.
CMD ["python", "-m", "prefect", "version"]
