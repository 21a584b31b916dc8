#!/usr/bin/env bash
# docker/build.sh - the steps of docker/Dockerfile, one subcommand per RUN.
#
# The Dockerfile runs these inside its stages and `make docker-check`
# (docker/check.sh) runs the very same script in a debootstrapped Debian 12
# root, so what the image does is tested without a Docker engine.
#
#   build stage (debian:bookworm, source in the current directory):
#     docker/build.sh deps            apt-get the build and test dependencies (the Makefile's lists)
#     docker/build.sh build           make -j
#     docker/build.sh test            make test (cases needing ../shared skip)
#     docker/build.sh install DESTDIR the runtime layout under DESTDIR (copied into the runtime stage)
#   runtime stage (debian:bookworm-slim):
#     build.sh runtime                apt-get the shared libraries, create the non-root user
#
# Runtime layout:
#   /usr/local/bin/saserve                  the server
#   /usr/local/bin/saserve-healthcheck      GET /health (used by HEALTHCHECK)
#   /usr/local/share/saserve/models/        the bundled model (SASERVE_MODEL's default)
#   /usr/local/share/saserve/saserve.example.json
#   /usr/local/share/doc/saserve/           README.md, LICENSE
set -euo pipefail

# The user the server runs as; numeric so that Kubernetes' runAsNonRoot can
# check it (docker/k8s/deployment.yaml uses the same ids).
SASERVE_UID=10001
SASERVE_GID=10001
RUNTIME_PKGS=(libmicrohttpd12 libjansson4 libopenblas0 libuv1)

export DEBIAN_FRONTEND=noninteractive

apt_install() {
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

apt_clean() {
    apt-get clean
    rm -rf /var/lib/apt/lists/*
}

cmd=${1:-}
case "$cmd" in
deps)
    # make first; then the Makefile's own deps/test-deps targets install
    # exactly the packages it lists (DEB_PKGS, TEST_DEB_PKGS), as root.
    apt_install make ca-certificates
    make deps test-deps
    apt_clean
    ;;
build)
    make -j"$(nproc)"
    ;;
test)
    make test
    ;;
install)
    dest=${2:?usage: build.sh install DESTDIR}
    install -d "$dest/usr/local/bin" "$dest/usr/local/share/saserve/models" "$dest/usr/local/share/doc/saserve"
    install -m 0755 build/saserve "$dest/usr/local/bin/saserve"
    install -m 0755 docker/healthcheck.sh "$dest/usr/local/bin/saserve-healthcheck"
    install -m 0644 models/*.gguf "$dest/usr/local/share/saserve/models/"
    install -m 0644 config/saserve.example.json "$dest/usr/local/share/saserve/saserve.example.json"
    install -m 0644 README.md LICENSE "$dest/usr/local/share/doc/saserve/"
    ;;
runtime)
    apt_install "${RUNTIME_PKGS[@]}"
    apt_clean
    groupadd --system --gid "$SASERVE_GID" saserve
    useradd --system --uid "$SASERVE_UID" --gid "$SASERVE_GID" --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin saserve
    ;;
*)
    echo "usage: $0 deps | build | test | install DESTDIR | runtime" >&2
    exit 2
    ;;
esac
