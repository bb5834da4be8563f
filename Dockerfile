# The one image every container of k8s/ runs (the manifests pick the service by command):
#   docker build -t cloudmatrix-infer:0.1.0 .
# Build stage: a virtual environment with torch's CPU build (from TORCH_INDEX_URL) and the project.
# Final stage: that environment on a slim Python, no compilers or package caches, a non-root user,
# a root filesystem the pods mount read-only (HOME and temporary files under /tmp, a volume).
# BASE: any image with Python 3.11 as `python` (venv included); `make image` passes a Debian
# bookworm base it makes with mmdebstrap (docs/kubernetes-image.md).
ARG BASE=python:3.11-slim
FROM ${BASE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY libs ./libs
COPY services ./services
RUN pip install --index-url "$TORCH_INDEX_URL" torch==2.13.0 \
 && pip install -c constraints.txt . \
 && pip uninstall -y pip setuptools wheel

FROM ${BASE}
COPY --from=build /opt/venv /opt/venv
# The shipped trained model; each instance pod's init container quantizes it to INT8.
COPY models /opt/cmx/models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp
RUN groupadd --gid 10001 cmx && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin cmx
USER 10001:10001
WORKDIR /tmp
CMD ["python", "-m", "services.gateway", "--help"]
