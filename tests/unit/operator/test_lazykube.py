"""`lazykube`: the operator imports kubernetes_asyncio's client one module at a time.

Each check runs in a fresh interpreter: the stand-ins only go in when nothing has
imported the client yet, which a pytest process cannot promise.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from bmad_operator import lazykube

pytestmark = pytest.mark.unit


def run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize(
    ("cls", "module"),
    [
        ("V1ObjectMeta", "v1_object_meta"),
        ("V1OwnerReference", "v1_owner_reference"),
        ("CoreV1Api", "core_v1_api"),
        ("V1beta1ParamKind", "v1beta1_param_kind"),
        ("AdmissionregistrationV1ServiceReference", "admissionregistration_v1_service_reference"),
    ],
)
def test_class_names_map_to_the_generators_module_names(cls: str, module: str) -> None:
    assert lazykube.module_of(cls) == module


def test_importing_the_operator_loads_a_few_client_modules_not_all() -> None:
    loaded = run(
        """
        import sys
        import bmad_operator.main
        print(sum(1 for m in sys.modules if m.startswith("kubernetes_asyncio")))
        """
    )
    # the whole client is ~950 modules; the operator needs about twenty
    assert int(loaded) < 60, loaded


def test_every_name_the_operator_and_kopf_read_resolves_to_the_real_class() -> None:
    out = run(
        """
        import bmad_operator  # installs the stand-ins
        from kubernetes_asyncio import client, config
        from kubernetes_asyncio.client import V1ObjectMeta, V1OwnerReference, ApiClient
        from kubernetes_asyncio.client import exceptions
        import kubernetes_asyncio.client.models as models
        assert client.ApiClient is ApiClient
        assert client.Configuration.__module__ == "kubernetes_asyncio.client.configuration"
        assert V1ObjectMeta is models.V1ObjectMeta
        assert V1OwnerReference.__module__.endswith("v1_owner_reference")
        assert client.CoordinationV1Api.__module__.endswith("coordination_v1_api")
        assert client.V1Lease(metadata=V1ObjectMeta(name="x")).metadata.name == "x"
        assert issubclass(client.ApiException, exceptions.OpenApiException)
        assert callable(config.load_kube_config)
        print("ok")
        """
    )
    assert out == "ok"


def test_a_name_the_mapping_cannot_place_falls_back_to_the_real_package() -> None:
    out = run(
        """
        import bmad_operator
        import sys
        from kubernetes_asyncio import client
        before = len(sys.modules)
        print(client.__version__, len(sys.modules) > before + 500)
        """
    )
    version, loaded_whole = out.split()
    assert version.count(".") == 2
    assert loaded_whole == "True"


def test_nothing_is_replaced_once_the_client_is_imported() -> None:
    out = run(
        """
        import kubernetes_asyncio.client
        from bmad_operator import lazykube
        print(lazykube.install(), type(sys.modules["kubernetes_asyncio.client"]).__name__)
        """.replace("import kubernetes_asyncio.client", "import sys, kubernetes_asyncio.client")
    )
    assert out == "False module"
