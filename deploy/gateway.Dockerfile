# The Switchyard gateway as a container image. Build from the repository root:
#   docker build -f deploy/gateway.Dockerfile -t switchyard-gateway .
# Models are fetched at build time by the project's own script (FETCH_MODELS=1, the default),
# or left out (FETCH_MODELS=0) and mounted at /var/lib/switchyard/models at run time.
# The release build uses the repository's .cargo/config.toml, the flags the benchmarks use.

FROM rust:1.89-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p gateway

FROM python:3.11-slim-bookworm AS models
ARG FETCH_MODELS=1
COPY scripts/fetch-models.sh /usr/local/bin/fetch-models.sh
RUN mkdir -p /models && if [ "$FETCH_MODELS" = "1" ]; then fetch-models.sh /models; fi

FROM debian:bookworm-slim
# Unpinned on purpose: Debian stable replaces a pinned version with each security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 switchyard \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/switchyard --create-home --shell /usr/sbin/nologin switchyard
COPY --from=build /src/target/release/switchyard /usr/local/bin/switchyard
COPY --from=models --chown=10001:10001 /models /var/lib/switchyard/models
COPY deploy/switchyard.toml /etc/switchyard/switchyard.toml
USER 10001:10001
WORKDIR /var/lib/switchyard
EXPOSE 8080
# /health answers while the process runs; orchestrators use /ready for traffic.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s CMD ["curl", "-fsS", "http://127.0.0.1:8080/health"]
ENTRYPOINT ["switchyard", "serve"]
CMD ["--config", "/etc/switchyard/switchyard.toml"]
