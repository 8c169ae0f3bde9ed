#!/usr/bin/env bash
# Builds the Kubernetes control plane the operator's end-to-end tests run against: etcd,
# kube-apiserver and kube-controller-manager of one pinned release, from the Go module proxy.
#
#   bash e2e/services/k8s/install.sh      # prints the directory holding the three binaries
#
# Binaries are cached under ${FERRYMQ_CACHE:-$HOME/.cache/ferrymq}/k8s-<version>/, so a second
# run only checks that they are there. The e2e harness (e2e/src/harness/kube.rs) looks there too,
# or in $FERRYMQ_K8S_BIN when set.
#
# Why a wrapper module: k8s.io/kubernetes's go.mod replaces its ~33 staging modules (k8s.io/api,
# client-go, ...) with ./staging/... paths, so `go install k8s.io/kubernetes/cmd/...@v` is
# refused. A module that requires k8s.io/kubernetes and replaces each staging module with its
# published v0.N.x (the same list, read from that release's own go.mod) builds the commands
# unchanged. etcd is built in the same module, at the version that release of Kubernetes itself
# requires (its go.mod pins go.etcd.io/etcd/server/v3), so MVS changes nothing for the API server.
# Only the three main packages are compiled (CGO_ENABLED=0), in one `go build` so they share work.
#
# Cost, measured on this project's 2-core machine with two other builds running (104% CPU for
# this one): cold (empty Go module and build caches) 13 min 08 s wall, including the module
# downloads; the same build with a warm Go build cache 24 s; cached binaries 0.02 s.
set -euo pipefail

# The pinned release lives in VERSION beside this script; the e2e harness reads the same file.
K8S_VERSION="${FERRYMQ_K8S_VERSION:-$(cat "$(dirname "${BASH_SOURCE[0]}")/VERSION")}"
CACHE="${FERRYMQ_CACHE:-$HOME/.cache/ferrymq}"
OUT="$CACHE/k8s-$K8S_VERSION"
BINS=(etcd kube-apiserver kube-controller-manager)

have_all() {
    local b
    for b in "${BINS[@]}"; do
        [ -x "$OUT/$b" ] || return 1
    done
    [ -f "$OUT/VERSIONS" ]
}

if have_all; then
    echo "control plane $K8S_VERSION cached in $OUT" >&2
    echo "$OUT"
    exit 0
fi

command -v go >/dev/null 2>&1 || {
    echo "go is not installed; the control plane needs Go 1.26 or newer" >&2
    exit 1
}

start=$SECONDS
# The wrapper module lives beside the output so a failed build leaves something to look at; the
# binaries only land in $OUT once all three are built (built into a temp dir, then moved).
work="$CACHE/k8s-$K8S_VERSION.build"
rm -rf "$work"
mkdir -p "$work/bin"

# k8s.io/kubernetes's own go.mod: the staging list, its `go`/`godebug` lines and its etcd pin.
k8s_mod="$(cd "$work" && go mod download -json "k8s.io/kubernetes@$K8S_VERSION" |
    sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')"
[ -f "$k8s_mod" ] || {
    echo "could not download k8s.io/kubernetes@$K8S_VERSION's go.mod" >&2
    exit 1
}
minor="${K8S_VERSION#v1.}"     # 36.3
staging_version="v0.$minor"    # v0.36.3
go_line="$(grep -m1 '^go ' "$k8s_mod")"
godebug_line="$(grep -m1 '^godebug ' "$k8s_mod" || true)"
etcd_version="$(awk '$1 == "go.etcd.io/etcd/server/v3" { print $2; exit }' "$k8s_mod")"
[ -n "$etcd_version" ] || {
    echo "k8s.io/kubernetes@$K8S_VERSION's go.mod names no go.etcd.io/etcd/server/v3" >&2
    exit 1
}
mapfile -t staging < <(sed -n 's#^[[:space:]]*\(k8s\.io/[a-z0-9-]*\) => \./staging/.*#\1#p' "$k8s_mod")
[ "${#staging[@]}" -gt 20 ] || {
    echo "found only ${#staging[@]} staging modules in $k8s_mod; its layout changed?" >&2
    exit 1
}

{
    echo "module ferrymq.local/k8s-control-plane"
    echo
    echo "$go_line"
    [ -z "$godebug_line" ] || echo "$godebug_line"
    echo
    echo "require ("
    echo "	k8s.io/kubernetes $K8S_VERSION"
    echo "	go.etcd.io/etcd/server/v3 $etcd_version"
    echo ")"
    echo
    echo "replace ("
    for m in "${staging[@]}"; do
        echo "	$m => $m $staging_version"
    done
    echo ")"
} >"$work/go.mod"
echo "wrapper module: ${#staging[@]} staging modules at $staging_version, etcd $etcd_version" >&2

v="k8s.io/component-base/version"
commit="$(printf '%040d' 0)"
ldflags="-s -w -X $v.gitVersion=$K8S_VERSION -X $v.gitMajor=1 -X $v.gitMinor=${minor%%.*}"
ldflags+=" -X $v.gitTreeState=clean -X $v.gitCommit=$commit"
ldflags+=" -X $v.buildDate=1970-01-01T00:00:00Z"
# The same -X for the client-go copy of the version package, as Kubernetes' own build does.
ldflags+=" -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION"

cd "$work"
# -mod=mod: resolve and record go.sum as the build needs it, without `go mod tidy`, which would
# also fetch every test dependency of every module.
CGO_ENABLED=0 go build -mod=mod -trimpath -ldflags "$ldflags" -o bin/ \
    k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager \
    go.etcd.io/etcd/server/v3
# go names the binary of a ".../server/v3" main package "server" (it drops the major-version
# suffix); older go versions named it "v3".
for n in server v3; do
    if [ -x "bin/$n" ]; then mv "bin/$n" bin/etcd; fi
done
for b in "${BINS[@]}"; do
    [ -x "bin/$b" ] || {
        echo "build produced no $b (have: $(ls bin))" >&2
        exit 1
    }
done

mkdir -p "$OUT"
for b in "${BINS[@]}"; do
    mv "bin/$b" "$OUT/$b"
done
{
    echo "kubernetes $K8S_VERSION"
    echo "etcd $etcd_version"
    echo "go $(go env GOVERSION)"
    echo "built_in_seconds $((SECONDS - start))"
} >"$OUT/VERSIONS"
cd /
rm -rf "$work"
echo "control plane $K8S_VERSION built in $((SECONDS - start))s into $OUT" >&2
echo "$OUT"
