"""Shared test helpers: the repository on sys.path, quiet warnings, a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# one thread per test process: the suite runs as parallel pytest-xdist workers, and
# oversubscribed BLAS threads are many times slower than one thread each
torch.set_num_threads(1)


def run_module_cli(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -m recipes.cli ARGS`` in a child process (for kill/resume and exit codes)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "recipes.cli", *args],
        cwd=cwd or ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def cli():
    """Invoke the click CLI in-process; returns click's Result (exit_code, output)."""
    from click.testing import CliRunner

    from recipes.cli import cli as root

    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(root, list(args), catch_exceptions=False)

    return invoke


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One cost cache for the module (``KDCOMPRESS_CACHE``), away from the user's: the candidates
    are measured once, as a user's second plan would be."""
    path = tmp_path_factory.mktemp("cache")
    old = os.environ.get("KDCOMPRESS_CACHE")
    os.environ["KDCOMPRESS_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("KDCOMPRESS_CACHE", None)
    else:
        os.environ["KDCOMPRESS_CACHE"] = old


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory) -> str:
    """A resnet8 trained for two epochs on digits: enough to be a teacher that beats chance (modules
    that need another teacher define their own ``digits_teacher``)."""
    from recipes.training import train_vanilla

    path = tmp_path_factory.mktemp("teacher") / "resnet8.pt"
    train_vanilla("resnet8", "digits", path, epochs=2, progress="off")
    return str(path)
