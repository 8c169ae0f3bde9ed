#!/usr/bin/env bash
# Fetches the pinned Apache Kafka broker's jars from Maven Central into a cache directory named
# by version, and prints that directory. A second run finds the cache and downloads nothing.
#
#   bash e2e/services/kafka/install.sh        # prints e.g. /root/.cache/ferrymq/kafka-4.4.0
#
# The test harness (e2e/src/harness/services.rs) looks for the jars in the same place
# (FERRYMQ_KAFKA_LIBS overrides it), and starts a single-node KRaft broker from them.
set -euo pipefail

KAFKA_VERSION=4.4.0
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${FERRYMQ_CACHE:-$HOME/.cache/ferrymq}/kafka-$KAFKA_VERSION"

if [ -f "$cache/.complete" ]; then
    echo "$cache"
    exit 0
fi

command -v java >/dev/null || { echo "install.sh: java (17 or newer) is required" >&2; exit 1; }
command -v mvn >/dev/null || { echo "install.sh: mvn is required" >&2; exit 1; }

rm -rf "$cache.tmp"
mkdir -p "$cache.tmp/lib"
mvn -B -q -f "$here/pom.xml" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$cache.tmp/lib" >&2
ls "$cache.tmp/lib"/kafka_2.13-"$KAFKA_VERSION".jar >/dev/null
touch "$cache.tmp/.complete"
rm -rf "$cache"
mv "$cache.tmp" "$cache"
echo "$cache"
