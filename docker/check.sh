#!/usr/bin/env bash
# docker/check.sh - `make docker-check`: run docker/Dockerfile's steps without
# a Docker engine, in clean Debian 12 roots made with debootstrap.
#
#   static         docker/validate.py (YAML/JSON of compose, Prometheus, Grafana,
#                  Kubernetes; metric names against server/metrics.c) and
#                  promtool check config docker/prometheus.yml
#   build stage    a fresh root; the build context (.dockerignore applied) in
#                  /src; docker/build.sh deps, build, test, install /out
#   runtime stage  another fresh root; build.sh runtime (shared libraries,
#                  non-root user); /out copied in (COPY --from=build)
#   run            the Dockerfile's ENV, USER and WORKDIR, `saserve serve` in
#                  the runtime root inside a private network namespace (so the
#                  image's 0.0.0.0:8080 is only reachable there): the
#                  HEALTHCHECK command, GET /health, one completion, /metrics,
#                  the process's uid, then SIGTERM and a clean exit
#
# The debootstrapped base (minbase, like debian:bookworm[-slim]) is cached in
# build/docker-check/bookworm-minbase.tar; delete it to start over.  The roots
# are unpacked under $TMPDIR (/var/tmp) and removed afterwards.  Everything
# runs in a private mount namespace; /proc, /sys, /dev and /dev/pts are
# mounted per root and unmounted by the exit trap in any case.
#
# Needs root (debootstrap, chroot, mount).  Debian packages come from the
# host's configured apt mirror (DEBIAN_MIRROR / DEBIAN_SECURITY_MIRROR override).
{ # read whole before it runs: editing this file during a run is safe
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

if [ "$(id -u)" != 0 ]; then
    echo "docker-check: needs root (debootstrap, chroot, mount)" >&2
    exit 1
fi
# A private mount namespace: no mount made here can leak to the host, and
# all of them vanish with the last process even if the trap cannot run.
if [ -z "${SASERVE_DOCKER_CHECK_NS:-}" ]; then
    SASERVE_DOCKER_CHECK_NS=1 exec unshare --mount --propagation private -- "$0" "$@"
fi

T0=${SASERVE_DOCKER_CHECK_T0:-$(date +%s)}
export SASERVE_DOCKER_CHECK_T0=$T0
step() { printf '[docker-check %4ds] %s\n' "$(($(date +%s) - T0))" "$*"; }
die() { printf '[docker-check %4ds] FAIL: %s\n' "$(($(date +%s) - T0))" "$*" >&2; exit 1; }

CONTAINER_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# ---- mounts ----------------------------------------------------------------
mount_root() { # ROOT
    mount -t proc proc "$1/proc"
    mount -t sysfs -o ro sysfs "$1/sys"
    mount --bind /dev "$1/dev"
    mount --bind /dev/pts "$1/dev/pts"
}

# Mount points under DIR, deepest first.
mounts_under() {
    awk -v d="$1/" '{ p = $5; gsub(/\\040/, " ", p); if (index(p "/", d) == 1) print p }' /proc/self/mountinfo |
        awk '{ print length($0) "\t" $0 }' | sort -rn | cut -f2-
}

unmount_all() { # DIR
    local m
    for m in $(mounts_under "$1"); do
        umount "$m" 2>/dev/null || umount -l "$m" || true
    done
}

# ---- run stage: the server in the runtime root (own network namespace) ----
if [ "${1:-}" = __serve ]; then
    root=$2
    ip link set lo up
    # The image's configuration, from the Dockerfile itself.
    envs=() user="" workdir=/
    while IFS= read -r line; do
        case "$line" in
        "ENV "*=*) envs+=("${line#ENV }") ;;
        "USER "*) user=${line#USER } ;;
        "WORKDIR "*) workdir=${line#WORKDIR } ;;
        "FROM "*) envs=() user="" workdir=/ ;; # only the last stage counts
        esac
    done <docker/Dockerfile
    [ -n "$user" ] || die "Dockerfile has no USER in its last stage"
    port=8080
    for e in "${envs[@]}"; do [ "${e%%=*}" = SASERVE_PORT ] && port=${e#*=}; done
    in_image() { chroot --userspec="$user" "$root" /usr/bin/env -i PATH=$CONTAINER_PATH HOME=/nonexistent "${envs[@]}" "$@"; }

    step "run: saserve serve as $user in $workdir, ${envs[*]}"
    log=$(mktemp)
    # Not through in_image: $! must be the server itself (chroot, env and sh
    # all exec), so that the uid check and SIGTERM reach it.
    chroot --userspec="$user" "$root" /usr/bin/env -i PATH=$CONTAINER_PATH HOME=/nonexistent "${envs[@]}" \
        /bin/sh -c "cd '$workdir' && exec saserve serve" >"$log" 2>&1 &
    pid=$!
    trap 'kill "$pid" 2>/dev/null || true; rm -f "$log"' EXIT
    ok=""
    for _ in $(seq 1 120); do
        kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; die "the server exited during start-up"; }
        if in_image saserve-healthcheck 2>/dev/null; then ok=1; break; fi
        sleep 0.5
    done
    [ -n "$ok" ] || { cat "$log" >&2; die "HEALTHCHECK (saserve-healthcheck) never passed"; }
    step "run: HEALTHCHECK command passes"

    [ "$(readlink "/proc/$pid/exe")" = "$root/usr/local/bin/saserve" ] || die "pid $pid is not the server"
    uid=$(awk '/^Uid:/ { print $2 }' "/proc/$pid/status")
    [ "$uid" = "${user%%:*}" ] || die "server runs as uid $uid, not ${user%%:*}"
    grep -q "^saserve:x:$uid:" "$root/etc/passwd" || die "uid $uid is not the saserve user"
    step "run: server process runs as uid $uid (saserve)"

    h=$(curl -sS -m 10 -w ' %{http_code}' "http://127.0.0.1:$port/health")
    [ "$h" = '{"status":"ok"} 200' ] || die "GET /health answered: $h"
    step "run: GET http://127.0.0.1:$port/health -> $h"

    c=$(curl -sS -m 120 -w '\n%{http_code}' "http://127.0.0.1:$port/v1/completions" \
        -H 'Content-Type: application/json' \
        -d '{"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}')
    code=${c##*$'\n'} body=${c%$'\n'*}
    [ "$code" = 200 ] || die "POST /v1/completions answered $code: $body"
    python3 - "$body" <<'PY' || die "bad completion: $body"
import json, sys
r = json.loads(sys.argv[1])
assert r["object"] == "text_completion", r
c = r["choices"][0]
assert isinstance(c["text"], str) and c["text"], r
assert c["finish_reason"] in ("stop", "length"), r
assert r["usage"]["completion_tokens"] >= 1, r
print("[docker-check] completion: model=%s text=%r usage=%s" % (r["model"], c["text"], r["usage"]))
PY
    step "run: POST /v1/completions -> 200"

    m=$(curl -sS -m 10 "http://127.0.0.1:$port/metrics")
    for name in saserve_generation_tokens_total saserve_num_requests_waiting saserve_kv_cache_usage_ratio \
        saserve_kv_cache_saved_bytes saserve_time_to_first_token_seconds_bucket; do
        grep -q "^$name" <<<"$m" || die "/metrics lacks $name"
    done
    if command -v promtool >/dev/null; then
        promtool check metrics <<<"$m" >/dev/null || die "promtool check metrics failed"
    fi
    step "run: GET /metrics has the dashboard's series$(command -v promtool >/dev/null && echo ', promtool check metrics passes')"

    kill -TERM "$pid"
    rc=0
    wait "$pid" || rc=$?
    trap 'rm -f "$log"' EXIT
    [ "$rc" = 0 ] || { cat "$log" >&2; die "server exited $rc after SIGTERM"; }
    step "run: SIGTERM -> server exited 0"
    exit 0
fi

# ---- host tools ------------------------------------------------------------
export DEBIAN_FRONTEND=noninteractive
for tool in debootstrap:debootstrap unshare:util-linux ip:iproute2 curl:curl python3:python3; do
    if ! command -v "${tool%%:*}" >/dev/null; then
        step "installing ${tool#*:} on the host"
        apt-get update -qq && apt-get install -y -qq --no-install-recommends "${tool#*:}" >/dev/null
    fi
done

# ---- static checks of the deployment files ----------------------------------
if ! /usr/bin/python3 -c 'import yaml' 2>/dev/null; then
    step "installing python3-yaml on the host"
    apt-get update -qq && apt-get install -y -qq --no-install-recommends python3-yaml >/dev/null
fi
/usr/bin/python3 docker/validate.py || die "docker/validate.py"
if command -v promtool >/dev/null; then
    promtool check config docker/prometheus.yml >/dev/null || die "promtool check config docker/prometheus.yml"
    step "promtool check config docker/prometheus.yml: SUCCESS"
fi

# The host's Debian mirror: deb822 .sources first, then one-line sources.list.
sources_uri() { # SUITE
    local f u
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        u=$(awk -v s="$1" 'BEGIN { RS = ""; FS = "\n" }
            { uri = ""; ok = 0
              for (i = 1; i <= NF; i++) {
                if ($i ~ /^URIs:/) { split($i, a, /[ \t]+/); uri = a[2] }
                if ($i ~ /^Suites:/) { n = split($i, a, /[ \t]+/); for (j = 2; j <= n; j++) if (a[j] == s) ok = 1 }
              }
              if (ok && uri != "") { print uri; exit } }' "$f")
        [ -n "$u" ] && { echo "$u"; return; }
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        u=$(awk -v s="$1" '$1 == "deb" { i = 2; if ($i ~ /^\[/) while ($i !~ /\]$/) i++; if ($i ~ /^\[/ || $i ~ /\]$/) i++
                                          if ($(i + 1) == s) { print $i; exit } }' "$f")
        [ -n "$u" ] && { echo "$u"; return; }
    done
}
MIRROR=${DEBIAN_MIRROR:-$(sources_uri bookworm)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY=${DEBIAN_SECURITY_MIRROR:-$(sources_uri bookworm-security)}
SECURITY=${SECURITY:-http://deb.debian.org/debian-security}

CACHE_DIR=build/docker-check
BASE=$CACHE_DIR/bookworm-minbase.tar
mkdir -p "$CACHE_DIR"
WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/saserve-docker-check.XXXXXX")
cleanup() {
    local rc=$? p r
    # Anything still running inside one of this run's roots was started by it.
    for p in /proc/[0-9]*; do
        r=$(readlink "$p/root" 2>/dev/null) || continue
        case "$r/" in "$WORK"/*) kill -KILL "${p#/proc/}" 2>/dev/null || true ;; esac
    done
    unmount_all "$WORK"
    if [ -n "$(mounts_under "$WORK")" ]; then
        echo "docker-check: mounts remain under $WORK; not removing it" >&2
    else
        rm -rf --one-file-system "$WORK"
    fi
    if [ "$rc" = 0 ]; then
        step "OK: image steps pass (build, make test, runtime, non-root serve) in $(($(date +%s) - T0))s"
    else
        step "FAILED (exit $rc) after $(($(date +%s) - T0))s"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- base root (cached) ----------------------------------------------------
if [ ! -s "$BASE" ]; then
    step "debootstrap --variant=minbase bookworm from $MIRROR (cached in $BASE)"
    debootstrap --variant=minbase bookworm "$WORK/base" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 ||
        { tail -30 "$WORK/debootstrap.log" >&2; die "debootstrap failed"; }
    rm -rf "$WORK"/base/var/cache/apt/archives/*.deb "$WORK"/base/var/lib/apt/lists/*
    tar -C "$WORK/base" --numeric-owner -cf "$BASE.tmp" .
    mv "$BASE.tmp" "$BASE"
    rm -rf --one-file-system "$WORK/base"
else
    step "base root: $BASE (cached)"
fi

# A fresh root from the base, configured like Debian's Docker images: the
# three suites from the mirror, the host's DNS, and no service starts.
new_root() { # DIR
    mkdir -p "$1"
    tar -C "$1" --numeric-owner -xf "$BASE"
    rm -f "$1/etc/apt/sources.list" "$1"/etc/apt/sources.list.d/*
    cat >"$1/etc/apt/sources.list" <<SRC
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb $SECURITY bookworm-security main
SRC
    cp -L /etc/resolv.conf "$1/etc/resolv.conf"
    printf '#!/bin/sh\nexit 101\n' >"$1/usr/sbin/policy-rc.d"
    chmod 755 "$1/usr/sbin/policy-rc.d"
    mount_root "$1"
}

in_root() { # ROOT DIR CMD... : like a Dockerfile RUN (root, WORKDIR DIR)
    local root=$1 dir=$2
    shift 2
    chroot "$root" /usr/bin/env -i PATH=$CONTAINER_PATH HOME=/root /bin/sh -c 'cd "$0" && exec "$@"' "$dir" "$@"
}

# in_root with its output in build/docker-check/NAME.log; the log's end on failure.
in_root_logged() { # NAME ROOT DIR CMD...
    local log=$CACHE_DIR/$1.log
    shift
    if ! in_root "$@" >"$log" 2>&1; then
        tail -40 "$log" >&2
        die "$* (whole log: $log)"
    fi
}

# COPY of the build context: the repository minus .dockerignore.
copy_context() { # DEST [PATHS...]
    local dest=$1 ex=() p
    shift
    while IFS= read -r p; do
        p=${p%%#*}; p=${p%"${p##*[![:space:]]}"}
        [ -n "$p" ] || continue
        case "$p" in
        '**/'*) ex+=(--no-anchored --exclude="${p#'**/'}") ;;
        *) ex+=(--anchored --exclude="./${p#/}") ;;
        esac
    done <.dockerignore
    mkdir -p "$dest"
    if [ $# = 0 ]; then set -- .; else set -- "${@/#/./}"; fi
    tar -C "$REPO" "${ex[@]}" -cf - "$@" | tar -C "$dest" -xf -
}

# ---- build stage -----------------------------------------------------------
B=$WORK/build
new_root "$B"
step "build stage: fresh Debian 12 root at $B"
copy_context "$B/src" Makefile docker/build.sh
step "build stage: RUN docker/build.sh deps"
in_root_logged deps "$B" /src docker/build.sh deps
step "build stage: deps installed ($(in_root "$B" / dpkg-query -W -f '.\n' | wc -l) packages; log: $CACHE_DIR/deps.log)"
copy_context "$B/src"
[ ! -e "$B/src/build" ] || die ".dockerignore let build/ into the context"
step "build stage: RUN docker/build.sh build"
in_root_logged build "$B" /src docker/build.sh build
step "build stage: RUN docker/build.sh test"
in_root "$B" /src docker/build.sh test
step "build stage: RUN docker/build.sh install /out"
in_root "$B" /src docker/build.sh install /out

# ---- runtime stage ---------------------------------------------------------
R=$WORK/runtime
new_root "$R"
step "runtime stage: fresh Debian 12 root at $R; RUN build.sh runtime"
install -m 0755 docker/build.sh "$R/tmp/build.sh"
in_root_logged runtime "$R" / /bin/sh -c '/tmp/build.sh runtime && rm /tmp/build.sh'
cp -a "$B/out/." "$R/"
if in_root "$R" / ldd /usr/local/bin/saserve | grep 'not found'; then die "runtime stage lacks shared libraries"; fi
step "runtime stage: saserve's shared libraries all resolve; $(du -sxh "$R" | cut -f1) root"

# ---- run -------------------------------------------------------------------
unshare --net -- "$0" __serve "$R"
exit
}
