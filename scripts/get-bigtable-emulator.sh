#!/usr/bin/env bash
# Installs the Cloud Bigtable emulator (Google's own, the Go program in
# cloud.google.com/go/bigtable/cmd/emulator) into keepcount's cache,
# idempotently, and prints the binary's path on stdout:
#
#   ${KEEPCOUNT_CACHE:-$HOME/.cache/keepcount}/bin/cbtemulator-<version>
#
# Built from source with `go install` through the Go module proxy (the
# module's checksum is verified against the Go checksum database), never a
# prebuilt download.  keepcount.cluster.bigtable.BigtableEmulator finds it
# there (or through KEEPCOUNT_BIGTABLE_EMULATOR) and starts it itself on a
# loopback port.  Needs the Go toolchain the pinned module asks for (its
# go.mod says "go 1.26.0"; this machine kind ships Go in /usr/local/go); fast
# (no network, no build) once installed.
#
# The emulator keeps everything in memory: it is for tests, never for data
# that must outlive it.
#
# Environment: KEEPCOUNT_BIGTABLE_VERSION (default below: the newest
# cloud.google.com/go/bigtable release when this was written, checked with
# `go list -m -versions`), KEEPCOUNT_CACHE.
set -euo pipefail

VERSION="${KEEPCOUNT_BIGTABLE_VERSION:-v1.58.0}"
BIN="${KEEPCOUNT_CACHE:-$HOME/.cache/keepcount}/bin"
DEST="$BIN/cbtemulator-$VERSION"

if [ -x "$DEST" ]; then
  echo "$DEST"
  exit 0
fi

GO="$(command -v go || true)"
if [ -z "$GO" ] && [ -x /usr/local/go/bin/go ]; then GO=/usr/local/go/bin/go; fi
if [ -z "$GO" ]; then
  echo "get-bigtable-emulator: 'go' is missing; install Go >= 1.26 (https://go.dev/dl/)" >&2
  exit 1
fi

mkdir -p "$BIN"
# Built into a scratch GOBIN and renamed into place only when complete, so an
# interrupted run never leaves a half-written binary a later run would trust.
work="$(mktemp -d "$BIN/.get-emulator.XXXXXX")"
trap 'rm -rf "$work"' EXIT
echo "get-bigtable-emulator: go install cloud.google.com/go/bigtable/cmd/emulator@$VERSION" >&2
if ! GOBIN="$work" CGO_ENABLED=0 \
  "$GO" install "cloud.google.com/go/bigtable/cmd/emulator@$VERSION" >"$work/go.log" 2>&1; then
  echo "get-bigtable-emulator: go install failed ($("$GO" version)):" >&2
  tail -40 "$work/go.log" >&2
  echo "get-bigtable-emulator: an older Go needs a newer toolchain (GOTOOLCHAIN=auto fetches" \
    "it through the module proxy) or an older KEEPCOUNT_BIGTABLE_VERSION" >&2
  exit 1
fi
[ -x "$work/emulator" ] || { echo "get-bigtable-emulator: no binary after go install" >&2; exit 1; }
mv "$work/emulator" "$DEST"
echo "get-bigtable-emulator: installed the Bigtable emulator $VERSION as $DEST" >&2
echo "$DEST"
