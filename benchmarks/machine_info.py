"""What a benchmark ran on, recorded with its figures: CPU model and cores, GPU, library versions."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch
import transformers


def machine(device: torch.device) -> dict:
    """The CPU (model name from /proc/cpuinfo where there is one), its cores, the GPU of `device` if CUDA, and the
    torch, transformers and Python versions."""
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    return {"cpu": names[0] if names else platform.processor() or platform.machine(), "cpu_cores": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}
