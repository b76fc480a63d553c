#!/usr/bin/env bash
# The product's main job on a local default: a local cluster (the test bed's control
# plane with kwok nodes, or your own cluster if KUBECONFIG points at one), the CRDs,
# the operator's RBAC, the operator itself, and one sample Agent per BMAD role —
# ending with `kubectl get agents` showing them Ready.
# Stop everything with: .venv/bin/bmad testbed down
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh

external="${KUBECONFIG:-}"
set -a
eval "$(.venv/bin/bmad testbed up --services none)"
set +a
export PATH="$BMAD_TESTBED_DIR/bin:$PATH"
kubectl="${BMAD_KUBECTL:-kubectl}"

echo "[demo] installing the CRDs" >&2
"$kubectl" apply --server-side --force-conflicts -k manifests/crd >/dev/null
"$kubectl" wait --for=condition=Established crd/agents.bmad.dev crd/integrations.bmad.dev \
  crd/workflows.bmad.dev crd/tenants.bmad.dev --timeout=60s >/dev/null

echo "[demo] installing the operator's RBAC" >&2
"$kubectl" apply -f manifests/manager/namespace.yaml >/dev/null
"$kubectl" apply -k manifests/rbac >/dev/null
operator_kubeconfig="${BMAD_OPERATOR_KUBECONFIG:-$KUBECONFIG}"
if [[ -z $external && -n ${BMAD_OPERATOR_USER:-} ]]; then
  # On the local control plane the operator runs with its own identity, bound only
  # to the ClusterRole it ships with.
  "$kubectl" create clusterrolebinding bmad-operator-local --clusterrole=bmad-operator \
    --user="$BMAD_OPERATOR_USER" --dry-run=client -o yaml | "$kubectl" apply -f - >/dev/null
fi

echo "[demo] starting the operator (log: $BMAD_TESTBED_DIR/logs/bmad-operator.log)" >&2
.venv/bin/bmad testbed start-operator --kubeconfig "$operator_kubeconfig"

echo "[demo] applying the samples: one Agent per BMAD role" >&2
"$kubectl" apply -k manifests/samples >/dev/null
"$kubectl" wait --for=condition=Ready agents --all -n bmad-demo --timeout=180s >/dev/null
"$kubectl" get agents -n bmad-demo
cat >&2 <<MSG

[demo] the operator and the sample agents are running. Try:
  export KUBECONFIG=$KUBECONFIG PATH=$BMAD_TESTBED_DIR/bin:\$PATH
  kubectl describe agent analyst -n bmad-demo
  kubectl scale agent dev -n bmad-demo --replicas=3
[demo] stop everything with: .venv/bin/bmad testbed down
MSG
