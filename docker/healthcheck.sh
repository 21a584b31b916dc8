#!/usr/bin/env bash
# saserve-healthcheck - exit 0 when GET /health on this host answers 200.
#
# The container's HEALTHCHECK.  Uses bash's /dev/tcp so the runtime image
# needs no curl.  Port from SASERVE_PORT (default 8080); sends
# SASERVE_API_KEY as a bearer token when set (needed with SASERVE_AUTH_HEALTH).
# Usage: saserve-healthcheck [PORT]
port=${1:-${SASERVE_PORT:-8080}}
exec 3<>"/dev/tcp/127.0.0.1/$port" || exit 1
auth=""
[ -n "${SASERVE_API_KEY:-}" ] && auth="Authorization: Bearer $SASERVE_API_KEY"$'\r\n'
printf 'GET /health HTTP/1.0\r\nHost: localhost\r\n%s\r\n' "$auth" >&3
IFS= read -r -t 5 status <&3 || exit 1
exec 3<&-
case "$status" in
"HTTP/1."?" 200 "*) exit 0 ;;
*) echo "unhealthy: ${status%$'\r'}" >&2; exit 1 ;;
esac
