"""Crash safety of save_checkpoint: a writer killed with SIGKILL at random moments.

A writer process saves checkpoints to one path in a loop, each a distinguishable,
self-consistent version (a counter, an array filled with it, and its parity tag). It
is killed at a random moment, then the checkpoint is loaded: it must be one whole
version, never older than the last one seen, and never a mix or a broken file.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import sys
import time

import numpy as np
import pytest

from optim_core import checkpoint, load_checkpoint, save_checkpoint

TRIALS = 100
SIZE = 1 << 17  # 1 MiB of float64 per version: a save takes long enough to be cut mid-write

# Run in the child with exec(): a test module cannot be pickled by reference under
# pytest's importlib mode, the builtin exec can.
WRITER = """
import os
import time

import numpy as np
from optim_core import save_checkpoint

if pin == "mid-save":  # stop inside the first save, its temporary file written and fsynced
    real_fsync = os.fsync

    def fsync_then_wait(fd):
        real_fsync(fd)
        conn.send("mid-save")
        time.sleep(600)

    os.fsync = fsync_then_wait
conn.send("ready")
k = start
while True:
    k += 1
    save_checkpoint(path, {"counter": k, "w": np.full(size, float(k)), "tag": "AB"[k % 2]})
    if pin == "after-save":
        conn.send("saved")
"""
#: Kills at a moment the writer reports (not a moment guessed by a delay), so both kinds of
#: kill happen however loaded the machine is.
PINNED = ["mid-save"] * 5 + ["after-save"] * 5

pytestmark = pytest.mark.skipif(sys.platform == "win32" or not hasattr(signal, "SIGKILL"),
                                reason="needs fork and SIGKILL (POSIX)")


def version(k: int) -> dict:
    return {"counter": k, "w": np.full(SIZE, float(k)), "tag": "AB"[k % 2]}


def assert_whole_version(tree: dict) -> int:
    k = tree["counter"]
    assert set(tree) == {"counter", "w", "tag"}
    assert tree["tag"] == "AB"[k % 2]
    assert tree["w"].dtype == np.float64 and tree["w"].shape == (SIZE,)
    assert np.all(tree["w"] == k)
    return k


def test_writer_killed_at_random_moments_always_leaves_a_whole_checkpoint(tmp_path):
    context = multiprocessing.get_context("forkserver")
    # Children fork from a server that already imported optim_core: each starts in
    # milliseconds (a no-op if the server is already running).
    context.set_forkserver_preload(["numpy", "optim_core"])
    path = str(tmp_path / "run.ckpt")
    started = time.perf_counter()
    save_checkpoint(path, version(0))
    # Kill delays scale with how long a save takes here (disk, load): some kills land
    # inside the first save, others after several saves have completed.
    save_seconds = time.perf_counter() - started
    rng = random.Random(20240601)
    last = 0
    outcomes = {"advanced": 0, "unchanged": 0, "temp_left": 0}
    pinned = {"mid-save": {"temp_left": 0}, "after-save": {"advanced": 0}}
    trials = [None] * TRIALS + PINNED
    rng.shuffle(trials)
    for pin in trials:
        receiver, sender = context.Pipe(duplex=False)
        writer = context.Process(target=exec, args=(WRITER, {
            "path": path, "start": last, "size": SIZE, "conn": sender, "pin": pin}),
            daemon=True)
        writer.start()
        sender.close()
        assert receiver.poll(60), "the writer never started"
        receiver.recv()
        if pin is None:
            # Cut anywhere from the first write to several saves later.
            delay = rng.choice([0.0, rng.uniform(0, save_seconds),
                                rng.uniform(0, 5 * save_seconds)])
            if delay:
                time.sleep(delay)
        else:
            assert receiver.poll(60), f"the writer never reported {pin}"
            receiver.recv()
        os.kill(writer.pid, signal.SIGKILL)
        writer.join(30)
        assert writer.exitcode == -signal.SIGKILL
        receiver.close()

        temps = [name for name in os.listdir(tmp_path) if name != "run.ckpt"]
        assert all(name.startswith(".run.ckpt.") and name.endswith(".tmp") for name in temps)
        k = assert_whole_version(load_checkpoint(path))
        assert k >= last, "a checkpoint older than one already seen came back"
        if pin is None:
            outcomes["advanced" if k > last else "unchanged"] += 1
            outcomes["temp_left"] += bool(temps)
        elif pin == "mid-save":
            pinned[pin]["temp_left"] += bool(temps) and k == last
        else:
            pinned[pin]["advanced"] += k > last
        last = k
        for name in temps:  # the documented cleanup: stale temporaries may be deleted
            os.unlink(tmp_path / name)

    print(f"\n{TRIALS} SIGKILL trials at random moments: {outcomes}; pinned: {pinned}; "
          f"last version {last}; one save takes {save_seconds * 1e3:.1f} ms")
    # Both kinds of kill happened, whatever the timing: mid-save (a temporary was left, the
    # previous checkpoint stayed) and after a completed save (the checkpoint moved on).
    assert pinned == {"mid-save": {"temp_left": 5}, "after-save": {"advanced": 5}}


def test_a_save_failing_midway_keeps_the_old_checkpoint_and_removes_its_temp(tmp_path,
                                                                             monkeypatch):
    path = tmp_path / "run.ckpt"
    save_checkpoint(path, version(1))

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, version(2))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["run.ckpt"]
    assert assert_whole_version(load_checkpoint(path)) == 1


def test_a_leftover_partial_temp_file_does_not_disturb_loading_or_saving(tmp_path):
    path = tmp_path / "run.ckpt"
    save_checkpoint(path, version(1))
    data = path.read_bytes()
    (tmp_path / ".run.ckpt.deadbeef.tmp").write_bytes(data[: len(data) // 2])
    assert assert_whole_version(load_checkpoint(path)) == 1
    save_checkpoint(path, version(2))
    assert assert_whole_version(load_checkpoint(path)) == 2
    with pytest.raises(checkpoint.CheckpointError):
        load_checkpoint(tmp_path / ".run.ckpt.deadbeef.tmp")
