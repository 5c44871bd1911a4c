# The Switchyard training sidecar (`finetune watch`) as a container image. Build from the
# repository root:  docker build -f deploy/sidecar.Dockerfile -t switchyard-sidecar .
# It shares the gateway's data volume (/var/lib/switchyard/data) and needs the base model,
# fetched at build time (FETCH_MODELS=1, the default) or mounted at /var/lib/switchyard/models.

FROM rust:1.89-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p finetune

FROM python:3.11-slim-bookworm AS models
ARG FETCH_MODELS=1
COPY scripts/fetch-models.sh /usr/local/bin/fetch-models.sh
RUN mkdir -p /models && if [ "$FETCH_MODELS" = "1" ]; then fetch-models.sh /models; fi

FROM debian:bookworm-slim
# Unpinned on purpose: Debian stable replaces a pinned version with each security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates procps \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 switchyard \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/switchyard --create-home --shell /usr/sbin/nologin switchyard
COPY --from=build /src/target/release/finetune /usr/local/bin/finetune
COPY --from=models --chown=10001:10001 /models /var/lib/switchyard/models
USER 10001:10001
WORKDIR /var/lib/switchyard
# The sidecar serves no port; the check is that its process is alive.
HEALTHCHECK --interval=30s --timeout=3s CMD ["pgrep", "-x", "finetune"]
ENTRYPOINT ["finetune", "watch", "--data-dir", "/var/lib/switchyard/data", "--base", "/var/lib/switchyard/models/SmolLM2-135M-Instruct.Q4_1.gguf"]
CMD ["--gateway", "http://gateway:8080", "--adapter", "support-bot"]
