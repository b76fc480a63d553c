#!/usr/bin/env bash
# Build kube-apiserver, kube-controller-manager, kube-scheduler and kubectl from the
# Go module proxy. k8s.io/kubernetes replaces its staging modules with local paths,
# so `go install` refuses it; a throwaway wrapper module pins every staging module
# to the matching v0.X.Y release instead.
#
# usage: build-kubernetes.sh VERSION OUTDIR     (VERSION like 1.33.13)
set -euo pipefail
version="${1:?kubernetes version, e.g. 1.33.13}"
out="${2:?output directory}"
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
cat > "$work/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO

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
for cmd in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
  echo "[build-kubernetes] go build ${cmd} (first build on 2 cores takes a while)" >&2
  go build -trimpath -ldflags "$ld" -o "$out/${cmd}.tmp" "k8s.io/kubernetes/cmd/${cmd}"
  mv "$out/${cmd}.tmp" "$out/${cmd}"
done
echo "[build-kubernetes] done: $out" >&2
