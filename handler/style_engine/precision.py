"""Where the VGG19 activations run in bfloat16, and how float32 stays float32.

bf16 autocast makes a VGG19 step cheaper where the hardware has native bf16 arithmetic (on 2 CPU cores 1.7
times at 128 px, 2.7 times at 256 px: docs/benchmarks.md); Grams and losses are always taken in float32
(losses.py). It buys loss per second, not loss per iteration: in the last iterations the activations' rounding
slows L-BFGS, so after the same number of iterations a bf16 run ends at a higher loss than a float32 one; given
the same time it did as well or better at 128 px (from 4 % above float32 to 59 % below, in four runs), and its
steps save more at larger sizes. `precision=fp32` is for the last digits. Without native support bf16 is
emulated and slower than float32; on tiny images it saves nothing per step while a bf16 run needs a second set
of targets; `auto` keeps float32 in both cases, and without native support so does `bf16`.

float32 means float32 on a GPU too: cuDNN would otherwise run float32 convolutions in TF32 (PyTorch's default),
whose 10-bit mantissa is nearer bf16's 7 bits than float32's 23, and the point of float32 is its last digits.
Every GPU with TF32 also has bf16, which `auto` picks there, so TF32 would speed up nothing `auto` runs.
"""

import contextlib
import functools
import os

import torch


# Set to "fp32" or "bf16", takes the CPU as without or with native bf16, whatever its flags: "fp32" runs every
# request in float32, as a CPU without it does; "bf16" runs bf16 where it is asked for or picked, emulated (and
# slow) on a CPU without it. For tests and diagnosis: scripts/test.sh runs either machine's paths on this one.
FORCE_PRECISION_ENV = "STYLE_FORCE_PRECISION"


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether the engine takes this CPU to have native bf16: the CPU's flags, unless STYLE_FORCE_PRECISION
    (the one place it is read) says otherwise."""
    forced = os.environ.get(FORCE_PRECISION_ENV, "")
    if forced not in ("", "fp32", "bf16"):
        raise ValueError(f"{FORCE_PRECISION_ENV} must be fp32, bf16 or unset, not {forced!r}")
    return cpu_flags_have_bf16() if not forced else forced == "bf16"


@functools.cache
def cpu_flags_have_bf16() -> bool:
    """True when the CPU has AVX512-BF16 or AMX-BF16 (Linux: read from /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def has_native_bf16(device: torch.device) -> bool:
    """Whether `device` itself runs bf16 arithmetic natively. On NVIDIA GPUs that is compute capability 8.0
    (Ampere) and newer: torch.cuda.is_bf16_supported() also says yes where bf16 is emulated (T4, V100), and it
    asks about the current device, which need not be the worker's."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu" and cpu_has_native_bf16()


# Below this output size bf16 is not clearly faster per step here: at 48x36 px float32 was 15 % faster, and at
# 64x48 the runs went from bf16 3 % slower to 1.5x faster, the second set of targets and the float32 check
# eating much of that (2026-11-28); from 128 px up bf16 wins in every run.
BF16_MIN_PIXELS = 64 * 64


def use_bf16(precision: str, device: torch.device, pixels: int) -> bool:
    """Whether to run the extractor under bf16 autocast for a request's `precision` (auto, fp32, bf16) and
    output size in pixels. Only on a device with native bf16: emulated, bf16 is several times slower than
    float32 and no more accurate, so even an explicit `bf16` runs in float32 there (the answer says which ran)."""
    if precision == "fp32" or not has_native_bf16(device):
        return False
    return precision == "bf16" or pixels >= BF16_MIN_PIXELS


def extractor_precision(device: torch.device, bf16: bool):
    """The context the extractor's forward pass runs in: bf16 autocast, or strict float32."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else strict_float32()


def pass_precision(bf16: bool):
    """The context a whole forward and backward pass runs in (optimize.py): strict float32 for a float32 run,
    so that the backward pass and checkpointing's recompute, which run after the forward pass's context has
    ended, are float32 too; nothing for a bf16 run, whose autocast covers the extractor's forward pass alone."""
    return contextlib.nullcontext() if bf16 else strict_float32()


@contextlib.contextmanager
def strict_float32():
    """No TF32 in cuDNN's convolutions or cuBLAS's matrix products while the context lasts. The flags are the
    process's, not the thread's: the autograd engine's device threads, which run the backward pass, see them.
    They only act on a GPU; they are set on any device, so that the CPU runs (and tests) the same code. The
    flags rather than torch.backends.cudnn.flags(), which also resets every cuDNN setting it is not given, and
    rather than the fp32_precision settings, which older PyTorch (2.11 on the GPU machines) lacks in part."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.allow_tf32, matmul.allow_tf32
    cudnn.allow_tf32 = matmul.allow_tf32 = False
    try:
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = saved
