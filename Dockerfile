# syntax=docker/dockerfile:1
#
# One image for every meterd component: each Kubernetes workload picks its
# subcommand (collector, aggregator, enforcer) with its args, e.g.
#   docker build --build-arg VERSION=v0.1.0 -t ghcr.io/meterd/meterd:v0.1.0 .
#   docker run --rm ghcr.io/meterd/meterd:v0.1.0 version
# cmd/meterd/image_test.go checks the properties below (static binary, stamped
# version, non-root final stage) without a Docker engine.

FROM --platform=$BUILDPLATFORM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN --mount=type=cache,target=/go/pkg/mod go mod download
COPY . .
ARG VERSION=dev
ARG TARGETOS TARGETARCH
# CGO_ENABLED=0: the embedded store is pure Go (modernc.org/sqlite), so the
# binary is static and runs on an image without a libc.
RUN --mount=type=cache,target=/go/pkg/mod --mount=type=cache,target=/root/.cache/go-build \
    CGO_ENABLED=0 GOOS=$TARGETOS GOARCH=$TARGETARCH \
    go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /out/meterd ./cmd/meterd

# distroless/static: CA certificates, tzdata and a nonroot user (65532), no
# shell, no package manager.
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/meterd /usr/local/bin/meterd
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/meterd"]
