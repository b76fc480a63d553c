#!/usr/bin/env bash
# Set up a fresh machine for BMAD Operator development: Debian packages for the
# services and the real node, a Python venv with the project, and the test bed's
# binaries and base images (built from the Go module proxy and Debian's packages on
# the first run, cached afterwards).
set -euo pipefail
cd "$(dirname "$0")/.."

need_debs=()
[[ -x /usr/bin/etcd ]] || need_debs+=(etcd-server)
[[ -x /usr/bin/redis-server ]] || need_debs+=(redis-server)
[[ -x /usr/bin/prometheus ]] || need_debs+=(prometheus)
[[ -x /usr/bin/prometheus-pushgateway ]] || need_debs+=(prometheus-pushgateway)
[[ -x /usr/lib/postgresql/15/bin/postgres ]] || need_debs+=(postgresql)
command -v setpriv >/dev/null || need_debs+=(util-linux)
# The real node: containerd + runc, CNI plugins, netfilter tools, and what builds
# the pause and project images without a registry (gcc, mmdebstrap, buildah, and
# Debian's own Python 3.11 that resolves the image's wheels).
[[ -x /usr/bin/containerd ]] || need_debs+=(containerd)
[[ -x /usr/sbin/runc ]] || need_debs+=(runc)
[[ -x /usr/lib/cni/bridge ]] || need_debs+=(containernetworking-plugins)
[[ -x /usr/sbin/iptables ]] || need_debs+=(iptables)
[[ -x /usr/sbin/ipset ]] || need_debs+=(ipset)
[[ -x /usr/sbin/conntrack ]] || need_debs+=(conntrack)
[[ -x /usr/sbin/nft ]] || need_debs+=(nftables)
[[ -x /usr/sbin/ip ]] || need_debs+=(iproute2)
[[ -x /usr/bin/gcc && -f /usr/lib/x86_64-linux-gnu/libc.a ]] || need_debs+=(gcc libc6-dev)
[[ -x /usr/bin/mmdebstrap ]] || need_debs+=(mmdebstrap)
[[ -x /usr/bin/buildah ]] || need_debs+=(buildah)
/usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null || need_debs+=(python3 python3-venv)
if ((${#need_debs[@]})); then
  sudo=""
  [[ $(id -u) -eq 0 ]] || sudo="sudo"
  echo "[bootstrap] installing Debian packages: ${need_debs[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    "${need_debs[@]}" >/dev/null
fi
# The Debian packages start nothing we rely on; the test bed starts its own copies.

py="${PYTHON:-python3}"
if ! "$py" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
  echo "[bootstrap] Python >= 3.11 is required (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi
if ! command -v go >/dev/null; then
  echo "[bootstrap] the Go toolchain (>= 1.24) is required to build the test bed" >&2
  exit 1
fi
if [[ ! -x .venv/bin/python ]]; then
  echo "[bootstrap] creating .venv" >&2
  "$py" -m venv .venv
fi
stamp=.venv/.bmad-installed
if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
  echo "[bootstrap] installing Python dependencies into .venv" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
  touch "$stamp"
fi
echo "[bootstrap] building or finding the test bed's binaries and base images" >&2
.venv/bin/bmad testbed build >/dev/null
echo "[bootstrap] ready" >&2
