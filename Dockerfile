# The one image every service runs from; the Kubernetes manifests pick the service by command.
# For a CPU-only image, point PIP_INDEX_URL (build arg) at an index that serves torch's CPU wheels.
FROM python:3.11-slim
ARG PIP_INDEX_URL
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY libs ./libs
COPY services ./services
RUN pip install --no-cache-dir -c constraints.txt torch==2.13.0 \
 && pip install --no-cache-dir -c constraints.txt .
ENV PYTHONUNBUFFERED=1
USER 65534
