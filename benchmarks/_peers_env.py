"""peers.py's environment: the installed versions, the peers' site-packages and a stack subprocess's
environment variables. Pure (no torch), like peers.py."""

from __future__ import annotations

import os
import tarfile
from importlib import metadata
from pathlib import Path

VERSION_DISTS = {"torch": "torch", "transformers": "transformers", "peft": "peft", "triton": "triton",
                 "unsloth": "unsloth", "unsloth_zoo": "unsloth_zoo", "liger": "liger-kernel",
                 "bitsandbytes": "bitsandbytes", "trl": "trl"}


def versions() -> dict:
    """Installed versions from package metadata (nothing imported: unsloth patches on import)."""
    out = {}
    for key, dist in VERSION_DISTS.items():
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[key] = None
    return out


def ensure_peer_site(site: Path, tgz: Path) -> Path | None:
    """The peers' site-packages folder: as given, else unpacked from tgz (.peers/site.tgz: it holds peer-site/)."""
    if site.is_dir():
        return site
    if site.name != "peer-site" or not tgz.is_file():
        return None
    print(f"unpacking {tgz} into {site.parent}", flush=True)
    with tarfile.open(tgz) as tar:
        try:
            tar.extractall(site.parent, filter="data")
        except TypeError:  # Python without extraction filters (< 3.10.12 / 3.11.4)
            tar.extractall(site.parent)  # our own tarball, built by ../shared/tools/peer-site.sh
    return site if site.is_dir() else None


def child_env(site: Path | None, scratch: Path) -> dict:
    """The environment of a stack's subprocess: the peers' site first on PYTHONPATH, everything offline."""
    env = dict(os.environ)
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH", "")) if p)
    # No network on the GPU machine: fail fast instead of retrying the hub; keep the peers' caches in /tmp.
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               UNSLOTH_DISABLE_STATISTICS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               UNSLOTH_COMPILE_LOCATION=str(scratch / "unsloth_compiled_cache"))
    return env
