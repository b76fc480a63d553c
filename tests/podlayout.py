"""An agent pod, as the kubelet would set it up, under a directory instead of a container.

Tests hand the runtime exactly what the operator's builders rendered: the volumes of
the Deployment's pod template written out file by file (a ConfigMap or Secret key is
a file, a projected volume merges its sources, an emptyDir is an empty directory),
every absolute path of the pod moved under ``root``, and the container's environment
with its path-valued variables (`runtime_contract.PATH_ENV`) moved the same way. A
volume whose ConfigMap or Secret does not exist fails as the kubelet fails to mount it.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bmad_crds import runtime_contract as contract

Obj = dict[str, Any]


class MountError(LookupError):
    """A volume refers to a ConfigMap, a Secret or a key that does not exist."""


def in_root(root: Path, absolute: str) -> Path:
    """Where an absolute path of the pod lands under ``root``."""
    return root / absolute.lstrip("/")


def by_kind(objs: list[Obj]) -> dict[str, Obj]:
    return {o["kind"]: o for o in objs}


def container(objs: list[Obj]) -> Obj:
    found: Obj = by_kind(objs)["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    return found


def _config_map_data(
    name: str, objs: list[Obj], config_maps: Mapping[str, Mapping[str, str]]
) -> Mapping[str, str] | None:
    for obj in objs:
        if obj["kind"] == "ConfigMap" and obj["metadata"]["name"] == name:
            data: Mapping[str, str] = obj.get("data") or {}
            return data
    return config_maps.get(name)


def _files(
    source: Mapping[str, Any], data: Mapping[str, str | bytes] | None, what: str
) -> dict[str, str | bytes]:
    if data is None:
        if source.get("optional"):
            return {}
        raise MountError(f"{what} not found")
    items = source.get("items")
    if not items:
        return dict(data)
    files: dict[str, str | bytes] = {}
    for item in items:
        if item["key"] not in data:
            if source.get("optional"):
                continue
            raise MountError(f"{what} has no key {item['key']!r}")
        files[item["path"]] = data[item["key"]]
    return files


def _volume_files(
    volume: Mapping[str, Any],
    objs: list[Obj],
    config_maps: Mapping[str, Mapping[str, str]],
    secrets: Mapping[str, Mapping[str, bytes]],
) -> dict[str, str | bytes] | None:
    """The files of one volume (None: an emptyDir)."""
    if "emptyDir" in volume:
        return None
    if "configMap" in volume:
        ref = volume["configMap"]
        data = _config_map_data(ref["name"], objs, config_maps)
        return _files(ref, data, f"ConfigMap {ref['name']}")
    if "secret" in volume:
        ref = volume["secret"]
        return _files(ref, secrets.get(ref["secretName"]), f"Secret {ref['secretName']}")
    if "projected" in volume:
        files: dict[str, str | bytes] = {}
        for source in volume["projected"]["sources"]:
            if "configMap" in source:
                ref = source["configMap"]
                data = _config_map_data(ref["name"], objs, config_maps)
                files.update(_files(ref, data, f"ConfigMap {ref['name']}"))
            elif "secret" in source:
                ref = source["secret"]
                secret = secrets.get(ref["name"])
                files.update(_files(ref, secret, f"Secret {ref['name']}"))
            else:
                raise NotImplementedError(f"projected source {sorted(source)}")
        return files
    raise NotImplementedError(f"volume {volume['name']}: {sorted(volume)}")


def lay_out(
    root: Path,
    objs: list[Obj],
    *,
    config_maps: Mapping[str, Mapping[str, str]] | None = None,
    secrets: Mapping[str, Mapping[str, bytes]] | None = None,
) -> None:
    """Write every volume the agent container mounts under ``root``.

    ``config_maps``: the users' ConfigMaps by name (data); ``secrets``: Secrets by name
    (decoded data). The Agent's own ConfigMap comes from ``objs``.
    """
    pod = by_kind(objs)["Deployment"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in container(objs)["volumeMounts"]:
        folder = in_root(root, mount["mountPath"])
        files = _volume_files(volumes[mount["name"]], objs, config_maps or {}, secrets or {})
        folder.mkdir(parents=True, exist_ok=True)
        for name, value in (files or {}).items():
            target = folder / name
            if isinstance(value, bytes):
                target.write_bytes(value)
            else:
                target.write_text(value, encoding="utf-8")


def secret_data(secret: Mapping[str, Any]) -> dict[str, bytes]:
    """A Secret's keys, decoded, as the kubelet writes them."""
    return {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}


def environment(objs: list[Obj], root: Path) -> dict[str, str]:
    """The container's literal environment, its path-valued variables under ``root``."""
    env: dict[str, str] = {}
    for var in container(objs)["env"]:
        if "value" not in var:
            continue  # valueFrom: resolved by the kubelet from a Secret or ConfigMap
        value = var["value"]
        if var["name"] in contract.PATH_ENV:
            value = str(in_root(root, value))
        env[var["name"]] = value
    return env
