"""Builds strive_kernels._C (the variant op) by driving CMake; every compile flag lives in CMakeLists.txt.

The CUDA kernel is built only when the installed torch is a CUDA build (torch.version.cuda; STRIVE_WITH_CUDA=0
opts out); a CPU torch gets the CPU kernel. Set STRIVE_CUDA_ARCHS="80;90" (CMake list) to choose CUDA architectures,
STRIVE_BUILD_TYPE=Debug for a debug build, MAX_JOBS to bound parallel compilation. Against a CUDA torch, CMake needs
the CUDA toolkit (nvcc and its libraries: torch's CMake package asks for them, for the CPU kernel too);
STRIVE_BUILD_EXT=0 installs without the extension, and the variant op runs its pure-torch twin.
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import torch  # the torch we build against; needs --no-build-isolation

        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        # STRIVE_WITH_CUDA=0 builds the CPU kernel only, even against a CUDA torch.
        with_cuda = torch.version.cuda is not None and os.environ.get("STRIVE_WITH_CUDA", "1") != "0"
        args = [
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('STRIVE_BUILD_TYPE', 'Release')}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out.parent}",
            f"-DSTRIVE_OUTPUT_NAME={out.name}",
            f"-DSTRIVE_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
        ]
        if os.environ.get("STRIVE_CUDA_ARCHS"):
            args.append(f"-DSTRIVE_CUDA_ARCHS={os.environ['STRIVE_CUDA_ARCHS']}")
        try:
            import ninja  # noqa: F401

            args.append("-GNinja")
        except ImportError:
            pass
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        try:
            subprocess.check_call(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args])
        except subprocess.CalledProcessError as e:
            if torch.version.cuda is None:
                raise
            raise RuntimeError(
                f"CMake could not configure strive_kernels._C against this CUDA build of torch (CUDA "
                f"{torch.version.cuda}): torch's CMake package needs the CUDA toolkit (nvcc and its libraries), also "
                f"for the CPU kernel. Put the toolkit's bin/ on PATH or set CUDA_HOME and install again, or install "
                f"without the extension: STRIVE_BUILD_EXT=0 (the variant op then runs its pure-torch twin)") from e
        subprocess.check_call(["cmake", "--build", str(build_dir), "--target", "_C", "-j", jobs])


build_ext_wanted = os.environ.get("STRIVE_BUILD_EXT", "1") != "0"
setup(ext_modules=[CMakeExtension("strive_kernels._C")] if build_ext_wanted else [], cmdclass={"build_ext": CMakeBuild})
