# Builds the `covet` binary and runs it on a slim base.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin covet

FROM debian:bookworm-slim
COPY --from=build /src/target/release/covet /usr/local/bin/covet
ENTRYPOINT ["covet"]
CMD ["broker", "--data-dir", "/data", "--listen", "0.0.0.0:7420"]
