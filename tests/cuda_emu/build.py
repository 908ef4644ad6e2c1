"""Build the emulated CUDA op library: the real csrc/cuda/*.cu kernels compiled as C++ on the host.

Test-only (never installed, never part of the wheel). The library registers the ops under their
own namespace, ``torch.ops.pyboundary_emu.*``, for the CPU dispatch key: tensors of the emulated
device are CPU tensors, and tests/cuda_emu/shim.py routes the public wrappers of
``pyboundary.ops`` to it. It is built with AddressSanitizer, so it loads only into a process that
has the ASan runtime preloaded (``LD_PRELOAD="$(python tests/cuda_emu/build.py --preload)"``;
`make cuda-emu` does this).

What is compiled:
  csrc/checks.cpp, csrc/dct_matrix.cpp     unchanged
  csrc/ops.cpp                             TORCH_LIBRARY(pyboundary, ...) -> (pyboundary_emu, ...)
  csrc/cuda/*.cu                           as C++, with tests/cuda_emu/include/pyb_cuda_emu.h
                                           force-included and the shim headers of
                                           tests/cuda_emu/include first on the include path;
                                           launches kernel<<<g, b, s, st>>>(args) rewritten into
                                           ::pyb_emu::launch("kernel", kernel, g, b, s, st, args);
                                           TORCH_LIBRARY_IMPL(pyboundary, CUDA, m) ->
                                           TORCH_LIBRARY_IMPL(pyboundary_emu, CPU, m)
  tests/cuda_emu/runtime.cpp               the emulator (threads, barrier, errors, counters)
  tests/cuda_emu/selftest.cu               a kernel testing the emulator itself (as a .cu above)

Rewrites keep every line where it was (a ``#line`` directive names the real source), so compiler
and ASan reports point into csrc/. Objects and the library are cached under
``build/cuda_emu/`` (or $PYBOUNDARY_CUDA_EMU_CACHE) by a hash of the rewritten sources, every
header they may include, the flags, the compiler and torch: a second build of unchanged sources
is a cache hit, and a broken variant (``--variant``, used by tests/cuda_emu/test_emulator.py to
show that the emulation catches kernel bugs) recompiles only the file it changes.

Usage:
    python tests/cuda_emu/build.py [--variant NAME] [--jobs N]     # prints the library path
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CSRC = ROOT / "csrc"
INCLUDE = HERE / "include"
NAMESPACE = "pyboundary_emu"
LIB_NAME = "libpyboundary_emu.so"

# Deliberately broken kernels: name -> [(file relative to ROOT, exact text, replacement)].
# Each text must occur exactly once (a kernel edit that moves it makes the variant build fail
# loudly, so the demonstration cannot silently stop testing anything).
VARIANTS = {
    # rows_kernel reads row o + a of C_H with a row stride of H + 1 instead of H: the last rows
    # of a block at the bottom edge read past the end of the matrix (ASan: heap-buffer-overflow).
    "broken-stride": [
        (
            "csrc/cuda/dct_kernel.cu",
            "const scalar_t* m = mat + (o + a) * H;  // row o + a of C_H",
            "const scalar_t* m = mat + (o + a) * (H + 1);  // BROKEN: row stride H + 1",
        )
    ],
    # the select kernel's tree reduction without its barrier: thread 0 adds partial sums that
    # the other threads have not combined yet (wrong norms, wrong choices).
    "no-barrier": [
        (
            "csrc/cuda/select_kernel.cu",
            "      if (tid < s) red[tid] += red[tid + s];\n      __syncthreads();\n",
            "      if (tid < s) red[tid] += red[tid + s];\n      /* BROKEN: barrier removed */\n",
        )
    ],
}


def cache_dir() -> Path:
    return Path(os.environ.get("PYBOUNDARY_CUDA_EMU_CACHE", ROOT / "build" / "cuda_emu"))


# ---- source rewriting -------------------------------------------------------------------------


def _match_back(text: str, end: int, open_ch: str, close_ch: str) -> int:
    """Index of the open_ch matching the close_ch at text[end]."""
    depth = 0
    for i in range(end, -1, -1):
        if text[i] == close_ch:
            depth += 1
        elif text[i] == open_ch:
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced {open_ch}{close_ch} before offset {end}")


def _match_forward(text: str, start: int, open_ch: str, close_ch: str) -> int:
    """Index of the close_ch matching the open_ch at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == open_ch:
            depth += 1
        elif text[i] == close_ch:
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced {open_ch}{close_ch} after offset {start}")


def _split_top_level(s: str) -> list[str]:
    """Split at commas outside (), <> nesting."""
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch in "(<[{":
            depth += 1
        elif ch in ")>]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def rewrite_launches(text: str, where: str = "<source>") -> tuple[str, int]:
    """Rewrite every ``kernel<...><<<cfg>>>(args)`` into an emulated launch; (text, count)."""
    out, pos, count = [], 0, 0
    while True:
        start = text.find("<<<", pos)
        if start < 0:
            break
        # kernel expression: identifier (with ::) optionally followed by template arguments
        k_end = start
        while k_end > 0 and text[k_end - 1].isspace():
            k_end -= 1
        k_start = k_end
        if text[k_end - 1] == ">":
            k_start = _match_back(text, k_end - 1, "<", ">")
        while k_start > 0 and (text[k_start - 1].isalnum() or text[k_start - 1] in "_:"):
            k_start -= 1
        kernel = text[k_start:k_end]
        if not re.match(r"[A-Za-z_:]", kernel):
            raise ValueError(f"{where}: cannot parse the kernel name before offset {start}")
        cfg_end = text.find(">>>", start)
        if cfg_end < 0:
            raise ValueError(f"{where}: '<<<' without '>>>' at offset {start}")
        cfg = _split_top_level(text[start + 3 : cfg_end])
        if not 2 <= len(cfg) <= 4:
            raise ValueError(f"{where}: launch configuration needs 2 to 4 values, got {cfg}")
        cfg += ["0", "nullptr"][len(cfg) - 2 :]
        paren = cfg_end + 3
        while text[paren].isspace():
            paren += 1
        if text[paren] != "(":
            raise ValueError(f"{where}: expected '(' after '>>>' at offset {paren}")
        close = _match_forward(text, paren, "(", ")")
        args = text[paren + 1 : close]
        name = re.sub(r"\s+", " ", kernel.split("<")[0])
        sep = ", " if args.strip() else ""
        out.append(text[pos:k_start])
        out.append(f'::pyb_emu::launch("{name}", {kernel}, {", ".join(c.strip() for c in cfg)}{sep}{args})')
        pos = close + 1
        count += 1
    out.append(text[pos:])
    return "".join(out), count


_IMPL = re.compile(r"TORCH_LIBRARY_IMPL\(\s*pyboundary\s*,\s*CUDA\s*,")
_DEF = re.compile(r"TORCH_LIBRARY\(\s*pyboundary\s*,")
_ANY_REAL = re.compile(r"TORCH_LIBRARY\w*\(\s*pyboundary\s*,")


def rewrite_source(rel: str, text: str) -> str:
    """The emulation form of one source file (see the module docstring)."""
    where = rel
    if rel.endswith(".cu"):
        text, n = rewrite_launches(text, where)
        if n == 0:
            raise ValueError(f"{where}: no kernel launch found")
    if rel.startswith("csrc/cuda/"):
        text, n = _IMPL.subn(f"TORCH_LIBRARY_IMPL({NAMESPACE}, CPU,", text)
        if n != 1:
            raise ValueError(f"{where}: expected one TORCH_LIBRARY_IMPL(pyboundary, CUDA, m), found {n}")
    elif rel == "csrc/ops.cpp":
        text, n = _DEF.subn(f"TORCH_LIBRARY({NAMESPACE},", text)
        if n != 1:
            raise ValueError(f"{where}: expected one TORCH_LIBRARY(pyboundary, m), found {n}")
    if _ANY_REAL.search(text):
        raise ValueError(f"{where}: would register into the real 'pyboundary' namespace")
    return f'#line 1 "{ROOT / rel}"\n' + text


# ---- build ------------------------------------------------------------------------------------


def _torch_info():
    import torch
    from torch.utils import cpp_extension

    return (
        torch.__version__,
        int(torch._C._GLIBCXX_USE_CXX11_ABI),
        cpp_extension.include_paths(),
        cpp_extension.library_paths(),
    )


def _compiler() -> str:
    return os.environ.get("CXX", "g++")


def _flags(torch_abi: int, torch_includes: list[str]) -> list[str]:
    flags = [
        "-std=c++17", "-fPIC", "-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer",
        "-fvisibility=hidden", f"-D_GLIBCXX_USE_CXX11_ABI={torch_abi}", "-DPYBOUNDARY_WITH_CUDA=1",
        "-Wall", "-Wno-unknown-pragmas",
        f"-I{INCLUDE}", f"-I{CSRC}", f"-I{CSRC / 'cuda'}",
    ]
    return flags + [f"-isystem{p}" for p in torch_includes]


def _sources(variant: str | None) -> list[tuple[str, str, bool]]:
    """(relative path, source text to compile, compile as emulated CUDA) of every unit."""
    units = ["csrc/checks.cpp", "csrc/dct_matrix.cpp", "csrc/ops.cpp"]
    units += sorted(str(p.relative_to(ROOT)) for p in (CSRC / "cuda").glob("*.cu"))
    mutations = VARIANTS[variant] if variant else []
    unknown = {m[0] for m in mutations} - set(units)
    if unknown:
        raise ValueError(f"variant {variant}: unknown files {unknown}")
    result = []
    for rel in units:
        text = (ROOT / rel).read_text()
        for path, old, new in mutations:
            if path == rel:
                if text.count(old) != 1:
                    raise ValueError(f"variant {variant}: {old!r} occurs {text.count(old)} times in {rel}")
                text = text.replace(old, new)
        result.append((rel, rewrite_source(rel, text), rel.endswith(".cu")))
    runtime, selftest = HERE / "runtime.cpp", HERE / "selftest.cu"
    result.append((str(runtime.relative_to(ROOT)), f'#line 1 "{runtime}"\n' + runtime.read_text(), False))
    rel = str(selftest.relative_to(ROOT))
    result.append((rel, rewrite_source(rel, selftest.read_text()), True))
    return result


def _headers_digest() -> str:
    h = hashlib.sha256()
    for base in (CSRC, INCLUDE):
        for p in sorted(base.rglob("*.h")):
            h.update(str(p.relative_to(ROOT)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _compiler_version(cxx: str) -> str:
    return subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout


def _plan(variant: str | None):
    torch_version, abi, includes, libdirs = _torch_info()
    cxx = _compiler()
    flags = _flags(abi, includes)
    common = "\0".join([_compiler_version(cxx), torch_version, " ".join(flags), _headers_digest()])
    units = []
    for rel, text, emulated in _sources(variant):
        extra = ["-include", "pyb_cuda_emu.h"] if emulated else []
        key = hashlib.sha256("\0".join([common, rel, " ".join(extra), text]).encode()).hexdigest()[:24]
        units.append((rel, text, extra, key))
    lib_key = hashlib.sha256("\0".join([common] + [u[3] for u in units]).encode()).hexdigest()[:24]
    return cxx, flags, libdirs, units, lib_key


def library_path(variant: str | None = None) -> Path:
    """Where the library of these sources is (or will be) cached."""
    *_, lib_key = _plan(variant)
    return cache_dir() / "lib" / lib_key / LIB_NAME


def build(variant: str | None = None, jobs: int | None = None, log=print) -> Path:
    """Build (or find in the cache) the emulated library; returns its path."""
    cxx, flags, libdirs, units, lib_key = _plan(variant)
    lib = cache_dir() / "lib" / lib_key / LIB_NAME
    if lib.exists():
        log(f"cuda-emu: cached {lib}")
        return lib
    objdir = cache_dir() / "obj"
    objdir.mkdir(parents=True, exist_ok=True)
    srcdir = cache_dir() / "src"
    srcdir.mkdir(parents=True, exist_ok=True)

    def compile_unit(unit):
        rel, text, extra, key = unit
        obj = objdir / f"{key}.o"
        if obj.exists():
            return rel, obj, False
        src = srcdir / f"{key}-{Path(rel).stem}.cpp"
        src.write_text(text)
        tmp = obj.with_suffix(f".{os.getpid()}.tmp.o")
        cmd = [cxx, *flags, *extra, "-c", str(src), "-o", str(tmp)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"cuda-emu: compiling {rel} failed:\n{' '.join(cmd)}\n{res.stderr}")
        os.replace(tmp, obj)
        return rel, obj, True

    jobs = jobs or int(os.environ.get("MAX_JOBS", "2"))
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as ex:
        results = list(ex.map(compile_unit, units))
    for rel, _, compiled in results:
        log(f"cuda-emu: {'compiled' if compiled else 'cached  '} {rel}")
    lib.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=lib.parent)) / LIB_NAME
    cmd = [cxx, "-shared", "-fsanitize=address", "-o", str(tmp), *[str(r[1]) for r in results]]
    for d in libdirs:
        cmd += [f"-L{d}", f"-Wl,-rpath,{d}"]
    cmd += ["-lc10", "-ltorch_cpu", "-ltorch"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"cuda-emu: linking failed:\n{' '.join(cmd)}\n{res.stderr}")
    os.replace(tmp, lib)
    tmp.parent.rmdir()
    log(f"cuda-emu: built {lib}")
    return lib


def preload() -> str:
    """LD_PRELOAD value for a Python process that loads the library: the compiler's ASan runtime
    and its libstdc++ (loaded up front, or ASan cannot intercept C++ exceptions in a Python
    binary that does not link libstdc++: "CHECK failed ... real___cxa_throw")."""
    libs = []
    for name in ("libasan.so", "libstdc++.so"):
        out = subprocess.run([_compiler(), f"-print-file-name={name}"], capture_output=True, text=True, check=True)
        libs.append(os.path.realpath(out.stdout.strip()))
    return " ".join(libs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", choices=sorted(VARIANTS), default=None, help="a deliberately broken build")
    ap.add_argument("--jobs", type=int, default=None, help="parallel compile jobs (default $MAX_JOBS or 2)")
    ap.add_argument("--preload", action="store_true", help="print the LD_PRELOAD value to run tests with, and exit")
    args = ap.parse_args(argv)
    if args.preload:
        print(preload())
        return 0
    lib = build(args.variant, args.jobs, log=lambda m: print(m, file=sys.stderr))
    print(lib)
    return 0


if __name__ == "__main__":
    sys.exit(main())
