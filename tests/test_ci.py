"""CI's system packages: missing Fashion-MNIST data fails CI; a missing Chromium only warns."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / ".ci" / "system_packages"
BASH = shutil.which("bash")


def _run(tmp_path: Path, data: Path, apt_installs: bool) -> subprocess.CompletedProcess[str]:
    """The script with a fake apt-get on an otherwise empty PATH (so no chromium is found)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    apt = bin_dir / "apt-get"
    action = (
        f'[ "$1" = install ] && [ "$4" = dataset-fashion-mnist ] && exec {shutil.which("mkdir")} -p {data}'
    )
    body = f"{action}\nexit 0\n" if apt_installs else "echo 'E: mirror unreachable' >&2\nexit 100\n"
    apt.write_text(f"#!{BASH}\n{body}")
    apt.chmod(0o755)
    env = {"PATH": str(bin_dir), "FASHION_MNIST_DIR": str(data)}
    return subprocess.run([BASH, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(BASH is None, reason="needs bash")
def test_missing_fashion_mnist_that_cannot_be_installed_fails_ci(tmp_path: Path) -> None:
    result = _run(tmp_path, tmp_path / "fashion-mnist", apt_installs=False)
    assert result.returncode == 1
    assert "ERROR: could not install dataset-fashion-mnist" in result.stderr


@pytest.mark.skipif(BASH is None, reason="needs bash")
def test_fashion_mnist_installed_passes_and_missing_chromium_only_warns(tmp_path: Path) -> None:
    data = tmp_path / "fashion-mnist"
    installed = _run(tmp_path, data, apt_installs=True)
    assert installed.returncode == 0 and data.is_dir(), installed.stderr
    data.mkdir(exist_ok=True)
    offline = _run(tmp_path, data, apt_installs=False)  # data present; chromium cannot be installed
    assert offline.returncode == 0
    assert "WARNING: could not install chromium" in offline.stderr
