"""Other projects' CRDs, installed on the test bed from their Go modules.

The repository commits none of them: each ships inside its project's Go module, which
``go mod download`` fetches once into the module cache (GOMODCACHE, kept between runs
like the rest of the Go caches). The test bed then applies the real schema to its
apiserver, so objects the operator renders for those kinds (a KEDA ScaledObject) are
checked against exactly what the cluster would accept.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import NamedTuple

from bmad_testbed import build
from bmad_testbed.kubectl import Kubectl


class ThirdPartyCrd(NamedTuple):
    name: str  # metadata.name of the CustomResourceDefinition
    module: str
    version: str
    path: str  # inside the module


KEDA_SCALED_OBJECT = ThirdPartyCrd(
    name="scaledobjects.keda.sh",
    module="github.com/kedacore/keda/v2",
    version="v2.16.1",
    path="config/crd/bases/keda.sh_scaledobjects.yaml",
)


def module_dir(module: str, version: str) -> Path:
    """Where the Go module cache holds ``module@version`` (downloaded if needed)."""
    proc = subprocess.run(
        ["go", "mod", "download", "-json", f"{module}@{version}"],
        env=build._go_env(),
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    try:
        info = json.loads(proc.stdout)
    except ValueError:
        info = {}
    if proc.returncode != 0 or "Dir" not in info:
        error = info.get("Error") or proc.stderr.strip()
        raise build.BuildError(f"go mod download {module}@{version} failed: {error}")
    return Path(info["Dir"])


def crd_file(crd: ThirdPartyCrd) -> Path:
    path = module_dir(crd.module, crd.version) / crd.path
    if not path.is_file():
        raise build.BuildError(f"{crd.module}@{crd.version} has no {crd.path}")
    return path


def install(kubectl: Kubectl, crd: ThirdPartyCrd, *, timeout: float = 60) -> str:
    """Apply the CRD (server-side) and wait until the apiserver serves it."""
    kubectl.run("apply", "--server-side", "--force-conflicts", "-f", str(crd_file(crd)))
    kubectl.run(
        "wait", "--for=condition=Established", f"crd/{crd.name}", f"--timeout={timeout:.0f}s"
    )
    return crd.name
