"""The benchmark suite (bench/): workload shapes, byte counts, and a smoke run of the CLI.

Nothing here asserts a speed; speed is what ``python -m bench`` reports.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench(monkeypatch):
    """The bench package of this checkout (it is not installed)."""
    monkeypatch.syspath_prepend(str(ROOT))
    import bench.floor
    import bench.workloads

    return bench


def _numel(shapes) -> int:
    return sum(math.prod(shape) for shape in shapes)


def test_resnet50_has_161_tensors_and_25_557_032_parameters(bench):
    resnet = bench.workloads.RESNET50
    assert resnet.n_tensors == 161
    assert resnet.numel == _numel(resnet.shapes) == 25_557_032


def test_resnet50_is_53_convolutions_53_batch_norms_and_the_classifier(bench):
    tensors = dict(bench.workloads.RESNET50.tensors)
    assert len(tensors) == 161, "tensor names must be unique"
    convolutions = [s for s in tensors.values() if len(s) == 4]
    norms = [n for n in tensors if n.startswith("bn") or ".bn" in n or "downsample.1" in n]
    assert len(convolutions) == 53
    assert len(norms) == 2 * 53
    assert tensors["conv1.weight"] == (64, 3, 7, 7)
    assert tensors["layer4.2.conv3.weight"] == (2048, 512, 1, 1)
    assert tensors["fc.weight"] == (1000, 2048) and tensors["fc.bias"] == (1000,)


def test_gpt2_small_has_148_tensors_and_124_439_808_parameters(bench):
    gpt2 = bench.workloads.GPT2_SMALL
    assert gpt2.n_tensors == 148
    assert gpt2.numel == 124_439_808
    tensors = dict(gpt2.tensors)
    assert len(tensors) == 148, "tensor names must be unique"
    assert tensors["wte.weight"] == (50257, 768) and tensors["wpe.weight"] == (1024, 768)
    assert tensors["h.0.attn.c_attn.weight"] == (768, 2304)
    assert tensors["h.11.mlp.c_fc.weight"] == (768, 3072)
    assert tensors["h.11.mlp.c_proj.weight"] == (3072, 768)
    assert tensors["ln_f.bias"] == (768,)
    assert sum(1 for n in tensors if n.startswith("h.")) == 12 * 12


def test_gpt2_small_matrices_are_its_48_hidden_matrices(bench):
    # What Muon optimizes: per block c_attn, attn.c_proj, c_fc, mlp.c_proj (no embeddings).
    matrices = bench.workloads.GPT2_SMALL_MATRICES
    assert matrices.n_tensors == 48 and matrices.numel == 84_934_656
    assert all(len(s) == 2 for s in matrices.shapes)
    assert not any(n.startswith(("wte", "wpe")) for n, _ in matrices.tensors)
    (block,) = bench.workloads.resolve("gpt2-small-block", [])
    assert block.shapes == [(768, 2304), (768, 768), (768, 3072), (3072, 768)]
    assert bench.workloads.resolve("gpt2-small-matrices", []) == [matrices]


def test_many_small_and_single_workloads(bench):
    w = bench.workloads
    (many,) = w.resolve("1000x1000", [])
    assert (many.name, many.n_tensors, many.numel) == ("1000x1000", 1000, 1_000_000)
    singles = w.resolve("single", [w.parse_size("1e5"), w.parse_size("10000000"), 12345])
    assert [s.name for s in singles] == ["1e5", "1e7", "12345"]
    assert [s.numel for s in singles] == [10**5, 10**7, 12345]
    for bad in ("resnet", "10x", "x10"):
        with pytest.raises(ValueError, match="unknown workload"):
            w.resolve(bad, [10])
    with pytest.raises(ValueError):
        w.parse_size("1.5")


@pytest.mark.parametrize(("optimizer", "per_element"), [
    ("adam", 28), ("adamw", 28), ("sgd-momentum", 20), ("adagrad", 20), ("rmsprop", 20),
    ("lion", 20), ("schedulefree-sgd", 20), ("schedulefree-adamw", 28)])
def test_bytes_moved_counts_each_array_read_and_written_once(bench, optimizer, per_element):
    assert bench.floor.bytes_moved(optimizer, 1000, 4) == per_element * 1000
    assert bench.floor.bytes_moved(optimizer, 1000, 8) == 2 * per_element * 1000


def _run_bench(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_quick_run_writes_json_and_a_table(tmp_path):
    out = tmp_path / "quick.json"
    done = _run_bench("--quick", "--optimizers", "adam,lion", "--workloads", "single,3x100",
                      "--sizes", "1e3", "--impls", "ours-generic,naive-numpy,torch-fused",
                      "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report) == {"schema_version", "meta", "floor", "results", "targets"}
    assert report["meta"]["device"] == "cpu"
    assert report["floor"]["best"]["GBps"] > 0
    results = report["results"]
    cells = {(r["optimizer"], r["workload"], r["impl"]) for r in results}
    assert cells == {(o, w, i) for o in ("adam", "lion") for w in ("1e3", "3x100")
                     for i in ("ours-generic", "naive-numpy", "torch-fused")}
    floor_bps = report["floor"]["best"]["GBps"] * 1e9
    for r in results:
        assert r["status"] in ("ok", "n/a"), r
        per_element = 28 if r["optimizer"] == "adam" else 20
        assert r["bytes"] == per_element * r["numel"]
        if r["status"] == "n/a":
            assert r["reason"] and r["median_s"] is None
            continue
        assert r["repeats"] == len(r["times_s"]) >= 1 and r["median_s"] > 0
        assert min(r["times_s"]) <= r["median_s"] <= max(r["times_s"])
        assert r["GBps"] == pytest.approx(r["bytes"] / r["median_s"] / 1e9)
        assert r["fraction_of_floor"] == pytest.approx(r["bytes"] / floor_bps / r["median_s"])
    by_cell = {(r["optimizer"], r["workload"], r["impl"]): r for r in results}
    assert by_cell["lion", "1e3", "torch-fused"]["status"] == "n/a"
    assert "no Lion" in by_cell["lion", "1e3", "torch-fused"]["reason"]
    for r in results:
        assert (r["ratio_vs_torch_fused"] is None) == (
            by_cell[r["optimizer"], r["workload"], "torch-fused"]["status"] != "ok"
            or r["status"] != "ok")
    # The CPU targets are listed; this run measured none of their cells, so none is judged.
    assert [(t["workload"], t["holds"]) for t in report["targets"]] == [
        ("1e7", None), ("resnet50", None), ("1e7", None), ("1000x1000", None),
        ("10000x100", None), ("gpt2-small-matrices", None), ("1e7", None), ("resnet50", None),
        ("gpt2-small-block", None)]
    table = out.with_suffix(".md").read_text()
    assert "| optimizer | workload |" in table and "naive-numpy" in table
    assert table.strip() in done.stdout


def test_unknown_names_are_rejected_before_anything_runs(tmp_path):
    done = _run_bench("--optimizers", "adam,sgd", "--out", str(tmp_path / "x.json"))
    assert done.returncode == 2
    assert "unknown optimizers ['sgd']" in done.stderr
    assert not (tmp_path / "x.json").exists()


def test_gpu_check_script_parses():
    done = subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_check.sh")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("optimizer, impls", [
    ("schedulefree-sgd", ("ours-fused", "ours-flat", "torch-forloop", "torch-foreach")),
    ("schedulefree-adamw", ("ours-generic", "torch-foreach")),
    ("lbfgs", ("ours-generic", "torch-forloop")),
])
def test_schedule_free_and_lbfgs_rows_run_against_their_references(bench, optimizer, impls):
    import bench.impls

    pytest.importorskip("torch")
    if optimizer.startswith("schedulefree"):
        pytest.importorskip("schedulefree")
    data = bench.impls.WorkloadData(bench.workloads.many(3, 50), "float32")
    for impl in impls:
        runner = bench.impls.build(impl, optimizer, data, "cpu")
        runner.step()
        runner.step()
    with pytest.raises(bench.impls.NotAvailable):
        bench.impls.build("naive-numpy", optimizer, data, "cpu")


def test_jax_jit_bench_times_ours_and_optax_side_by_side(bench, tmp_path, capsys):
    pytest.importorskip("optax")
    import bench.jax_jit

    out = tmp_path / "jax_jit.json"
    assert bench.jax_jit.main(["--optimizers", "adam", "--workloads", "1e3", "--rounds", "1",
                               "--steps", "1", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["optimizer"], row["workload"], row["n_tensors"]) == ("adam", "1e3", 1)
    # Timings are recorded, never judged here (no test asserts a clock reading).
    assert {"ours_s", "optax_s", "ratio", "times_s"} <= set(row)
    assert [len(row["times_s"][k]) for k in ("ours", "optax")] == [1, 1]
    assert "| adam" in capsys.readouterr().out


def test_the_floor_kernel_and_a_step_are_timed_in_alternation(bench):
    from bench import floor, report, timing

    calls = []

    class CountingClock(timing.WallClock):
        def time_each(self, fn, repeats):
            calls.append(fn)
            return super().time_each(fn, repeats)

    def step():
        pass

    paired = floor.measure_paired(step, CountingClock(), numel=10_000, rounds=5)
    # One call of each per round, the floor kernel first: both see the same conditions.
    assert len(calls) == 10 and calls[1::2] == [step] * 5 and step not in calls[0::2]
    assert paired["rounds"] == 5 and paired["floor_median_s"] > 0
    assert paired["bytes_per_s"] == pytest.approx(7 * 4 * 10_000 / paired["floor_median_s"])
    row = {"optimizer": "adam", "workload": "1e7", "impl": "ours-fused", "bytes": 28 * 10_000,
           "paired_floor_GBps": paired["bytes_per_s"] / 1e9, "paired_rounds": 5,
           "paired_step_median_s": paired["floor_median_s"] * 2,
           "fraction_of_floor_paired": 0.5}
    assert "0.500" in report.format_paired([row])
    assert report.format_paired([{"optimizer": "adam"}]) == ""


def test_under_load_bench_alternates_and_stops_its_busy_processes(bench, tmp_path):
    import multiprocessing

    import bench.under_load

    order = []
    times = bench.under_load.measure({"default": lambda: order.append("d"),
                                      "serial": lambda: order.append("s")}, 2, 3)
    assert order == list("dddsssdddsss")
    assert [len(times[k]) for k in ("default", "serial")] == [6, 6]
    out = tmp_path / "under_load.json"
    assert bench.under_load.main(["--rounds", "2", "--per-round", "2", "--busy", "1",
                                  "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["phase"], r["steps"]) for r in rows] == [("quiet", 4), ("busy", 4)]
    # Recorded, never judged here (no test asserts a clock reading).
    assert {"median_ratio", "mean_ratio_first_300", "mean_ratio"} <= set(rows[1])
    assert "| busy | 4 |" in out.with_suffix(".md").read_text()
    assert multiprocessing.active_children() == []
