"""The hardware a run happened on, as flat `hw.*` tags.

Recorded beside every stage run and model version so a number can always be traced to
the machine that produced it. GPU facts come from torch and, when installed, NVML.
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
    tags.update(_gpu_tags())
    return tags


def best_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


# ---- the process's place in a torchrun job (read from torchrun's environment) ---------------


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0 alone tracks, writes outputs and registers models."""
    return rank() == 0
