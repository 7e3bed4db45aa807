# faastastic in a container: the server plus a shell and Python for classic- and http-mode
# functions on the embedded local platform.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates python3 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/faastastic /usr/local/bin/faastastic
VOLUME /var/lib/faastastic
EXPOSE 8080 8082
ENTRYPOINT ["faastastic", "serve", "--listen", "0.0.0.0:8080", "--data-dir", "/var/lib/faastastic"]
