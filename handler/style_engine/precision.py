"""Where the VGG19 activations run in bfloat16.

bf16 autocast halves the cost of a VGG19 step where the hardware has native bf16 arithmetic (measured:
benchmarks/README.md), and the final loss stays within 1 % of float32 because Grams and losses are always
taken in float32 (losses.py). Without native support bf16 is emulated and slower than float32, so `auto`
keeps float32 there.
"""

import functools

import torch


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when the CPU has AVX512-BF16 or AMX-BF16 (Linux: read from /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_bf16(precision: str, device: torch.device) -> bool:
    """Whether to run the extractor under bf16 autocast for a request's `precision` (auto, fp32, bf16)."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_native_bf16()
