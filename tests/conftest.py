"""Shared test fixtures: small real NIfTI volumes on disk, and the path to ../shared when it exists."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tests._ray import HEAD_IP, RayCluster

# Two cores: one torch thread per pytest-xdist worker (two workers), two threads in a plain run.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)
# The user cache (first-use exports, `--backend auto`'s measured figures) is a temporary folder of the session, set
# before any Ray instance starts so its workers see it too: no test reads or writes the user's own.
os.environ["PHANES_CACHE_DIR"] = tempfile.mkdtemp(prefix="phanes-test-cache-")
atexit.register(shutil.rmtree, os.environ["PHANES_CACHE_DIR"], ignore_errors=True)

SHARED = Path(__file__).resolve().parents[2] / "shared"
SHARED_DATA = SHARED / "data"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files holding a slow test run first: pytest-xdist's `--dist loadfile` hands files out in collection order,
    and a long file handed out last leaves the other worker idle while it runs (the suite's wall time)."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)


def needs_shared() -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        not (SHARED_DATA / "healthy-t1").is_dir(), reason="../shared/data is not present on this machine"
    )


def blob_volume(shape: tuple[int, int, int] = (40, 48, 36), seed: int = 0) -> np.ndarray:
    """A smooth brain-like ellipsoid with texture, float32, zero background."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    r = np.sqrt(((grid / np.array([0.8, 0.85, 0.75])[:, None, None, None]) ** 2).sum(0))
    inside = r < 1.0
    data = (100 + 20 * np.sin(6 * grid[0]) * np.cos(5 * grid[1]) + rng.normal(0, 2, shape)) * inside
    return data.astype(np.float32)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The calibrated tiny untrained bundle (`tests.test_screening.make_bundle`), built once per session: tests read
    it; one that changes a bundle copies it first."""
    from tests.test_screening import make_bundle

    return make_bundle(tmp_path_factory.mktemp("tiny-bundle") / "bundle")


@pytest.fixture
def one_thread():
    """One torch thread for the block: results must not depend on thread races on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def write_nifti(tmp_path: Path):
    """Write an array with an affine to tmp_path/name and return the path."""

    def _write(name: str, data: np.ndarray, affine: np.ndarray | None = None, codes: tuple[int, int] = (1, 1)) -> Path:
        affine = np.diag([1.0, 1.0, 1.0, 1.0]) if affine is None else affine
        img = nib.Nifti1Image(data, affine)
        img.set_qform(affine, code=codes[0])
        img.set_sform(affine, code=codes[1])
        path = tmp_path / name
        nib.save(img, str(path))
        return path

    return _write


@pytest.fixture(scope="session")
def ray_head() -> Iterator[RayCluster]:
    """One real Ray head node (`ray start --head` on 127.0.0.2) for every test that screens on an existing
    cluster: starting Ray costs ~15-20 s on this machine, once is enough. Stopped at the end of the session,
    with a check that none of its processes is left."""
    head = RayCluster()
    try:
        head.start_head(cpus=2)
        yield head
    finally:
        head.stop()


@pytest.fixture(scope="module")
def ray_env() -> Iterator[None]:
    """Token authentication off for loopback test clusters (the driver must agree with the nodes)."""
    old = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    yield
    if old is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = old


@pytest.fixture(scope="module")
def cluster(ray_head: RayCluster, ray_env: None) -> Iterator[RayCluster]:
    """This module's driver, connected to the session's head node for the module (and disconnected after it)."""
    import ray

    try:
        ray.init(address=ray_head.address, _node_ip_address=HEAD_IP, log_to_driver=False)
        yield ray_head
    finally:
        ray.shutdown()
