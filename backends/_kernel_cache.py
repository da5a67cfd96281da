"""The disk cache of generated numba kernels: used only in folders no one else can write.

The fused NumPy path (:mod:`._numba`) writes each generated kernel module as a ``.py``
file and lets numba keep its machine code beside it (``__pycache__/*.nbi`` index and
``*.nbc`` data files), so a later process loads kernels instead of compiling them.
numba *unpickles* those files, and unpickling runs code: a folder another local user can
write (or could have prepared) would let that user run code as us. So a folder is used
only when it passes the checks OpenSSH (``StrictModes``) and the XDG base-directory spec
apply, made with :func:`os.lstat` so that no symbolic link is followed unchecked:

* the cache root (``$OPTIM_CORE_CACHE_DIR``; else ``$XDG_CACHE_HOME`` or ``~/.cache``;
  else ``<tempdir>/optim_core-<uid>``) and every folder below it down to ``__pycache__``
  are directories owned by the current user and not writable by group or others;
  missing ones are created with mode 0700;
* every folder above the root is owned by the current user or root and not writable by
  group or others, unless it is sticky (as ``/tmp`` is: nobody can rename or replace
  another user's entries in it);
* a symbolic link on the way is followed only if it is owned by the current user or
  root, and its target is checked the same way.

If no candidate passes, kernels are compiled in memory (numba ``cache=False``), with no
file written or read. Nothing about the cache can fail a step: a refused folder, disk
full, a read-only file system, a corrupted index or data file, a vanished folder, a
missing temporary directory all fall back to compiling in memory (a corrupted index is
rewritten on the next save), and a :class:`KernelCacheWarning` says what happened, once
per process.
"""

from __future__ import annotations

import functools
import hashlib
import linecache
import os
import stat
import sys
import tempfile
import threading
import types
import uuid
import warnings
from pathlib import Path
from typing import Any

__all__ = ["KernelCacheWarning", "cache_directory", "import_kernel_module"]

#: Symbolic links followed at most while checking one path (as the kernel's ELOOP limit).
_MAX_LINKS = 40
_PYCACHE = "__pycache__"


class KernelCacheWarning(RuntimeWarning):
    """The kernel disk cache is not used, or failed: kernels are compiled in memory.

    Issued once per process; the step it happened in ran correctly.
    """


class _Untrusted(OSError):
    """A folder that others can write to, or that is not what it claims to be."""


_warned = False
_warn_lock = threading.Lock()


def _warn_once(message: str) -> None:
    """One :class:`KernelCacheWarning` per process: the first problem met, and its cause."""
    global _warned
    with _warn_lock:
        if _warned:
            return
        _warned = True
    warnings.warn(f"optim_core kernel cache: {message} (shown once per process)",
                  KernelCacheWarning, stacklevel=2)


# --------------------------------------------------------------------------- folders
def _candidates() -> list[tuple[str, tuple[str, ...]]]:
    """(root, folders below it) of each cache location, in order of preference."""
    configured = os.environ.get("OPTIM_CORE_CACHE_DIR")
    if configured:
        candidates = [(configured, ("numba_kernels",))]
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        if not xdg or not os.path.isabs(xdg):  # the XDG spec: a relative path is ignored
            xdg = os.path.join(os.path.expanduser("~"), ".cache")
        candidates = [(xdg, ("optim_core", "numba_kernels"))]
    try:
        temp = tempfile.gettempdir()
    except OSError:  # FileNotFoundError: no usable temporary directory at all
        return candidates
    candidates.append((os.path.join(temp, f"optim_core-{os.getuid()}"), ("numba_kernels",)))
    return candidates


def _check(path: str, st: os.stat_result, owned: bool) -> None:
    """Refuse ``path`` unless it is a folder nobody but us (and root, above the root) can
    change."""
    uid = os.getuid()
    if not stat.S_ISDIR(st.st_mode):
        raise _Untrusted(f"{path} is not a directory")
    if owned:
        if st.st_uid != uid:
            raise _Untrusted(f"{path} is owned by uid {st.st_uid}, not by this user ({uid})")
        if st.st_mode & 0o022:
            raise _Untrusted(f"{path} is writable by group or others "
                             f"(mode {stat.S_IMODE(st.st_mode):o})")
    else:
        if st.st_uid not in (0, uid):
            raise _Untrusted(f"{path} is owned by uid {st.st_uid}, neither this user nor root")
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise _Untrusted(f"{path} is writable by group or others and not sticky "
                             f"(mode {stat.S_IMODE(st.st_mode):o})")


def _private_folder(root: str, below: tuple[str, ...]) -> str:
    """The real path of ``root/below...``, created (mode 0700) and checked component by
    component; raises OSError (:class:`_Untrusted` for a folder others may change)."""
    uid = os.getuid()
    root = os.path.abspath(root)
    # A stack of (name, owned): "owned" components must belong to this user alone.
    names = [name for name in root.split(os.sep) if name]
    pending = [(name, True) for name in reversed(below)]
    pending += [(name, i == len(names) - 1) for i, name in reversed(list(enumerate(names)))]
    current = os.sep
    _check(current, os.lstat(current), owned=not names)
    links = 0
    while pending:
        name, owned = pending.pop()
        if name in ("", "."):
            continue
        if name == "..":  # `current` is already a real, checked path
            current = os.path.dirname(current)
            continue
        path = os.path.join(current, name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:  # created meanwhile: checked below like any other
                pass
            st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > _MAX_LINKS:
                raise _Untrusted(f"{path}: too many symbolic links")
            if st.st_uid not in (0, uid):
                raise _Untrusted(f"{path} is a symbolic link owned by uid {st.st_uid}")
            target = os.readlink(path)
            parts = [part for part in target.split(os.sep) if part]
            # The link stands for its last component: that one inherits `owned`.
            pending += [(part, owned and i == len(parts) - 1)
                        for i, part in reversed(list(enumerate(parts)))]
            if os.path.isabs(target):
                current = os.sep
            continue
        _check(path, st, owned)
        current = path
    return current


def _probe_writable(folder: str) -> None:
    probe = os.path.join(folder, f".probe-{os.getpid()}-{threading.get_ident()}-"
                                 f"{uuid.uuid4().hex[:8]}")
    os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW, 0o600))
    os.unlink(probe)


_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def _find_directory() -> tuple[Path | None, list[str]]:
    """The first trusted, writable cache folder, and why the ones before it were refused."""
    refused = []
    for root, below in _candidates():
        try:
            pycache = _private_folder(root, (*below, _PYCACHE))
            folder = os.path.dirname(pycache)
            _probe_writable(folder)
            _probe_writable(pycache)
        except OSError as exc:
            refused.append(f"{os.path.join(root, *below)}: {exc}")
            continue
        return Path(folder), refused
    return None, refused


def cache_directory() -> Path | None:
    """Where generated kernel modules (and numba's cache of them) are kept, or None.

    ``$OPTIM_CORE_CACHE_DIR/numba_kernels`` if set, else
    ``$XDG_CACHE_HOME/optim_core/numba_kernels`` (default ``~/.cache/optim_core/...``);
    ``<tempdir>/optim_core-<uid>/numba_kernels`` when that folder is refused; None when
    none is a folder only this user can write (see the module's docstring), in which
    case kernels are compiled in memory.
    """
    if not hasattr(os, "getuid"):  # pragma: no cover - Windows: no owner to check
        return None
    return _find_directory()[0]


# --------------------------------------------------------------------------- modules
def _write_module(folder: Path, module_name: str, source: bytes) -> Path:
    """``folder/<module_name>.py`` holding ``source``, written (atomically) only if it
    differs: an unchanged file keeps its timestamp."""
    path = folder / f"{module_name}.py"
    try:
        fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        current = None
    else:
        with os.fdopen(fd, "rb") as f:
            current = f.read(len(source) + 1) if stat.S_ISREG(os.fstat(fd).st_mode) else None
    if current == source:
        return path
    # Unique per process *and* thread: two threads writing one kernel never share a file.
    temp = folder / (f".{module_name}.{os.getpid()}.{threading.get_ident()}."
                     f"{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(source)
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
    return path


def import_kernel_module(module_name: str, source: str, dispatchers: tuple[str, ...]
                         ) -> types.ModuleType:
    """Execute the generated ``source`` as module ``module_name``; give the numba
    functions named ``dispatchers`` a disk cache in a trusted folder when there is one.

    The code run is always ``source`` itself, compiled from memory; the file on disk is
    only what numba's cache entries are keyed to. ``source`` must declare its functions
    with ``cache=False``: the cache, when any, is attached here, in the checked folder only.
    """
    folder, refused = _find_directory() if hasattr(os, "getuid") else (None, [])
    if refused:
        _warn_once(f"refused {'; '.join(refused)}; "
                   + (f"using {folder}" if folder else "kernels compile in memory"))
    filename = None
    if folder is not None:
        try:
            filename = str(_write_module(folder, module_name, source.encode()))
        except OSError as exc:
            _warn_once(f"could not write kernel module {module_name} into {folder} ({exc}); "
                       "it compiles in memory")
    if filename is None:
        filename = f"<optim_core kernel {module_name}>"
        # For tracebacks and inspect.getsource; nothing is read from a file.
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    module = types.ModuleType(module_name)
    module.__file__ = filename
    sys.modules[module_name] = module  # numba's cached code finds its globals by name
    exec(compile(source, filename, "exec"), module.__dict__)  # noqa: S102 - our generated code
    if not filename.startswith("<"):
        stamp = hashlib.sha256(source.encode()).hexdigest()
        try:
            cache_class = _guarded_cache_class()
            for name in dispatchers:
                dispatcher = getattr(module, name)
                dispatcher._cache = cache_class(dispatcher.py_func, os.path.join(
                    os.path.dirname(filename), _PYCACHE), stamp)
        except Exception as exc:  # noqa: BLE001 - a numba without these internals
            _warn_once(f"numba's disk cache could not be attached ({type(exc).__name__}: "
                       f"{exc}); kernels compile in memory")
            from numba.core.caching import NullCache

            for name in dispatchers:
                getattr(module, name)._cache = NullCache()
    return module


@functools.cache
def _guarded_cache_class() -> type:
    """numba's per-function disk cache, in our checked folder only, that never raises."""
    from numba.core.caching import CompileResultCacheImpl, FunctionCache, _CacheLocator

    class Locator(_CacheLocator):
        """The one checked folder; numba's own list (``NUMBA_CACHE_DIR``, a user-wide
        folder, ...) would pick folders nobody checked."""

        def __init__(self, py_func: Any, cache_path: str, stamp: str) -> None:
            self._lineno = py_func.__code__.co_firstlineno
            self._cache_path = cache_path
            self._stamp = stamp

        def ensure_cache_path(self) -> None:
            # Before every save: the folder must still be ours alone.
            _private_folder(os.path.dirname(self._cache_path), (_PYCACHE,))

        def get_cache_path(self) -> str:
            return self._cache_path

        def get_source_stamp(self) -> str:
            return self._stamp  # the text actually compiled, not whatever the file holds

        def get_disambiguator(self) -> str:
            return str(self._lineno)

    class Impl(CompileResultCacheImpl):
        def __init__(self, py_func: Any, cache_path: str, stamp: str) -> None:
            # Not CacheImpl.__init__: it would search numba's locator list.
            self._lineno = py_func.__code__.co_firstlineno
            self._locator = Locator(py_func, cache_path, stamp)
            modname = os.path.splitext(os.path.basename(py_func.__code__.co_filename))[0]
            self._filename_base = self.get_filename_base(
                f"{modname}.{py_func.__qualname__}", getattr(sys, "abiflags", ""))

    class GuardedCache(FunctionCache):
        def __init__(self, py_func: Any, cache_path: str, stamp: str) -> None:
            self._impl_class = functools.partial(Impl, cache_path=cache_path, stamp=stamp)
            super().__init__(py_func)

        def load_overload(self, sig: Any, target_context: Any) -> Any:
            try:
                return super().load_overload(sig, target_context)
            except Exception as exc:  # noqa: BLE001 - corrupt or unreadable: compile instead
                _warn_once(f"could not read numba's kernel cache in {self._cache_path} "
                           f"({type(exc).__name__}: {exc}); compiling instead")
                return None

        def save_overload(self, sig: Any, data: Any) -> None:
            try:
                super().save_overload(sig, data)
                return
            except Exception as exc:  # noqa: BLE001
                first = exc
            try:  # a corrupted index: start it afresh, then save again
                self.flush()
                super().save_overload(sig, data)
            except Exception:  # noqa: BLE001 - disk full, read-only, folder gone...
                _warn_once(f"could not write numba's kernel cache in {self._cache_path} "
                           f"({type(first).__name__}: {first}); the kernel stays in memory")

    return GuardedCache
