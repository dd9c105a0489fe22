"""CI without a GPU: every csrc/*.cu (and the CUDA binding) compiles with this machine's nvcc against the
installed (CPU) torch headers, for every architecture in STRIVE_CUDA_ARCHS -- configure + build the
`strive_cuda_check` object target of CMakeLists.txt in a temporary directory, nothing is linked."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _nvcc() -> str | None:
    for cand in (os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and Path(cand).is_file():
            return cand
    return None


def _cmake() -> str | None:
    venv_cmake = Path(sys.executable).parent / "cmake"  # the pinned one (requirements.lock)
    return str(venv_cmake) if venv_cmake.is_file() else shutil.which("cmake")


def _default_archs() -> list[str]:
    text = (ROOT / "CMakeLists.txt").read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("set(STRIVE_CUDA_ARCHS"))
    return line.split('"')[1].split(";")


@pytest.mark.skipif(_nvcc() is None, reason="no nvcc on this machine: the CUDA sources cannot be compile-checked")
@pytest.mark.skipif(_cmake() is None, reason="no cmake on this machine")
@pytest.mark.timeout(900)
def test_every_cu_file_compiles(tmp_path):
    nvcc, cmake = _nvcc(), _cmake()
    configure = [cmake, "-S", str(ROOT), "-B", str(tmp_path), "-DSTRIVE_CUDA_COMPILE_CHECK=ON",
                 f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                 f"-DPython3_EXECUTABLE={sys.executable}", "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON"]
    if shutil.which("ninja") or (Path(sys.executable).parent / "ninja").is_file():
        configure.append("-GNinja")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for cmd in (configure, [cmake, "--build", str(tmp_path), "--target", "strive_cuda_check", "-j", "2"]):
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"{' '.join(cmd[:3])} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"

    cu_files = sorted(p.name for p in (ROOT / "csrc").glob("*.cu"))
    assert cu_files, "no .cu files in csrc/"
    objects = sorted(p.name for p in tmp_path.rglob("*.cu.o"))
    assert objects == [f"{name}.o" for name in cu_files]
    commands = json.loads((tmp_path / "compile_commands.json").read_text())
    for name in cu_files:
        cmd = next(c["command"] for c in commands if c["file"].endswith(name))
        for arch in _default_archs():  # the -arch list comes from the one CMake variable
            assert f"sm_{arch}" in cmd, f"{name} not compiled for sm_{arch}: {cmd}"
