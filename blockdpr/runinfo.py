"""Atomic file writes and run provenance: the one place the project does either.

Atomic write: the bytes go to a temporary file in the target's directory (named
``.<name>.<random>.tmp``), are flushed and fsynced, and the temp file is renamed over the
target, so a kill at any instruction leaves the old file or the new one, never a torn one.
:func:`remove_stale_temps` deletes the temp files that interrupted writes left behind. A write
that fails for want of space or permission raises one OSError naming the target (torch.save
reports a full disk as a RuntimeError "unexpected pos" chained to the OSError: it is unwrapped).

Provenance: :func:`provenance` gives the git commit (and whether the tree was dirty), library
versions, the device, the host and a command line that re-runs the job (``python -m
package.module ...`` for a module run with ``-m``), for every JSON a run or a benchmark writes.
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, IO

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_write_json",
           "remove_stale_temps", "git_info", "versions", "device_info", "command_line", "provenance", "slug",
           "TEMP_SUFFIX"]

TEMP_SUFFIX = ".tmp"
_ROOT = Path(__file__).resolve().parent.parent


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(f)`` on a binary temp file beside ``path``, fsync it, then rename it to ``path``.

    Creates the parent directory. On any error (including KeyboardInterrupt) the temp file is
    removed and ``path`` is left as it was; an error of the file system (ENOSPC, EACCES, ...)
    is raised as ``OSError(errno, strerror, path)``, also when ``write`` wrapped it in another
    exception. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        cause = _os_error(e)
        if cause is None:
            raise
        raise OSError(cause.errno, cause.strerror or str(cause), str(path)) from e
    _fsync_dir(path.parent)
    return path


def _os_error(e: BaseException | None) -> OSError | None:
    """The OSError that `e` is or that caused it (torch.save raises RuntimeError over one)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno is not None:
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (with a trailing newline) to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def remove_stale_temps(directory: str | Path, older_than: float = 0.0) -> list[Path]:
    """Delete the temp files (``.<name>.*.tmp``) that interrupted atomic writes left in ``directory``.

    older_than: only those not modified for that many seconds, where another process may be
    writing into the directory at this moment (its temp file is younger).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    cutoff = time.time() - older_than
    stale = []
    for p in directory.glob(f".*{TEMP_SUFFIX}"):
        try:
            if p.is_file() and p.stat().st_mtime <= cutoff:
                p.unlink(missing_ok=True)
                stale.append(p)
        except FileNotFoundError:  # another process renamed or removed it meanwhile
            continue
    return stale


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def git_info(root: str | Path = _ROOT) -> dict:
    """``{"commit": sha or None, "dirty": bool}`` of the git tree at ``root`` (no git: commit None)."""
    def git(*args: str) -> str:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
            return out.stdout.strip() if out.returncode == 0 else ""
        except (OSError, subprocess.SubprocessError):
            return ""
    commit = git("rev-parse", "HEAD") or None
    return {"commit": commit, "dirty": bool(commit) and bool(git("status", "--porcelain", "--untracked-files=no"))}


def versions() -> dict:
    """Versions of python, torch, triton, numpy, CUDA and cuDNN (None where absent)."""
    import numpy as np
    import torch
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"python": platform.python_version(), "torch": torch.__version__, "triton": triton_version,
            "numpy": np.__version__, "cuda": torch.version.cuda, "cudnn": cudnn}


def device_info(device: Any = None) -> dict:
    """What a result was measured on: the device, its name, and for CUDA capability, SMs and memory."""
    import torch
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    info: dict[str, Any] = {"device": str(device), "host": platform.node(), "cpu_count": os.cpu_count(),
                            "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1"}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu_name=props.name, capability=list(torch.cuda.get_device_capability(device)),
                    sm_count=props.multi_processor_count, gpu_memory_bytes=props.total_memory,
                    driver=_nvidia_driver())
    else:
        info.update(gpu_name=None, cpu=platform.processor() or platform.machine())
    return info


def _nvidia_driver() -> str | None:
    """The NVIDIA driver version from nvidia-smi (None when it cannot be run)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return out[0] if out else None


def command_line(argv: list[str] | None = None) -> str | None:
    """``python ...`` that re-runs this process: argv (what follows ``python``, e.g. ``["-m",
    "bench.aot", "--x"]``), default this process's own command line, where a module started with
    ``python -m`` is named as such (``sys.argv[0]`` is then its file, which cannot run alone)."""
    if argv is None:
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        module = spec.name.removesuffix(".__main__") if spec is not None and spec.name else None
        argv = ["-m", module, *sys.argv[1:]] if module else list(sys.argv)
    return shlex.join(["python", *argv]) if argv else None


def provenance(device: Any = None, argv: list[str] | None = None) -> dict:
    """Everything needed to say where a result came from: command (:func:`command_line`; `argv`
    is what follows ``python``), git, versions, device, time (UTC)."""
    from datetime import datetime, timezone
    return {"command": command_line(argv),
            "cwd": os.getcwd(), "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "git": git_info(), "versions": versions(), "device": device_info(device)}


def slug(text: str) -> str:
    """A file-name-safe lower-case form of a name: ``"NVIDIA H200"`` -> ``"nvidia-h200"``."""
    import re
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
