"""Shared fixtures: the random-weight extractor (`--weights random`) and small sample images."""

import os
import time
from pathlib import Path

# torch's OpenMP threads wait for each other at every parallel step. Spinning there, a waiting thread holds a core
# that the thread with the work, or a server the test started, needs: on 2 cores shared with other processes the
# tests ran 3 to 5 times slower. Waiting threads sleep instead, here and in every process the tests start.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402 - after the setting, which OpenMP reads once, when torch loads it
import torch  # noqa: E402

from handler_context import make_context, model_dir_with_weights
from style_engine import VGGFeatures, load_features_state_dict, precision
from style_engine.codec import load_image_file
from style_engine.resize import fit_longer_side, resize
from style_transfer_handler import StyleTransferHandler

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"
STYLES = SAMPLES / "styles"  # the paintings: the archive's presets by default (scripts/build_mar.py --styles)

# bf16 runs where the engine takes the CPU to have it natively (precision.py): where it has none, a bf16 request
# runs in float32. STYLE_FORCE_PRECISION=fp32 runs the suite as on such a CPU; =bf16 runs the bf16 paths on any
# CPU, emulated where it has none, and `needs_fast_bf16` then skips what emulation would make too slow.
needs_bf16 = pytest.mark.skipif(not precision.cpu_has_native_bf16(),
                                reason="bf16 is not native here (or float32 is forced): bf16 requests run in float32")
needs_fast_bf16 = pytest.mark.skipif(not (precision.cpu_has_native_bf16() and precision.cpu_flags_have_bf16()),
                                     reason="bf16 is not native here: too slow emulated at this size")
PRECISIONS = ["fp32", pytest.param("bf16", marks=needs_bf16)]


@pytest.fixture
def cpu_time():
    """A clock for timing work whatever else runs on the host (other tests, other engineers' runs): torch on one
    thread, timed by that thread's CPU time. Ratios of such times are the work's own; a worker's wall clock,
    on every core, is what the benchmarks measure."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield time.thread_time
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def random_state_dict():
    return load_features_state_dict("random")


@pytest.fixture(scope="session")
def extractor(random_state_dict):
    return VGGFeatures(random_state_dict)


@pytest.fixture(scope="module")
def served(tmp_path_factory, random_state_dict):
    """The handler in-process with random weights (tests/support/handler_context.py), and its context."""
    model_dir = model_dir_with_weights(tmp_path_factory.mktemp("model"), random_state_dict)
    context = make_context(model_dir, {"weights": "random"})
    handler = StyleTransferHandler()
    handler.initialize(context)
    return handler, context


def sample(name: str, longer: int | None = None) -> torch.Tensor:
    """A sample image as (3, H, W) in [0, 1], optionally resized so its longer side is `longer`."""
    image = load_image_file(str(SAMPLES / name))  # name may also be an absolute path
    return image if longer is None else resize(image, fit_longer_side(*image.shape[-2:], longer))


@pytest.fixture(scope="session")
def content():
    return sample("tubingen.jpg", 96)


@pytest.fixture(scope="session")
def style():
    return sample("styles/starry_night.jpg", 96)


@pytest.fixture(scope="session")
def style2():
    return sample("styles/woman-with-hat-matisse.jpg", 96)


@pytest.fixture(scope="session")
def model_store(tmp_path_factory):
    """model_store/ with style_transfer.mar built by scripts/build_mar.py --weights random, as users build it."""
    import subprocess
    import sys

    store = tmp_path_factory.mktemp("model_store")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_mar.py"), "--weights", "random",
                    "--export-path", str(store)], check=True, capture_output=True, timeout=300)
    return store


@pytest.fixture(scope="session")
def server(model_store, tmp_path_factory, redis_server):
    """A real TorchServe (Java) with our config.properties on free loopback ports, stopped afterwards. Its worker
    reads the cancellations of the jobs service from `redis_server`, as scripts/serve.sh sets it up."""
    from torchserve_instance import TorchServeInstance

    instance = TorchServeInstance(model_store, tmp_path_factory.mktemp("torchserve"),
                                  env={"STYLE_JOBS_REDIS_URL": redis_server.url})
    with instance:
        yield instance


@pytest.fixture(scope="session")
def breakable_server(model_store, tmp_path_factory, redis_server):
    """A private TorchServe for tests that break or fill it, never the shared `server`: its worker may be
    SIGKILLed, its job queue holds only 2 requests, and its model registration API is on, to show what
    allowed_urls still refuses when an operator turns it on."""
    from torchserve_instance import TorchServeInstance

    instance = TorchServeInstance(model_store, tmp_path_factory.mktemp("breakable_torchserve"),
                                  overrides={"job_queue_size": "2", "enable_model_api": "true"},
                                  env={"STYLE_JOBS_REDIS_URL": redis_server.url})
    with instance:
        yield instance


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real redis-server (Debian's) on a free loopback port with a password, stopped by its pid afterwards."""
    from redis_instance import RedisInstance

    with RedisInstance(tmp_path_factory.mktemp("redis")) as instance:
        yield instance


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (moto_server) on a free loopback port with a bucket, stopped by its pid."""
    from s3_instance import S3Instance

    with S3Instance(tmp_path_factory.mktemp("s3")) as instance:
        yield instance
