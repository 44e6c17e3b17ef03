"""The hardware a run happened on, as flat `hw.*` tags.

Recorded beside every stage run and model version so a number can always be traced to
the machine that produced it. GPU facts come from torch and, when installed, NVML; the
CPU's instruction sets from /proc/cpuinfo (Linux), since they decide whether bf16 is fast.
"""

from __future__ import annotations

import os
import platform
import sys
from functools import lru_cache


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The CPU instruction sets that matter for training speed, as /proc/cpuinfo spells them.
CPU_ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
# Either runs bf16 dot products in hardware (AMX tiles: Sapphire Rapids on; AVX512-BF16:
# Cooper Lake, Zen 4 on). Without them oneDNN emulates bf16 by converting to fp32: no faster.
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def parse_cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The feature flags of the first processor in a /proc/cpuinfo text (x86 `flags`, Arm `Features`)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return parse_cpu_flags(f.read())
    except OSError:  # not Linux: nothing known, so nothing assumed native
        return frozenset()


def native_bf16_isa(flags: frozenset[str]) -> str | None:
    """The instruction set that makes bf16 matmuls native on this CPU, or None."""
    return next((f for f in NATIVE_BF16_FLAGS if f in flags), None)


def cpu_has_native_bf16() -> bool:
    return native_bf16_isa(cpu_flags()) is not None


def _cpu_isa_tags() -> dict[str, str]:
    import torch

    flags = cpu_flags()
    return {
        "hw.cpu_isa": ",".join(f for f in CPU_ISA_FLAGS if f in flags) or "none",
        "hw.cpu_native_bf16": native_bf16_isa(flags) or "none",
        "hw.torch_cpu_kernels": torch.backends.cpu.get_cpu_capability(),  # the kernels torch dispatches to
    }


def _gpu_tags() -> dict[str, str]:
    import torch

    tags: dict[str, str] = {"hw.gpu_count": "0"}
    if not torch.cuda.is_available():
        return tags
    count = torch.cuda.device_count()
    tags["hw.gpu_count"] = str(count)
    tags["hw.cuda"] = str(torch.version.cuda)
    for i in range(count):
        props = torch.cuda.get_device_properties(i)
        tags[f"hw.gpu.{i}.name"] = props.name
        tags[f"hw.gpu.{i}.memory_gb"] = f"{props.total_memory / 2**30:.1f}"
        tags[f"hw.gpu.{i}.capability"] = f"{props.major}.{props.minor}"
    try:  # NVML gives the driver version, which torch does not expose
        import pynvml

        pynvml.nvmlInit()
        driver = pynvml.nvmlSystemGetDriverVersion()
        tags["hw.gpu_driver"] = driver.decode() if isinstance(driver, bytes) else str(driver)
        pynvml.nvmlShutdown()
    except Exception:  # NVML is optional; its absence is not an error
        pass
    return tags


@lru_cache(maxsize=1)
def hardware_profile() -> dict[str, str]:
    """Flat string tags describing this machine and the software stack."""
    import psutil
    import torch

    tags = {
        "hw.cpu": _cpu_model(),
        "hw.cpu_cores": str(psutil.cpu_count(logical=False) or os.cpu_count()),
        "hw.cpu_threads": str(os.cpu_count()),
        "hw.ram_gb": f"{psutil.virtual_memory().total / 2**30:.1f}",
        "hw.os": f"{platform.system()} {platform.release()}",
        "hw.python": sys.version.split()[0],
        "hw.torch": torch.__version__,
        "hw.torch_threads": str(torch.get_num_threads()),
    }
    tags.update(_cpu_isa_tags())
    tags.update(_gpu_tags())
    return tags


def best_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    return "cpu"
