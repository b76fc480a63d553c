"""Container images for the real node, made here without a registry or a Docker daemon.

- The pause image (every pod's sandbox): `scripts/pause.c`, built static with gcc and
  written as an OCI image layout by hand (one layer, a config, a manifest, an index).
- The base image: Debian bookworm with Python 3.11, made by mmdebstrap from Debian's
  packages; it stands in for `python:3.11-slim` (the Dockerfile's default BASE_IMAGE).
- The project's image: the repository's Dockerfile, built by buildah (Debian's
  package) with chroot isolation, `--pull never`, on that base. pip inside the build
  reads a wheelhouse mounted into it (`PIP_NO_INDEX=1`, `PIP_FIND_LINKS`), which pip
  fills beforehand on the host with Debian's Python 3.11, the same interpreter as the
  base, so environment markers resolve alike.

buildah rather than a hand-made layout for the project's image: the Dockerfile stays
the one recipe users build with Docker and the test bed builds with buildah, so the
file is exercised, not paraphrased. Each artifact is cached under `<cache>/images` by
a hash of its inputs (sources, Dockerfile, package list, dependency list), so an
unchanged tree is never rebuilt; `import_archive` loads one into the node's containerd
(namespace k8s.io, where the kubelet's CRI looks).
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import tomllib
from importlib import resources
from pathlib import Path
from typing import NamedTuple

from bmad_testbed import build

# What manifests/manager and the operator's default runtime image name.
PROJECT_IMAGE = "bmad-operator:0.1.0"
PAUSE_REPOSITORY = "docker.io/bmad-testbed/pause"
BASE_SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "python-is-python3", "ca-certificates")
BASE_MIRRORS = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
# The interpreter the wheelhouse is resolved with: the one the base image has.
DEBIAN_PYTHON = Path("/usr/bin/python3")
# Bump to rebuild every cached artifact after a change to how they are made.
RECIPE = "1"
KEEP_ARCHIVES = 3


class ImageError(RuntimeError):
    """An image could not be built or imported; the message says which step and why."""


class Archive(NamedTuple):
    """An image archive that `ctr images import` reads, and the name it gets."""

    ref: str
    path: Path
    key: str


def images_dir() -> Path:
    return build.cache_dir() / "images"


def _key(*parts: bytes | str) -> str:
    h = hashlib.sha256(RECIPE.encode())
    for part in parts:
        h.update(b"\0")
        h.update(part.encode() if isinstance(part, str) else part)
    return h.hexdigest()[:16]


def _run(cmd: list[str], *, what: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        cmd, capture_output=True, text=True, check=False, env=env, stdin=subprocess.DEVNULL
    )
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise ImageError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    return proc.stdout


# --- OCI layout by hand (the pause image) ---------------------------------------------


def _blob(out: tarfile.TarFile, data: bytes) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    _add_file(out, f"blobs/sha256/{digest}", data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def _add_file(out: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.mtime = 0
    out.addfile(info, io.BytesIO(data))


def write_oci_archive(
    path: Path, *, ref: str, files: dict[str, tuple[bytes, int]], config: dict[str, object]
) -> None:
    """An OCI image layout, tarred: one uncompressed layer holding `files` (name ->
    (content, mode)), the image config, its manifest and an index that names it."""
    layer_buf = io.BytesIO()
    with tarfile.open(fileobj=layer_buf, mode="w", format=tarfile.PAX_FORMAT) as layer:
        for name, (data, mode) in sorted(files.items()):
            _add_file(layer, name, data, mode)
    layer_bytes = layer_buf.getvalue()
    diff_id = "sha256:" + hashlib.sha256(layer_bytes).hexdigest()
    image_config = {
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }
    tmp = path.with_suffix(".tmp")
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as out:
        _add_file(out, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        layer_desc = {
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            **_blob(out, layer_bytes),
        }
        config_desc = {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            **_blob(out, json.dumps(image_config, sort_keys=True).encode()),
        }
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config_desc,
            "layers": [layer_desc],
        }
        manifest_desc = {
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            **_blob(out, json.dumps(manifest, sort_keys=True).encode()),
            "annotations": {
                # containerd names the imported image after this annotation.
                "io.containerd.image.name": ref,
                "org.opencontainers.image.ref.name": ref.rsplit(":", 1)[1],
            },
            "platform": {"architecture": "amd64", "os": "linux"},
        }
        index = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [manifest_desc],
        }
        _add_file(out, "index.json", json.dumps(index, sort_keys=True).encode())
    tmp.replace(path)


def ensure_pause() -> Archive:
    """The pod sandbox image, built from scripts/pause.c once per source change."""
    source = (resources.files("bmad_testbed") / "scripts" / "pause.c").read_bytes()
    key = _key(source)
    ref = f"{PAUSE_REPOSITORY}:{key}"
    path = images_dir() / f"pause-{key}.tar"
    if path.exists():
        return Archive(ref, path, key)
    gcc = build.debian_executable("gcc", build.NODE_DEBIAN_EXECUTABLES)
    images_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src, binary = Path(tmp) / "pause.c", Path(tmp) / "pause"
        src.write_bytes(source)
        _run(
            [str(gcc), "-static", "-Os", "-s", "-Wall", "-o", str(binary), str(src)],
            what="compiling the pause program",
        )
        write_oci_archive(
            path,
            ref=ref,
            files={"pause": (binary.read_bytes(), 0o755)},
            config={"Entrypoint": ["/pause"], "User": "65535:65535"},
        )
    build.log(f"built the pause image {ref}")
    return Archive(ref, path, key)


# --- the Debian base ------------------------------------------------------------------


def ensure_base() -> Archive:
    """A root filesystem tarball of Debian with Python 3.11, made by mmdebstrap."""
    key = _key(BASE_SUITE, *BASE_PACKAGES, *BASE_MIRRORS)
    path = images_dir() / f"base-{BASE_SUITE}-{key}.tar"
    ref = f"localhost/bmad-base:{key}"
    if path.exists():
        return Archive(ref, path, key)
    mmdebstrap = build.ensure_image_tools()["mmdebstrap"]
    images_dir().mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    build.log(f"making the base image from Debian packages ({', '.join(BASE_PACKAGES)})")
    _run(
        [
            str(mmdebstrap),
            "--variant=minbase",
            "--include=" + ",".join(BASE_PACKAGES),
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-include=/usr/share/doc/*/copyright",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            "--format=tar",
            BASE_SUITE,
            str(tmp),
            *BASE_MIRRORS,
        ],
        what="mmdebstrap",
    )
    tmp.replace(path)
    return Archive(ref, path, key)


# --- the project's image ---------------------------------------------------------------


def _dockerignore(repo: Path) -> list[str]:
    try:
        lines = (repo / ".dockerignore").read_text().splitlines()
    except OSError:
        return []
    return [ln.strip().rstrip("/") for ln in lines if ln.strip() and not ln.startswith("#")]


def _ignored(rel: str, patterns: list[str]) -> bool:
    parts = rel.split("/")
    for i in range(1, len(parts) + 1):
        prefix = "/".join(parts[:i])
        for pat in patterns:
            if fnmatch.fnmatchcase(prefix, pat):
                return True
            if pat.startswith("**/") and fnmatch.fnmatchcase(parts[i - 1], pat[3:]):
                return True
    return False


def _copied_sources(repo: Path) -> list[str]:
    """The context paths the Dockerfile COPYs (not `COPY --from=`)."""
    sources: list[str] = []
    for line in (repo / "Dockerfile").read_text().splitlines():
        words = line.split()
        if not words or words[0].upper() != "COPY" or any(w.startswith("--from") for w in words):
            continue
        sources.extend(w for w in words[1:-1] if not w.startswith("--"))
    return sources


def context_files(repo: Path) -> list[Path]:
    """Every file of the build context that the image is made from, sorted."""
    patterns = _dockerignore(repo)
    found: set[Path] = {repo / "Dockerfile", repo / ".dockerignore"}
    for src in _copied_sources(repo):
        root = repo / src.rstrip("/")
        candidates = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in candidates:
            if not _ignored(path.relative_to(repo).as_posix(), patterns):
                found.add(path)
    return sorted(p for p in found if p.exists())


LOCK_FILE = Path("requirements") / "image.lock"


def _build_requirements(repo: Path) -> list[str]:
    data = tomllib.loads((repo / "pyproject.toml").read_text())
    return list(data["build-system"]["requires"])


def ensure_wheelhouse(repo: Path) -> Path:
    """What the image's pip installs offline: the locked dependencies, the very files
    the lock's hashes name (downloaded, never rebuilt, so the hashes match), and the
    wheels that build the project's own wheel (hatchling), for Debian's Python 3.11."""
    lock = (repo / LOCK_FILE).read_text()
    build_reqs = _build_requirements(repo)
    if not DEBIAN_PYTHON.exists():
        raise ImageError(
            f"{DEBIAN_PYTHON} is missing: install the Debian packages python3 python3-venv"
        )
    version = _run([str(DEBIAN_PYTHON), "--version"], what="python3 --version").strip()
    key = _key(version, lock, *build_reqs)
    out = build.cache_dir() / "wheels" / key
    if (out / ".complete").exists():
        return out
    build.log(f"collecting wheels for the image with {version} (cached afterwards)")
    venv = build.cache_dir() / "wheels" / "debian-venv"
    if not (venv / "bin" / "pip").exists():
        _run([str(DEBIAN_PYTHON), "-m", "venv", str(venv)], what="making a venv of Debian's Python")
    shutil.rmtree(out, ignore_errors=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    _run(
        [
            *pip,
            "download",
            "-q",
            "--no-deps",
            "--require-hashes",
            "--only-binary=:all:",
            "--dest",
            str(out),
            "-r",
            str(repo / LOCK_FILE),
        ],
        what="pip download (the locked dependencies)",
    )
    _run(
        [*pip, "wheel", "-q", "--wheel-dir", str(out), *build_reqs],
        what="pip wheel (the build backend)",
    )
    (out / ".complete").write_text("\n".join([str(LOCK_FILE), *build_reqs]) + "\n")
    return out


def _buildah() -> list[str]:
    tool = build.ensure_image_tools()["buildah"]
    root = build.cache_dir() / "buildah"
    return [
        str(tool),
        f"--root={root / 'storage'}",
        f"--runroot={root / 'run'}",
        "--storage-driver=overlay",
    ]


def _load_base(buildah: list[str], base: Archive) -> None:
    have = subprocess.run(
        [*buildah, "inspect", "--type", "image", base.ref], capture_output=True, check=False
    )
    if have.returncode == 0:
        return
    ctr = _run([*buildah, "from", "scratch"], what="buildah from scratch").strip()
    try:
        _run([*buildah, "add", ctr, str(base.path), "/"], what="buildah add (the base rootfs)")
        _run(
            [
                *buildah,
                "config",
                "--env=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "--env=LANG=C.UTF-8",
                "--cmd=python3",
                ctr,
            ],
            what="buildah config",
        )
        _run([*buildah, "commit", ctr, base.ref], what="buildah commit (the base)")
    finally:
        subprocess.run([*buildah, "rm", ctr], capture_output=True, check=False)


def _prune(prefix: str, keep: Path) -> None:
    old = sorted(images_dir().glob(f"{prefix}-*.tar"), key=lambda p: p.stat().st_mtime)
    for path in old[:-KEEP_ARCHIVES]:
        if path != keep:
            path.unlink(missing_ok=True)


def project_key(repo: Path) -> str:
    parts: list[bytes | str] = [ensure_base().key, ensure_wheelhouse(repo).name]
    for path in context_files(repo):
        parts += [path.relative_to(repo).as_posix(), path.read_bytes()]
    return _key(*parts)


def ensure_project_image(repo: Path) -> Archive:
    """The repository's Dockerfile built on the Debian base; rebuilt when an input changes."""
    base = ensure_base()
    wheels = ensure_wheelhouse(repo)
    key = project_key(repo)
    path = images_dir() / f"bmad-operator-{key}.tar"
    if path.exists():
        os.utime(path)
        return Archive(PROJECT_IMAGE, path, key)
    buildah = _buildah()
    _load_base(buildah, base)
    tag = f"localhost/bmad-operator:{key}"
    build.log(f"building {PROJECT_IMAGE} from the Dockerfile with buildah (input hash {key})")
    env = dict(os.environ, BUILDAH_ISOLATION="chroot")
    _run(
        [
            *buildah,
            "bud",
            "--isolation=chroot",
            "--pull=never",
            "--layers=false",
            f"--volume={wheels}:/wheelhouse:ro",
            f"--build-arg=BASE_IMAGE={base.ref}",
            "--build-arg=PIP_NO_INDEX=1",
            "--build-arg=PIP_FIND_LINKS=/wheelhouse",
            f"--tag={tag}",
            f"--file={repo / 'Dockerfile'}",
            str(repo),
        ],
        what="buildah bud",
        env=env,
    )
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    try:
        _run(
            [*buildah, "push", tag, f"docker-archive:{tmp}:{PROJECT_IMAGE}"],
            what="buildah push (to an archive)",
        )
        tmp.replace(path)
    finally:
        subprocess.run([*buildah, "rmi", tag], capture_output=True, check=False)
    _prune("bmad-operator", path)
    build.log(f"built {PROJECT_IMAGE} ({path.stat().st_size // 2**20} MiB)")
    return Archive(PROJECT_IMAGE, path, key)


def import_archive(archive: Archive, *, ctr: Path, address: Path) -> None:
    """Load an archive into containerd's k8s.io namespace (unpacked for the kubelet)."""
    _run(
        [
            str(ctr),
            f"--address={address}",
            "--namespace=k8s.io",
            "images",
            "import",
            str(archive.path),
        ],
        what=f"ctr images import {archive.path.name}",
    )
