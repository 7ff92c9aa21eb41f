# Images of the waste classifier. One Dockerfile, two targets:
#
#   serve (the default, last stage)   docker build -t waste-classifier .
#   train (torchrun + training extras) docker build --target train -t waste-classifier-train .
#
# GPU (default): torch==2.14.1 from PyPI is a CUDA 13.0 build that carries its own CUDA
# runtime, cuDNN 9 and NCCL as pip packages, so the base image needs no CUDA. The host needs
# an NVIDIA driver >= 580 (CUDA 13.0's minimum on Linux), a GPU of compute capability 7.5 or
# newer (Turing and later: the wheels are built for sm_75 to sm_120) and the NVIDIA Container
# Toolkit; run with `docker run --gpus all` or compose's GPU reservation.
#
# CPU only: --build-arg TORCH_VARIANT=cpu installs the same pinned versions from PyTorch's
# CPU wheel index (torch==2.14.1+cpu): no CUDA libraries, a much smaller image.
#
# Builds with BuildKit (Docker's default builder since 23.0, built into Engine 18.09+ with
# DOCKER_BUILDKIT=1; RUN --mount caches pip's downloads). No `# syntax=` line: the engine's
# own Dockerfile frontend reads everything here, and needs no registry to fetch one.
# HEALTHCHECK --start-interval needs Docker Engine 25+ (older engines refuse the file).
#
# Requirements have one source of truth, pyproject.toml: the deps stage extracts
# [project].dependencies (plus the `train` extra for the train target) and installs them
# before any source is copied, so editing code rebuilds only the small source layers.

ARG PYTHON_IMAGE=python:3.11-slim-trixie

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv "$VIRTUAL_ENV" \
 && groupadd --system --gid 10001 waste \
 && useradd --system --uid 10001 --gid waste --create-home --home-dir /home/waste \
        --shell /usr/sbin/nologin waste

# ---- dependencies of the service: rebuilt only when pyproject.toml changes -------------
FROM base AS deps
ARG TORCH_VARIANT=cuda
ARG TORCH_CPU_INDEX_URL=https://download.pytorch.org/whl/cpu
WORKDIR /opt/build
COPY pyproject.toml ./
# For the CPU variant the venv's own pip.conf adds PyTorch's CPU index; pip then prefers
# torch==2.14.1+cpu (a local version sorts above 2.14.1) for every later install in this
# venv too, so the train target and the project install keep the CPU build.
RUN --mount=type=cache,target=/root/.cache/pip \
    set -eu; \
    case "$TORCH_VARIANT" in \
      cuda) ;; \
      cpu) printf '[global]\nextra-index-url = %s\n' "$TORCH_CPU_INDEX_URL" > "$VIRTUAL_ENV/pip.conf" ;; \
      *) echo "TORCH_VARIANT must be cuda or cpu, not '$TORCH_VARIANT'" >&2; exit 2 ;; \
    esac; \
    python -c 'import tomllib; project = tomllib.load(open("pyproject.toml", "rb"))["project"]; core = project["dependencies"]; train = project["optional-dependencies"]["train"]; open("requirements.txt", "w").write("\n".join(core) + "\n"); open("requirements-train.txt", "w").write("\n".join(core + train) + "\n")'; \
    pip install -r requirements.txt

# ---- training: the same environment plus the `train` extra, for torchrun jobs ----------
FROM deps AS train-deps
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -r requirements-train.txt

FROM train-deps AS train
WORKDIR /opt/build
COPY pyproject.toml README.md ./
COPY wastenet/ wastenet/
COPY training/ training/
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps . && rm -rf build ./*.egg-info
# The job may run under any host UID (compose's `user:`), which has no home directory:
# caches go to /tmp. Pretrained weights are looked up in $TORCH_HOME/hub/checkpoints.
ENV HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib \
    TORCH_HOME=/torch \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /workspace
USER 10001:10001
CMD ["python", "-m", "training", "--help"]

# ---- the service (default target) ------------------------------------------------------
# app/ plus the shared core (wastenet/: schema, networks, artifacts, preprocessing). No
# training code, no training extras.
FROM deps AS serve
WORKDIR /opt/build
COPY pyproject.toml README.md ./
COPY wastenet/ wastenet/
COPY app/ app/
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps . && rm -rf build ./*.egg-info
# Settings are WASTE_* variables (python -m app --help-settings lists them all). Models are
# mounted read-only at WASTE_MODEL_DIR; the demo bootstrap is off, it needs the train extra.
ENV WASTE_HOST=0.0.0.0 \
    WASTE_PORT=8000 \
    WASTE_MODEL_DIR=/models \
    WASTE_BOOTSTRAP_DEMO=false \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /home/waste
USER 10001:10001
EXPOSE 8000
# Loading and warming the models takes a while (longer on first CUDA use): failures in the
# first 2 minutes do not count. Slim images have no curl, so Python asks /health/ready.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --start-interval=5s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; url = 'http://127.0.0.1:' + os.environ.get('WASTE_PORT', '8000') + '/health/ready'; sys.exit(0 if urllib.request.urlopen(url, timeout=4).status == 200 else 1)"]
# Host, port, workers, keep-alive and the graceful-shutdown time come from WASTE_* settings.
CMD ["python", "-m", "app"]
