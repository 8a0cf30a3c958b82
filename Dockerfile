# lameduck: the sidecar proxy, `lameduck inject` and the admission webhook, one binary.
#   docker build -t ghcr.io/lameduck/lameduck:0.1.0 .
# Both architectures EKS runs (arm64 natively on an arm64 builder, else under QEMU), pushed:
#   docker buildx build --platform linux/amd64,linux/arm64 -t REGISTRY/lameduck:0.1.0 --push .
# .github/workflows/release.yml does this on a version tag.
# Build: the official Rust image (Debian 12), matching the runtime's glibc.
FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts keep the registry and target/ between builds; the binary is copied out of
# the cached target/ so the next stage can see it.
# glibc is linked in (crt-static): most of the sidecar's RSS is code pages, and the shared
# libc, libm, libgcc_s and ld.so mappings cost every pod 1.0-1.6 MiB more (idle 6.5-7.2 ->
# 5.5 MiB, 1,000 idle connections 22.3-23.0 -> 21.4 MiB; docs/benchmark.md). The target is
# named so that build scripts and proc macros stay dynamic. The runtime image keeps its
# glibc: an `--upstream` host name is still resolved through its NSS modules (same 2.36).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    target="$(rustc --print host-tuple)" \
    && RUSTFLAGS="-C target-feature=+crt-static" \
       cargo build --release --locked --bin lameduck --target "$target" \
    && install -m 0755 "target/$target/release/lameduck" /usr/local/bin/lameduck

# Run: distroless "cc" (glibc and libgcc, no shell, no package manager), as the image's
# non-root user 65532, numeric so that runAsNonRoot can be verified by the kubelet.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /usr/local/bin/lameduck /usr/local/bin/lameduck
USER 65532:65532
# 9900 traffic and 9901 admin as injected; 8443 the webhook.
EXPOSE 9900 9901 8443
ENTRYPOINT ["lameduck"]
