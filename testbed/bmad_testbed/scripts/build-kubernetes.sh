#!/usr/bin/env bash
# Build Kubernetes commands from the Go module proxy: by default the control plane
# (kube-apiserver, kube-controller-manager, kube-scheduler, kubectl); name others
# (kubelet, kube-proxy) to build those instead. k8s.io/kubernetes replaces its staging
# modules with local paths, so `go install` refuses it; a throwaway wrapper module pins
# every staging module to the matching v0.X.Y release instead.
#
# usage: build-kubernetes.sh VERSION OUTDIR [COMMAND...]     (VERSION like 1.33.13)
set -euo pipefail
version="${1:?kubernetes version, e.g. 1.33.13}"
out="${2:?output directory}"
shift 2
commands=("$@")
if ((${#commands[@]} == 0)); then
  commands=(kube-apiserver kube-controller-manager kube-scheduler kubectl)
fi
minor="${version#*.}"; minor="${minor%%.*}"
staging="v0.${version#*.}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"

modules=(api apiextensions-apiserver apimachinery apiserver cli-runtime client-go
  cloud-provider cluster-bootstrap code-generator component-base component-helpers
  controller-manager cri-api cri-client csi-translation-lib dynamic-resource-allocation
  endpointslice kms kube-aggregator kube-controller-manager kube-proxy kube-scheduler
  kubectl kubelet metrics mount-utils pod-security-admission sample-apiserver
  sample-cli-plugin sample-controller)
if (( minor >= 32 )); then modules+=(externaljwt); fi
if (( minor >= 36 )); then modules+=(cri-streaming streaming); fi

{
  echo "module bmad.dev/k8s-wrapper"
  echo
  echo "go 1.24.0"
  echo
  echo "require k8s.io/kubernetes v${version}"
  echo
  for m in "${modules[@]}"; do echo "replace k8s.io/${m} => k8s.io/${m} ${staging}"; done
} > "$work/go.mod"
{
  printf '//go:build tools\n\npackage tools\n\nimport (\n'
  for cmd in "${commands[@]}"; do printf '\t_ "k8s.io/kubernetes/cmd/%s"\n' "$cmd"; done
  printf ')\n'
} > "$work/tools.go"

export GOFLAGS="-mod=mod -buildvcs=false"
export GONOSUMDB="${GONOSUMDB:-k8s.io,sigs.k8s.io}"
export CGO_ENABLED=0
cd "$work"
echo "[build-kubernetes] resolving modules for v${version}" >&2
go mod tidy -e >/dev/null 2>&1 || true
go mod download k8s.io/kubernetes
major=1
ld="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ld+=" -X ${p}.gitVersion=v${version} -X ${p}.gitMajor=${major} -X ${p}.gitMinor=${minor}"
  ld+=" -X ${p}.gitTreeState=clean -X ${p}.buildDate=1970-01-01T00:00:00Z"
done
for cmd in "${commands[@]}"; do
  echo "[build-kubernetes] go build ${cmd} (first build on 2 cores takes a while)" >&2
  go build -trimpath -ldflags "$ld" -o "$out/${cmd}.tmp" "k8s.io/kubernetes/cmd/${cmd}"
  mv "$out/${cmd}.tmp" "$out/${cmd}"
done
echo "[build-kubernetes] done: $out" >&2
