"""Packaging: setuptools builds the package without a warning, and the recipes travel as package data.

`pip install -e .` runs setuptools' build_py, which warns ("Package would be ignored", ~40 lines) about every
importable folder holding package data that `packages` does not list. The build runs in a copy of the sources so
that it leaves nothing in the checkout, and without the C++ extension (build_py only: seconds, not minutes).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_build_py_is_quiet_and_ships_every_recipe(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.pyc")
    for pkg in ("strive_engine", "kernels"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=ignore)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}  # else distutils says so
    res = subprocess.run([sys.executable, "setup.py", "build_py", "--build-lib", str(tmp_path / "lib")], cwd=src,
                         env=env, capture_output=True, text=True, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    for noise in ("would be ignored", "absent from the `packages`", "Warning", "warning:"):
        assert noise not in out, out[-3000:]
    shipped = sorted(p.name for p in (tmp_path / "lib" / "strive_engine" / "recipes").glob("*.toml"))
    assert shipped == sorted(p.name for p in (ROOT / "strive_engine" / "recipes").glob("*.toml")) and shipped


def test_strive_build_ext_0_installs_without_the_extension(tmp_path):
    """STRIVE_BUILD_EXT=0 (a CUDA torch without the CUDA toolkit, whose CMake package cannot be configured): the
    build step succeeds and builds nothing; the variant op then runs its pure-torch twin."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", "CMakeLists.txt"):
        shutil.copy(ROOT / name, src / name)
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}, "STRIVE_BUILD_EXT": "0"}
    res = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-lib", str(tmp_path / "lib")], cwd=src,
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert not list((tmp_path / "lib").rglob("_C*")) and not (src / "build").exists()
