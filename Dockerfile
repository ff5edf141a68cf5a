# Build stage: the same steps as scripts/run.sh (build tools from scripts/lib.sh, then a
# locked release build).
FROM rust:1-bookworm AS build
# scripts/lib.sh is bash.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src
# The commit `stream-relay --version` names, when the context has no .git:
# docker build --build-arg STREAM_RELAY_COMMIT=$(git rev-parse --short=12 HEAD) .
ARG STREAM_RELAY_COMMIT
ENV STREAM_RELAY_COMMIT=${STREAM_RELAY_COMMIT}
COPY . .
RUN . scripts/lib.sh \
    && need_build_tools \
    && cargo build --release --locked --bin stream-relay \
    && cp "$CARGO_TARGET_DIR/release/stream-relay" /stream-relay

# Runtime stage: the binary, CA roots for https upstreams, and an unprivileged user.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin relay \
    && mkdir -p /etc/stream-relay /run/stream-relay /var/lib/stream-relay \
    && chown relay /run/stream-relay /var/lib/stream-relay
COPY --from=build /stream-relay /usr/local/bin/stream-relay
# The shipped configuration, listening on every interface of the container, with its pid
# file, upgrade socket and request rows in folders the relay user owns.
COPY conf/relay.yaml /etc/stream-relay/relay.yaml
RUN sed -i -e 's|proxy: 127.0.0.1:8080|proxy: 0.0.0.0:8080|' \
           -e 's|/tmp/stream-relay/rows.jsonl|/var/lib/stream-relay/rows.jsonl|' \
           -e 's|/tmp/stream-relay|/run/stream-relay/stream-relay|' /etc/stream-relay/relay.yaml \
    && stream-relay -t -c /etc/stream-relay/relay.yaml
USER relay
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s \
    CMD bash -c 'exec 3<>/dev/tcp/127.0.0.1/9090 && printf "GET /healthz HTTP/1.0\r\n\r\n" >&3 && head -1 <&3 | grep -q " 200 "'
ENTRYPOINT ["stream-relay"]
CMD ["-c", "/etc/stream-relay/relay.yaml"]
