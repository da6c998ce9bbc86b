# ctxgate container image: a release build on the official Rust image, run on distroless
# (glibc and libgcc only: no shell, no package manager) as the image's nonroot user (65532).
#
#   docker build -t ctxgate:0.1.0 .
#   docker run --rm -p 8080:8080 ctxgate:0.1.0
#
# The binary needs no CA bundle (rustls with the bundled webpki roots) and no OpenSSL.

FROM rust:1.95-bookworm AS builder
WORKDIR /src
# The workspace: both members' manifests, the lock file, and every target Cargo.toml declares
# (benches included, or Cargo refuses the manifest). rust-toolchain.toml stays out (see
# .dockerignore): this image is the toolchain.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY loadtests/mock-upstream ./loadtests/mock-upstream
RUN cargo build --release --locked --bin ctxgate \
 && install -D -m 0755 target/release/ctxgate /out/ctxgate \
 && install -d -m 0750 /out/state

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /out/ctxgate /usr/local/bin/ctxgate
COPY config/ctxgate.toml /etc/ctxgate/ctxgate.toml
# Writable home of the embedded session store when none is mounted.
COPY --from=builder --chown=65532:65532 /out/state /var/lib/ctxgate
USER 65532:65532
# glibc keeps freed heap memory after large allocations (a session's checkpoint is rewritten whole
# on every turn) and its mmap threshold grows with them: a fixed 128 KiB threshold hands blocks
# that size and larger back to the system. Measured on the embedded store (loadtests/README.md,
# "Soak"): RSS after 1,600 turns of 60 KB messages 147 MB with glibc's default, 57 MB with this.
ENV GLIBC_TUNABLES=glibc.malloc.mmap_threshold=131072
WORKDIR /var/lib/ctxgate
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/ctxgate"]
# The default file listens on loopback (right for `cargo run`, wrong in a container), so the
# image's default command listens on every interface and keeps sessions under /var/lib/ctxgate.
# The Helm chart replaces these arguments with its own config file.
CMD ["serve", "--config", "/etc/ctxgate/ctxgate.toml", "--listen", "0.0.0.0:8080", "--store", "embedded:/var/lib/ctxgate/ctxgate.redb"]
