# One image with the five service binaries and merklectl; each Kubernetes Deployment runs one
# of them (see k8s/ and helm/). Build: docker build -t merkle-mesh:0.1.0 .
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --workspace --bins \
 && mkdir /out \
 && cp target/release/merkle-scheduler target/release/merkle-tree-builder \
       target/release/merkle-db-sync target/release/merkle-cache \
       target/release/merkle-discovery target/release/merklectl /out/

FROM debian:bookworm-slim
RUN groupadd --system --gid 10001 merkle \
 && useradd --system --uid 10001 --gid merkle --no-create-home --shell /usr/sbin/nologin merkle
COPY --from=build /out/ /usr/local/bin/
# The public CAs (Debian's bundle, from the build image) for rediss:// without REDIS_CA_FILE,
# as with a managed Redis whose certificate a public CA signs.
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
USER 10001:10001
# Plain HTTP/2 gRPC; each service listens on its documented port (see README).
EXPOSE 50051 50052 50053 50054 50055
ENTRYPOINT ["/usr/local/bin/merklectl"]
CMD ["--help"]
