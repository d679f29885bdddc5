#!/usr/bin/env bash
# Installs Apache Cassandra 5.0 (the real server, from Maven Central) into
# keepcount's cache, idempotently, and prints the install path on stdout:
#
#   ${KEEPCOUNT_CACHE:-$HOME/.cache/keepcount}/cassandra/apache-cassandra-<version>
#
# keepcount.cluster.cassandra.CassandraCluster finds it there (or through
# KEEPCOUNT_CASSANDRA_HOME) and starts every node itself: java with lib/* on
# the class path, org.apache.cassandra.service.CassandraDaemon, and a
# generated cassandra.yaml per node.  Needs Maven and a JDK 17 (apt-get
# install -y maven openjdk-17-jdk-headless); fast (no network) once installed.
#
# Where it comes from, in order:
#  1. the official binary distribution, org.apache.cassandra:apache-cassandra:
#     <version>:tar.gz:bin, fetched with `mvn dependency:copy` and unpacked;
#  2. if Maven Central does not have that artifact (it has none for any
#     5.0.x: the project stopped publishing the tarball there after
#     4.0-alpha2), the same server assembled from its published jar,
#     org.apache.cassandra:cassandra-all:<version>, and its runtime
#     dependencies as that jar's pom declares them (`mvn
#     dependency:copy-dependencies` on a generated pom) into lib/.  The
#     tarball's lib/ is the same set of jars; keepcount never uses its bin/
#     or conf/ (it writes each node's config and JVM options itself).
# KEEPCOUNT-ORIGIN in the install dir records which one it was.
#
# Environment: KEEPCOUNT_CASSANDRA_VERSION (default below: the newest 5.0.x
# on Maven Central when this was written, checked with mvn), KEEPCOUNT_CACHE.
set -euo pipefail

VERSION="${KEEPCOUNT_CASSANDRA_VERSION:-5.0.9}"
CACHE="${KEEPCOUNT_CACHE:-$HOME/.cache/keepcount}/cassandra"
DEST="$CACHE/apache-cassandra-$VERSION"
DONE_MARK="$DEST/.keepcount-complete"

if [ -f "$DONE_MARK" ]; then
  echo "$DEST"
  exit 0
fi

for tool in mvn java; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "get-cassandra: '$tool' is missing; install it with:" \
      "apt-get install -y maven openjdk-17-jdk-headless" >&2
    exit 1
  fi
done

mkdir -p "$CACHE"
# Built in a scratch dir beside the destination and renamed into place only
# when complete, so an interrupted run never leaves a half install that a
# later run (or CassandraCluster) would take for a whole one.
work="$(mktemp -d "$CACHE/.get-$VERSION.XXXXXX")"
trap 'rm -rf "$work"' EXIT
home="$work/apache-cassandra-$VERSION"

# Maven's own output goes to a log (stdout carries only the path); shown on failure.
mvn_log="$work/mvn.log"
run_mvn() {
  # -C: fail on a checksum mismatch (Maven only warns by default).
  mvn -B -q -C "$@" >>"$mvn_log" 2>&1
}

tarball="org.apache.cassandra:apache-cassandra:$VERSION:tar.gz:bin"
echo "get-cassandra: fetching $tarball" >&2
if run_mvn dependency:copy -Dartifact="$tarball" -DoutputDirectory="$work/dl" \
  -Dmdep.overWriteReleases=true; then
  tar -xzf "$work/dl/apache-cassandra-$VERSION-bin.tar.gz" -C "$work"
  [ -d "$home/lib" ] || { echo "get-cassandra: unexpected tarball layout" >&2; exit 1; }
  origin="official binary distribution $tarball (Maven Central)"
else
  echo "get-cassandra: Maven Central has no $tarball;" \
    "assembling the server from org.apache.cassandra:cassandra-all:$VERSION" \
    "and its runtime dependencies" >&2
  : >"$mvn_log"
  mkdir -p "$home/lib" "$work/pom"
  cat >"$work/pom/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>keepcount.local</groupId>
  <artifactId>cassandra-server</artifactId>
  <version>$VERSION</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.cassandra</groupId>
      <artifactId>cassandra-all</artifactId>
      <version>$VERSION</version>
    </dependency>
  </dependencies>
</project>
EOF
  if ! run_mvn -f "$work/pom/pom.xml" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$home/lib"; then
    echo "get-cassandra: mvn failed:" >&2
    tail -40 "$mvn_log" >&2
    exit 1
  fi
  [ -f "$home/lib/cassandra-all-$VERSION.jar" ] || {
    echo "get-cassandra: cassandra-all-$VERSION.jar missing after mvn" >&2
    exit 1
  }
  origin="assembled: org.apache.cassandra:cassandra-all:$VERSION and its runtime dependencies (Maven Central)"
fi

{
  echo "Apache Cassandra $VERSION"
  echo "$origin"
  echo "installed $(date -u +%Y-%m-%dT%H:%M:%SZ) by scripts/get-cassandra.sh"
} >"$home/KEEPCOUNT-ORIGIN"

rm -rf "$DEST"
mv "$home" "$DEST"
touch "$DONE_MARK"
echo "get-cassandra: installed Apache Cassandra $VERSION in $DEST" >&2
echo "$DEST"
