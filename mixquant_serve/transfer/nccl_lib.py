"""A ctypes binding of the few NCCL calls the nccl transfer backend needs (no torch.distributed).

The library is the one PyTorch ships (the nvidia-nccl-cu* wheel's libnccl.so.2), found in this order:
$MIXQUANT_NCCL_LIBRARY, a libnccl already mapped into this process (torch loads it), the `nvidia`
packages on sys.path, torch's lib folder, then the system loader.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import importlib.util
import os
import sys
from collections.abc import Iterable

ENV_VAR = "MIXQUANT_NCCL_LIBRARY"
UNIQUE_ID_BYTES = 128
UINT8 = 1  # ncclUint8

_RESULTS = {
    0: "ncclSuccess", 1: "ncclUnhandledCudaError", 2: "ncclSystemError", 3: "ncclInternalError",
    4: "ncclInvalidArgument", 5: "ncclInvalidUsage", 6: "ncclRemoteError", 7: "ncclInProgress",
}


class NcclUnavailable(RuntimeError):
    """NCCL's shared library cannot be found or loaded."""


class NcclError(RuntimeError):
    """An NCCL call returned an error; `code` is its ncclResult_t."""

    def __init__(self, call: str, code: int, message: str) -> None:
        super().__init__(f"{call} failed: {_RESULTS.get(code, f'ncclResult {code}')}: {message}")
        self.call, self.code = call, code


class _UniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_byte * UNIQUE_ID_BYTES)]


def _mapped(maps_path: str) -> list[str]:
    """Paths of libnccl objects already loaded into this process."""
    try:
        with open(maps_path) as f:
            paths = {line.split()[-1] for line in f if "libnccl.so" in line}
    except OSError:
        return []
    return sorted(p for p in paths if p.startswith("/"))


def _in_packages(search_path: Iterable[str]) -> list[str]:
    """libnccl in the nvidia-nccl-cu* wheel: nvidia/nccl/lib, or nvidia/<something>/lib."""
    found: list[str] = []
    for root in search_path:
        for pattern in ("nvidia/nccl/lib/libnccl.so*", "nvidia/*/lib/libnccl.so*"):
            found += sorted(glob.glob(os.path.join(root, pattern)))
    return found


def _torch_lib() -> list[str]:
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return []
    return sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "lib", "libnccl.so*")))


def candidates(maps_path: str = "/proc/self/maps", search_path: Iterable[str] | None = None) -> list[str]:
    """Where libnccl might be, best first, without duplicates ($MIXQUANT_NCCL_LIBRARY aside)."""
    paths = _mapped(maps_path) + _in_packages(sys.path if search_path is None else search_path) + _torch_lib()
    system = ctypes.util.find_library("nccl")
    if system:
        paths.append(system)
    return list(dict.fromkeys(paths))


def find_library(maps_path: str = "/proc/self/maps", search_path: Iterable[str] | None = None) -> str:
    override = os.environ.get(ENV_VAR)
    if override:
        if not os.path.exists(override):
            raise NcclUnavailable(f"{ENV_VAR}={override} does not exist")
        return override
    found = candidates(maps_path, search_path)
    if not found:
        raise NcclUnavailable(
            "cannot find NCCL's shared library (libnccl.so.2): it is not loaded in this process, not in an "
            "nvidia-nccl-cu* package on sys.path, not in torch's lib folder and not known to the system "
            f"loader. Install the nvidia-nccl-cu* wheel that matches your PyTorch, or set {ENV_VAR}.")
    return found[0]


class Nccl:
    """The loaded library. Communicators and streams are plain integers (pointers)."""

    def __init__(self, path: str) -> None:
        try:
            self.lib = ctypes.CDLL(path)
        except OSError as e:
            raise NcclUnavailable(f"cannot load NCCL from {path}: {e}") from e
        self.path = path
        self._declare()

    def _declare(self) -> None:
        vp, c_int, c_size = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
        sig = {
            "ncclGetVersion": [ctypes.POINTER(c_int)],
            "ncclGetUniqueId": [ctypes.POINTER(_UniqueId)],
            "ncclCommInitRank": [ctypes.POINTER(vp), c_int, _UniqueId, c_int],
            "ncclSend": [vp, c_size, c_int, c_int, vp, vp],
            "ncclRecv": [vp, c_size, c_int, c_int, vp, vp],
            "ncclGroupStart": [],
            "ncclGroupEnd": [],
            "ncclCommDestroy": [vp],
            "ncclCommAbort": [vp],
            "ncclCommGetAsyncError": [vp, ctypes.POINTER(c_int)],
        }
        for name, args in sig.items():
            fn = getattr(self.lib, name)
            fn.argtypes, fn.restype = args, c_int
        self.lib.ncclGetErrorString.argtypes, self.lib.ncclGetErrorString.restype = [c_int], ctypes.c_char_p
        self._last_error = getattr(self.lib, "ncclGetLastError", None)  # NCCL >= 2.13
        if self._last_error is not None:
            self._last_error.argtypes, self._last_error.restype = [vp], ctypes.c_char_p

    def _check(self, call: str, code: int, comm: int | None = None) -> None:
        if code == 0:
            return
        message = (self.lib.ncclGetErrorString(code) or b"").decode(errors="replace")
        if self._last_error is not None:
            detail = (self._last_error(comm) or b"").decode(errors="replace")
            if detail:
                message = f"{message} ({detail})"
        raise NcclError(call, code, message)

    def version(self) -> int:
        v = ctypes.c_int()
        self._check("ncclGetVersion", self.lib.ncclGetVersion(ctypes.byref(v)))
        return v.value

    def unique_id(self) -> bytes:
        uid = _UniqueId()
        self._check("ncclGetUniqueId", self.lib.ncclGetUniqueId(ctypes.byref(uid)))
        return bytes(uid.internal)

    def comm_init_rank(self, nranks: int, unique_id: bytes, rank: int) -> int:
        """Blocks until all nranks ranks have joined; the calling thread's current CUDA device is used."""
        if len(unique_id) != UNIQUE_ID_BYTES:
            raise ValueError(f"an NCCL unique id has {UNIQUE_ID_BYTES} bytes, not {len(unique_id)}")
        uid = _UniqueId()
        ctypes.memmove(uid.internal, unique_id, UNIQUE_ID_BYTES)
        comm = ctypes.c_void_p()
        self._check("ncclCommInitRank", self.lib.ncclCommInitRank(ctypes.byref(comm), nranks, uid, rank))
        return comm.value

    def send(self, ptr: int, nbytes: int, peer: int, comm: int, stream: int) -> None:
        self._check("ncclSend", self.lib.ncclSend(ptr, nbytes, UINT8, peer, comm, stream), comm)

    def recv(self, ptr: int, nbytes: int, peer: int, comm: int, stream: int) -> None:
        self._check("ncclRecv", self.lib.ncclRecv(ptr, nbytes, UINT8, peer, comm, stream), comm)

    def group_start(self) -> None:
        self._check("ncclGroupStart", self.lib.ncclGroupStart())

    def group_end(self) -> None:
        self._check("ncclGroupEnd", self.lib.ncclGroupEnd())

    def async_error(self, comm: int) -> NcclError | None:
        """The communicator's asynchronous error (e.g. a remote peer failed), if any; does not block."""
        code = ctypes.c_int()
        self._check("ncclCommGetAsyncError", self.lib.ncclCommGetAsyncError(comm, ctypes.byref(code)), comm)
        if code.value in (0, 7):  # success / in progress
            return None
        try:
            self._check("ncclCommGetAsyncError", code.value, comm)
        except NcclError as e:
            return e
        return None

    def comm_abort(self, comm: int) -> None:
        """Frees the communicator without waiting for its peer; pending operations are cut short."""
        self._check("ncclCommAbort", self.lib.ncclCommAbort(comm))

    def comm_destroy(self, comm: int) -> None:
        self._check("ncclCommDestroy", self.lib.ncclCommDestroy(comm))


@functools.lru_cache(maxsize=1)
def load() -> Nccl:
    """The process-wide NCCL binding (raises NcclUnavailable with the places it looked)."""
    return Nccl(find_library())
