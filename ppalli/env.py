"""What the machine is: OS, Python, torch and CUDA, GPUs, CPU, RAM and the optional packages ppalli can use.

`probe()` reads it (cheap: package versions come from installed metadata, nothing is imported but torch);
`Environment(...)` built by hand describes a machine that is not this one, for what-if plans and tests.
Importing this module does nothing.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import re
from dataclasses import dataclass, field
from importlib import metadata
from types import ModuleType

# Import names -> distribution names whose metadata says the installed version. A package counts as
# present when its distribution is installed; nothing is imported, so probing cannot patch anything
# (unsloth, for one, patches transformers when imported).
OPTIONAL_PACKAGES: dict[str, tuple[str, ...]] = {
    "transformers": ("transformers",),
    "peft": ("peft",),
    "triton": ("triton", "triton-windows", "pytorch-triton"),
    "bitsandbytes": ("bitsandbytes",),
    "flash_attn": ("flash-attn", "flash_attn"),
    "flash_attn_3": ("flash-attn-3", "flash_attn_3"),
    "flash_attn_4": ("flash-attn-4", "flash_attn_4"),
    "liger_kernel": ("liger-kernel", "liger_kernel"),
    "unsloth": ("unsloth",),
    "xformers": ("xformers",),
}

BF16_MIN_CAPABILITY = (8, 0)  # Ampere: bf16 tensor cores; below it bf16 matmuls fail or are emulated


@dataclass(frozen=True)
class GPU:
    name: str
    capability: tuple[int, int]
    total_memory_bytes: int
    bf16: bool

    @property
    def total_memory_gib(self) -> float:
        return self.total_memory_bytes / 2**30

    @property
    def capability_str(self) -> str:
        return f"{self.capability[0]}.{self.capability[1]}"


@dataclass(frozen=True)
class Environment:
    os: str = "Linux"
    python: str = "3.11"
    torch: str | None = None
    cuda: str | None = None
    gpus: tuple[GPU, ...] = ()
    cpu_count: int = 1
    ram_bytes: int | None = None
    mps: bool = False
    packages: dict[str, str] = field(default_factory=dict)

    def has(self, package: str) -> bool:
        return package in self.packages

    def version(self, package: str) -> str | None:
        return self.packages.get(package)

    def gpu(self, index: int = 0) -> GPU | None:
        return self.gpus[index] if 0 <= index < len(self.gpus) else None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["gpus"] = [dict(g, capability=list(g["capability"])) for g in d["gpus"]]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Environment:
        gpus = tuple(GPU(**dict(g, capability=tuple(g["capability"]))) for g in d.get("gpus", ()))
        return cls(**dict(d, gpus=gpus, packages=dict(d.get("packages", {}))))


def probe() -> Environment:
    """Read this machine. Costs one `import torch` (and CUDA initialisation when a GPU is visible)."""
    torch_version, cuda_version, gpus, mps = _probe_torch()
    return Environment(
        os=platform.system() or "unknown",
        python=platform.python_version(),
        torch=torch_version,
        cuda=cuda_version,
        gpus=gpus,
        cpu_count=os.cpu_count() or 1,
        ram_bytes=_ram_bytes(),
        mps=mps,
        packages=_package_versions(),
    )


def _probe_torch() -> tuple[str | None, str | None, tuple[GPU, ...], bool]:
    try:
        import torch
    except ImportError:
        return None, None, (), False
    cuda = torch.version.cuda or getattr(torch.version, "hip", None)
    gpus = tuple(_gpu(torch, i) for i in range(torch.cuda.device_count())) if torch.cuda.is_available() else ()
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return torch.__version__, cuda, gpus, mps


def _gpu(torch: ModuleType, index: int) -> GPU:
    props = torch.cuda.get_device_properties(index)
    capability = (props.major, props.minor)
    if getattr(torch.version, "hip", None):
        # ROCm: capability numbers are not NVIDIA's; ask torch, without counting emulation as support
        with torch.cuda.device(index):
            bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    else:
        # torch.cuda.is_bf16_supported() says True on a T4 (emulated, slow, and cuBLAS refuses some bf16
        # GEMMs there with CUBLAS_STATUS_NOT_SUPPORTED): the capability is the honest test.
        bf16 = capability >= BF16_MIN_CAPABILITY
    return GPU(name=props.name, capability=capability, total_memory_bytes=int(props.total_memory), bf16=bf16)


def _package_versions() -> dict[str, str]:
    found = {}
    for name, dists in OPTIONAL_PACKAGES.items():
        for dist in dists:
            try:
                found[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return found


def _ram_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # Windows has no sysconf; macOS lacks some names
        return None


def version_tuple(version: str | None) -> tuple[int, ...]:
    """'5.24.0.dev0' -> (5, 24, 0); '2.13.0+cpu' -> (2, 13, 0); None or garbage -> ()."""
    parts = []
    for piece in (version or "").split("+")[0].split("."):
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
        if digits.end() < len(piece):  # '0rc1': the pre-release tag ends the numeric part
            break
    return tuple(parts)
