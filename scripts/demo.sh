#!/usr/bin/env bash
# The product's main job, installed the way docs/operator.md tells a user: the test
# bed's control plane with a real node (or your own cluster if KUBECONFIG points at
# one), the project's image built from the Dockerfile, the operator running in the
# cluster from manifests/default, the samples (one Agent per BMAD role) in bmad-demo,
# and one question to the analyst through its Service, answered at the end.
# Stop everything with: .venv/bin/bmad testbed down
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
bash scripts/bootstrap.sh

image=bmad-operator:0.1.0
if [[ -n ${KUBECONFIG:-} && ${KUBECONFIG} != "${BMAD_TESTBED_DIR:-/nonexistent}/kubeconfig" ]]; then
  echo "[demo] using the cluster of KUBECONFIG=$KUBECONFIG: it must already have the image" \
    "$image (docker build -t $image . && kind load docker-image $image)" >&2
  kubectl=kubectl
else
  echo "[demo] starting the test bed with a real node" >&2
  set -a
  eval "$(.venv/bin/bmad testbed up --real-node --services none)"
  set +a
  export PATH="$BMAD_TESTBED_DIR/bin:$PATH"
  kubectl="$BMAD_KUBECTL"
  echo "[demo] building $image from the Dockerfile (offline, cached by content) and loading it" >&2
  .venv/bin/bmad testbed image >/dev/null
fi

echo "[demo] installing the operator: kubectl apply -k manifests/default" >&2
"$kubectl" apply -k manifests/default >/dev/null
"$kubectl" wait --for condition=Established crd -l app.kubernetes.io/part-of=bmad-operator \
  --timeout=60s >/dev/null
"$kubectl" -n bmad-system rollout status deployment/bmad-operator --timeout=300s >&2

echo "[demo] applying the samples: one Agent per BMAD role" >&2
"$kubectl" apply -k manifests/samples >/dev/null
"$kubectl" -n bmad-demo wait --for condition=Ready agents --all --timeout=300s >/dev/null
"$kubectl" -n bmad-demo get agents
echo
"$kubectl" get pods -n bmad-system -o wide
"$kubectl" get pods -n bmad-demo -o wide
echo
echo "[demo] kubectl -n bmad-demo logs deployment/analyst:"
"$kubectl" -n bmad-demo logs deployment/analyst | head -n 20

# A one-shot client pod in bmad-demo (Pod Security "restricted", like the agents) calls
# the analyst's ClusterIP: kube-proxy on the node routes it to the agent pod.
echo
echo "[demo] asking the analyst through its Service" >&2
address="$("$kubectl" -n bmad-demo get service analyst -o jsonpath='{.spec.clusterIP}:{.spec.ports[0].port}')"
question="We want a tool that turns meeting notes into action items. Where do we start?"
"$kubectl" -n bmad-demo delete pod bmad-demo-ask --ignore-not-found --wait=true >/dev/null
"$kubectl" -n bmad-demo apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Pod
metadata:
  name: bmad-demo-ask
spec:
  restartPolicy: Never
  automountServiceAccountToken: false
  securityContext:
    runAsNonRoot: true
    runAsUser: 10001
    runAsGroup: 10001
    seccompProfile: {type: RuntimeDefault}
  containers:
    - name: ask
      image: $image
      imagePullPolicy: IfNotPresent
      command: ["python", "-c"]
      args:
        - |
          import json, sys, urllib.request
          body = json.dumps({"input": sys.argv[2]}).encode()
          req = urllib.request.Request("http://" + sys.argv[1] + "/v1/invoke", data=body,
                                       headers={"Content-Type": "application/json"})
          with urllib.request.urlopen(req, timeout=30) as resp:
              print(json.load(resp)["output"])
        - "$address"
        - "$question"
      securityContext:
        allowPrivilegeEscalation: false
        readOnlyRootFilesystem: true
        capabilities: {drop: ["ALL"]}
YAML
if ! "$kubectl" -n bmad-demo wait --for=jsonpath='{.status.phase}'=Succeeded pod/bmad-demo-ask \
  --timeout=120s >/dev/null; then
  "$kubectl" -n bmad-demo describe pod bmad-demo-ask >&2 || true
  "$kubectl" -n bmad-demo logs pod/bmad-demo-ask >&2 || true
  echo "[demo] the analyst did not answer" >&2
  exit 1
fi
echo "[demo] you: $question"
echo "[demo] analyst (via http://$address):"
"$kubectl" -n bmad-demo logs pod/bmad-demo-ask
"$kubectl" -n bmad-demo delete pod bmad-demo-ask --wait=false >/dev/null

cat >&2 <<MSG

[demo] done in $(( $(date +%s) - started ))s: the operator and the sample agents run on the real node. Try:
  export KUBECONFIG=$KUBECONFIG PATH=${BMAD_TESTBED_DIR:-.}/bin:\$PATH
  kubectl -n bmad-demo describe agent analyst
  kubectl -n bmad-demo logs deployment/pm
  kubectl -n bmad-demo scale agent dev --replicas=2
[demo] stop everything with: .venv/bin/bmad testbed down
MSG
