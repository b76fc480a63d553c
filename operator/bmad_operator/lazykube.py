"""Load kubernetes_asyncio's generated client one module at a time, as it is used.

`import kubernetes_asyncio.client` runs a package `__init__` that imports every API
class and every model the generator wrote: about 950 modules and 38 MiB of resident
memory (measured 2026-11-30, kubernetes_asyncio 36.1), a quarter of the operator's
resident memory at 1,000 Agents. The operator uses a handful of them (the API client,
its configuration and exceptions, the kubeconfig loaders, and kopf's look at
`V1ObjectMeta` and `V1OwnerReference`), so `install()` puts light stand-ins for the
four aggregating packages (`kubernetes_asyncio`, `.client`, `.client.models` and
`.client.api`) into `sys.modules` before anything imports them. Each stand-in has the
real package's `__path__`, so `import kubernetes_asyncio.client.api_client` finds the
real file; a name read from a stand-in imports the one module that defines it. A name
the mapping cannot place runs the real package `__init__` into the stand-in, so the
worst case is today's cost, never a missing name.

Nothing here changes what any module does: only when it is imported.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import re
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = "kubernetes_asyncio"
_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")

# Names of the client package that live in a module of their own (not generated APIs
# or models): what the operator and kopf read.
_CLIENT_NAMES = {
    "ApiClient": "api_client",
    "Configuration": "configuration",
    "ApiException": "exceptions",
    "ApiValueError": "exceptions",
    "ApiTypeError": "exceptions",
    "ApiKeyError": "exceptions",
    "ApiAttributeError": "exceptions",
    "OpenApiException": "exceptions",
}


def module_of(class_name: str) -> str:
    """The generator's module name for a class: `V1ObjectMeta` -> `v1_object_meta`,
    `CoreV1Api` -> `core_v1_api`."""
    return _CAMEL.sub("_", class_name).lower()


Finder = Callable[[str], Any]


class _LazyPackage(types.ModuleType):
    """A package whose names are imported from their own modules when first read."""

    def __init__(self, name: str, path: Path, find: Finder) -> None:
        super().__init__(name)
        self.__path__ = [str(path)]
        self.__file__ = str(path / "__init__.py")
        self.__package__ = name
        self.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        self.__spec__.submodule_search_locations = [str(path)]
        self._find = find
        self._loaded_whole = False

    def __getattr__(self, attr: str) -> Any:
        if attr in ("__all__", "__version__"):
            return self._load_whole(attr)
        if attr.startswith("_"):
            raise AttributeError(attr)
        try:
            return importlib.import_module(f"{self.__name__}.{attr}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{self.__name__}.{attr}":
                raise
        value = self._find(attr)
        if value is None:
            return self._load_whole(attr)
        setattr(self, attr, value)
        return value

    def _load_whole(self, attr: str) -> Any:
        """The real `__init__`, run into this module: for names the mapping misses."""
        if not self._loaded_whole:
            self._loaded_whole = True
            path = self.__file__ or ""
            code = compile(Path(path).read_text(), path, "exec")
            exec(code, self.__dict__)  # noqa: S102 - the installed package's own __init__
        try:
            return self.__dict__[attr]
        except KeyError:
            raise AttributeError(f"module {self.__name__!r} has no attribute {attr!r}") from None


def _from_module(package: str, module: str, attr: str) -> Any:
    """`attr` of `package.module`, or None if there is no such module or name."""
    try:
        return getattr(importlib.import_module(f"{package}.{module}"), attr, None)
    except ModuleNotFoundError:
        return None


def install() -> bool:
    """Put the stand-ins in place; False (and nothing done) if the client is already
    imported or not installed."""
    if ROOT in sys.modules or f"{ROOT}.client" in sys.modules:
        return False
    spec = importlib.util.find_spec(ROOT)
    if spec is None or not spec.submodule_search_locations:
        return False
    base = Path(next(iter(spec.submodule_search_locations)))
    client_name = f"{ROOT}.client"
    models_name, api_name = f"{client_name}.models", f"{client_name}.api"

    def model(attr: str) -> Any:
        return _from_module(models_name, module_of(attr), attr)

    def api(attr: str) -> Any:
        return _from_module(api_name, module_of(attr), attr) if attr.endswith("Api") else None

    def client_attr(attr: str) -> Any:
        if attr in _CLIENT_NAMES:
            return _from_module(client_name, _CLIENT_NAMES[attr], attr)
        return api(attr) if attr.endswith("Api") else model(attr)

    root = _LazyPackage(ROOT, base, lambda attr: None)
    client = _LazyPackage(client_name, base / "client", client_attr)
    models = _LazyPackage(models_name, base / "client" / "models", model)
    apis = _LazyPackage(api_name, base / "client" / "api", api)
    setattr(root, "__version__", importlib.metadata.version(ROOT))  # noqa: B010
    sys.modules.update({ROOT: root, client_name: client, models_name: models, api_name: apis})
    setattr(root, "client", client)  # noqa: B010 - ModuleType has no such attribute to mypy
    setattr(client, "models", models)  # noqa: B010
    setattr(client, "api", apis)  # noqa: B010
    return True
