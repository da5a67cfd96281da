"""The numba kernel cache: never read from a folder others can write, never fails a step.

numba unpickles its cache index when it loads a kernel, so a planted index runs code.
Here another local user is simulated (the tests may run as root): folders and links are
``chown``ed to another uid or made group/other-writable, and each planted index holds a
pickle that creates a marker file when unpickled. I/O faults (disk full, read-only file
system, no temporary directory, corrupted files, threads racing on a cold cache) are
injected; every step must still run, with the right numbers, warning once.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import pickle
import shutil
import sys
import tempfile
import threading
import time
import warnings

import numpy as np
import pytest
from optim_core.backends import _kernel_cache, _numba
from optim_core.backends._kernel_cache import KernelCacheWarning

import optim_core
from optim_core import backends

pytestmark = pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX owners and modes")

OTHER_UID = 12345  # "another local user"
LION = {"lr": 0.1, "weight_decay": 0.5}


class _Exploit:
    """Unpickling this creates ``marker``: the stand-in for an attacker's payload."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def cold(monkeypatch, tmp_path):
    """A process state with no kernel loaded yet and no warning shown; temp in tmp_path."""
    impl = backends._numba_implementation()[0]
    if impl is None:
        pytest.skip("numba is not importable")
    monkeypatch.setattr(impl, "compiled", {})
    monkeypatch.setattr(_numba, "_MODULES", {})
    monkeypatch.setattr(_kernel_cache, "_warned", False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    temp = tmp_path / "tmp"
    temp.mkdir(mode=0o700)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    before = {k: v for k, v in sys.modules.items() if k.startswith("optim_core_kernel_")}
    yield impl
    for name in [k for k in sys.modules if k.startswith("optim_core_kernel_")]:
        del sys.modules[name]
    sys.modules.update(before)


def restart(monkeypatch, impl):
    """What a new process sees: no kernel in memory (the disk cache stays)."""
    monkeypatch.setattr(impl, "compiled", {})
    monkeypatch.setattr(_numba, "_MODULES", {})
    monkeypatch.setattr(_kernel_cache, "_warned", False)


def fused_step(impl):
    """One fused Lion step on 64 float32 (the serial kernel), checked against the generic
    path; returns the serial kernel's dispatcher."""
    start = np.linspace(-1, 1, 64, dtype=np.float32)
    grads = [np.linspace(1, -1, 64, dtype=np.float32)]
    fused = optim_core.Lion([start.copy()], impl="fused", **LION)
    generic = optim_core.Lion([start.copy()], impl="generic", **LION)
    fused.step(grads)
    generic.step(grads)
    np.testing.assert_allclose(fused.params[0], generic.params[0], rtol=1e-6, atol=0)
    (kernels,) = impl.compiled.values()
    return kernels.serial


def cache_warnings(caught, text):
    """The KernelCacheWarnings among ``caught`` that mention ``text``: exactly one is shown."""
    found = [w for w in caught if issubclass(w.category, KernelCacheWarning)]
    assert len(found) <= 1, [str(w.message) for w in found]
    return [w for w in found if text in str(w.message)]


def tree(root):
    """Every file and folder below ``root`` with its size, mode and mtime."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            out[os.path.relpath(path, root)] = (st.st_size, st.st_mode, st.st_mtime_ns)
    return out


@pytest.fixture
def warm_cache(cold, tmp_path, monkeypatch):
    """A cache that the code under test filled for the Lion kernel (file names as it makes
    them), then a fresh process state."""
    scratch = tmp_path / "scratch"
    monkeypatch.setenv("OPTIM_CORE_CACHE_DIR", str(scratch))
    fused_step(cold)
    restart(monkeypatch, cold)
    folder = scratch / "numba_kernels"
    assert list(folder.glob("__pycache__/*.nbi")), "the scratch cache holds no index"
    return folder


def plant(source, root, marker):
    """A copy of the cache at ``source`` under ``root``, each index replaced by a payload."""
    target = root / "numba_kernels"
    shutil.copytree(source, target)
    indexes = list(target.glob("__pycache__/*.nbi"))
    for index in indexes:
        index.write_bytes(pickle.dumps(_Exploit(str(marker))))
    # The payload is live: loading an index the way numba does runs it.
    with open(indexes[0], "rb") as f:
        pickle.load(f)
    assert marker.exists()
    marker.unlink()
    return target


def chown_tree(root, uid):
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            os.lchown(os.path.join(folder, name), uid, -1)
    os.lchown(root, uid, -1)


# --------------------------------------------------------------------------- untrusted folders
def _other_owner(root, target):
    chown_tree(root, OTHER_UID)


def _world_writable_root(root, target):
    root.chmod(0o777)


def _group_writable_folder(root, target):
    target.chmod(0o775)


def _world_writable_pycache(root, target):
    (target / "__pycache__").chmod(0o777)


def _planted_symlink(root, target):
    # numba_kernels is another user's link to the prepared folder.
    real = root.parent / "elsewhere"
    target.rename(real)
    target.symlink_to(real)
    os.lchown(target, OTHER_UID, -1)


@pytest.mark.parametrize("make_untrusted", [
    _other_owner, _world_writable_root, _group_writable_folder, _world_writable_pycache,
    _planted_symlink])
def test_a_cache_folder_others_can_write_is_never_read(cold, warm_cache, tmp_path,
                                                       monkeypatch, make_untrusted):
    marker = tmp_path / "pwned"
    root = tmp_path / "planted"
    root.mkdir(mode=0o755)
    target = plant(warm_cache, root, marker)
    make_untrusted(root, target)
    before = tree(root)
    monkeypatch.setenv("OPTIM_CORE_CACHE_DIR", str(root))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused_step(cold)
    assert not marker.exists(), "a planted pickle was loaded"
    assert tree(root) == before, "something was written into the untrusted folder"
    assert cache_warnings(caught, "refused")


def test_a_prepared_folder_in_the_shared_temp_directory_is_never_read(cold, warm_cache,
                                                                       tmp_path, monkeypatch):
    """The reported attack: the home cache is unusable, so kernels would go to
    <tmp>/optim_core-<uid>, which another user created first and filled."""
    shared = tmp_path / "shared-tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    marker = tmp_path / "pwned"
    root = shared / f"optim_core-{os.getuid()}"
    root.mkdir(mode=0o755)
    plant(warm_cache, root, marker)
    chown_tree(root, OTHER_UID)
    before = tree(shared)
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.delenv("OPTIM_CORE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not-a-folder"))  # unusable home
    monkeypatch.setattr(tempfile, "tempdir", str(shared))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kernel = fused_step(cold)
    assert not marker.exists(), "a planted pickle was loaded"
    assert tree(shared) == before
    assert kernel.stats.cache_path is None  # compiled in memory
    assert cache_warnings(caught, "owned by uid 12345")


def test_a_private_folder_in_a_sticky_temp_directory_is_created_0700_and_used(cold, tmp_path,
                                                                             monkeypatch):
    shared = tmp_path / "shared-tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.delenv("OPTIM_CORE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not-a-folder"))
    monkeypatch.setattr(tempfile, "tempdir", str(shared))
    with pytest.warns(KernelCacheWarning, match="using"):
        kernel = fused_step(cold)
    root = shared / f"optim_core-{os.getuid()}"
    for folder in (root, root / "numba_kernels", root / "numba_kernels" / "__pycache__"):
        st = os.lstat(folder)
        assert st.st_uid == os.getuid() and st.st_mode & 0o777 == 0o700, folder
    assert kernel.stats.cache_path == str(root / "numba_kernels" / "__pycache__")
    restart(monkeypatch, cold)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KernelCacheWarning)
        assert sum(fused_step(cold).stats.cache_hits.values()) == 1  # loaded from disk


def test_the_home_cache_is_created_0700_and_a_later_process_loads_from_it(cold, tmp_path,
                                                                         monkeypatch):
    monkeypatch.delenv("OPTIM_CORE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home" / ".cache"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelCacheWarning)
        first = fused_step(cold)
        restart(monkeypatch, cold)
        second = fused_step(cold)
    assert sum(first.stats.cache_misses.values()) == 1
    assert sum(second.stats.cache_hits.values()) == 1
    for folder in ("home", "home/.cache", "home/.cache/optim_core",
                   "home/.cache/optim_core/numba_kernels"):
        assert os.lstat(tmp_path / folder).st_mode & 0o777 == 0o700, folder


def test_a_symlink_of_our_own_to_a_private_folder_is_followed(cold, tmp_path, monkeypatch):
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.setenv("OPTIM_CORE_CACHE_DIR", str(tmp_path / "link"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelCacheWarning)
        kernel = fused_step(cold)
    assert kernel.stats.cache_path == str(tmp_path / "real" / "numba_kernels" / "__pycache__")


# --------------------------------------------------------------------------- I/O faults
def _inject(monkeypatch, under, code, which):
    """Make writes below ``under`` fail with ``code`` ("all": folders and files; "modules":
    the generated .py files; "numba": numba's index and data files)."""
    under = str(under)

    def hit(path):
        path = os.fsdecode(os.fspath(path)) if not isinstance(path, int) else ""
        if not path.startswith(under):
            return False
        name = os.path.basename(path)
        if which == "modules":
            return name.startswith(("optim_core_kernel", ".optim_core_kernel"))
        if which == "numba":
            return ".nbi" in name or ".nbc" in name
        return True

    def fail(path):
        raise OSError(code, os.strerror(code), os.fspath(path))

    real_open, real_io_open, real_os_open, real_mkdir = builtins.open, io.open, os.open, os.mkdir

    def patched_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and hit(file):
            fail(file)
        return real_open(file, mode, *args, **kwargs)

    def patched_io_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and hit(file):
            fail(file)
        return real_io_open(file, mode, *args, **kwargs)

    def patched_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and hit(path):
            fail(path)
        return real_os_open(path, flags, *args, **kwargs)

    def patched_mkdir(path, *args, **kwargs):
        if which == "all" and hit(path):
            fail(path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", patched_open)
    monkeypatch.setattr(io, "open", patched_io_open)
    monkeypatch.setattr(os, "open", patched_os_open)
    monkeypatch.setattr(os, "mkdir", patched_mkdir)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS], ids=["disk-full", "read-only"])
@pytest.mark.parametrize("which", ["all", "modules", "numba"])
def test_a_cache_that_cannot_be_written_never_fails_a_step(cold, tmp_path, monkeypatch, code,
                                                           which):
    monkeypatch.setenv("OPTIM_CORE_CACHE_DIR", str(tmp_path / "cache"))
    if which != "all":  # the folders exist; only file writes fail
        (tmp_path / "cache" / "numba_kernels" / "__pycache__").mkdir(mode=0o700, parents=True)
    _inject(monkeypatch, tmp_path, code, which)  # the temporary directory too
    with pytest.warns(KernelCacheWarning, match=os.strerror(code)):
        fused_step(cold)
    monkeypatch.undo()
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name]
    assert not leftovers


def test_no_temporary_directory_at_all_never_fails_a_step(cold, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("OPTIM_CORE_CACHE_DIR", str(tmp_path / "file"))  # refused

    def no_temp_dir():
        raise FileNotFoundError(errno.ENOENT, "No usable temporary directory found")

    monkeypatch.setattr(tempfile, "gettempdir", no_temp_dir)
    with pytest.warns(KernelCacheWarning, match="compile in memory"):
        kernel = fused_step(cold)
    assert kernel.stats.cache_path is None


def _garbage_index(folder):
    for path in folder.glob("__pycache__/*.nbi"):
        path.write_bytes(b"this is not a pickle")


def _truncated_index(folder):
    for path in folder.glob("__pycache__/*.nbi"):
        path.write_bytes(path.read_bytes()[:40])


def _garbage_data(folder):
    for path in folder.glob("__pycache__/*.nbc"):
        path.write_bytes(os.urandom(64))


def _undecodable_module(folder):
    for path in folder.glob("*.py"):
        path.write_bytes(b"\xff\xfe\x00 not utf-8")


@pytest.mark.parametrize("corrupt", [_garbage_index, _truncated_index, _garbage_data,
                                     _undecodable_module])
def test_a_corrupted_cache_never_fails_a_step_and_is_repaired(cold, warm_cache, monkeypatch,
                                                              corrupt):
    monkeypatch.setenv("OPTIM_CORE_CACHE_DIR", str(warm_cache.parent))
    corrupt(warm_cache)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KernelCacheWarning)
        fused_step(cold)  # compiles afresh
        restart(monkeypatch, cold)
        kernel = fused_step(cold)
    assert sum(kernel.stats.cache_hits.values()) == 1  # the cache works again


def test_threads_compiling_one_kernel_on_a_cold_cache_all_step(cold, tmp_path, monkeypatch):
    """Eight threads start together on an empty cache; renames are slowed down (a loaded
    file system) so that the writes overlap."""
    monkeypatch.setenv("OPTIM_CORE_CACHE_DIR", str(tmp_path / "cache"))
    real_replace = os.replace

    def slow_replace(src, dst, *args, **kwargs):
        time.sleep(0.02)
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", slow_replace)
    threads = 8
    barrier = threading.Barrier(threads)
    errors, results = [], []

    def worker():
        try:
            barrier.wait()
            grads = [np.linspace(1, -1, 64, dtype=np.float32)]
            opt = optim_core.Lion([np.linspace(-1, 1, 64, dtype=np.float32)], impl="fused",
                                  **LION)
            opt.step(grads)
            results.append(opt.params[0].copy())
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelCacheWarning)
        pool = [threading.Thread(target=worker) for _ in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    assert not errors, errors
    assert len(results) == threads and all(np.array_equal(r, results[0]) for r in results)
    folder = tmp_path / "cache" / "numba_kernels"
    assert len(list(folder.glob("*.py"))) == 1
    assert not [p.name for p in folder.rglob("*") if ".tmp" in p.name]
