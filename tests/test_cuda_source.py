"""The generated CUDA source computes what the generic path computes, checked on the host.

Without a GPU, the very text that NVRTC compiles for the device is compiled by nvcc
into a host program: it applies each kernel's per-element function to the inputs
the generic path saw at every step of every optimizer and option set, and its
outputs are compared with the generic path's. Skipped where nvcc is absent.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
from fused_cases import (
    ELEMENTWISE_CASE_RULES,
    ELEMENTWISE_CASES,
    TOLERANCE,
    recorded_generic_steps,
)
from optim_core.backends._cuda import CUDA_TYPES, cuda_source, kernel_name
from optim_core.backends._lowering import lower


def record_trajectories() -> list[dict]:
    """Each tensor of every recorded generic step: its inputs and outputs."""
    return [{"rule": call["rule"], "scalars": call["scalars"], "case": call["case"],
             "param": param, "grad": grad, "states": states, "new_param": new_param,
             "new_states": new_states}
            for call in recorded_generic_steps(CUDA_TYPES, ELEMENTWISE_CASES)
            for param, grad, states, new_param, new_states in zip(
                call["params"], call["grads"], call["states"], call["new_params"],
                call["new_states"], strict=True)]


def harness_source(kernels: dict[tuple[str, str], tuple[int, object]]) -> str:
    """A host program: reads records (kernel id, n, arrays, hoisted), writes arrays back."""
    parts = ["#include <cstdio>", "#include <cstdlib>", "#include <vector>", ""]
    sources = {}
    for (name, _), (_, kernel) in kernels.items():
        sources.setdefault(name, cuda_source(kernel))
    parts += sources.values()
    parts += ["void run(long long id, long long n, char** a, const char* h) {",
              "    switch (id) {"]
    for (name, dtype), (index, kernel) in kernels.items():
        ctype = CUDA_TYPES[dtype]
        arrays = [f"({ctype}*)a[{i}]" for i in range(len(kernel.arrays))]
        hoisted = [f"((const {ctype}*)h)[{i}]" for i in range(kernel.n_hoisted)]
        args = ", ".join(["i", *arrays, *hoisted])
        parts.append(f"    case {index}: for (long long i = 0; i < n; ++i) "
                     f"{name}_element<{ctype}>({args}); break;")
    parts += [
        "    default: std::abort();", "    }", "}", "",
        "int main(int argc, char** argv) {",
        "    FILE* in = std::fopen(argv[1], \"rb\");",
        "    FILE* out = std::fopen(argv[2], \"wb\");",
        "    long long head[5];  // id, n, number of arrays, number of scalars, itemsize",
        "    while (std::fread(head, sizeof(long long), 5, in) == 5) {",
        "        std::vector<std::vector<char>> arrays(head[2]);",
        "        std::vector<char*> pointers(head[2]);",
        "        for (long long k = 0; k < head[2]; ++k) {",
        "            arrays[k].resize(head[1] * head[4] + 1);",
        "            if (std::fread(arrays[k].data(), head[4], head[1], in) != (size_t)head[1])",
        "                return 2;",
        "            pointers[k] = arrays[k].data();",
        "        }",
        "        std::vector<char> scalars(head[3] * head[4] + 1);",
        "        if (std::fread(scalars.data(), head[4], head[3], in) != (size_t)head[3])",
        "            return 3;",
        "        run(head[0], head[1], pointers.data(), scalars.data());",
        "        for (long long k = 0; k < head[2]; ++k)",
        "            std::fwrite(arrays[k].data(), head[4], head[1], out);",
        "    }",
        "    std::fclose(out);",
        "    return 0;",
        "}",
    ]
    return "\n".join(parts) + "\n"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_generated_cuda_arithmetic_matches_generic_on_the_host(tmp_path):
    records = record_trajectories()
    kernels: dict[tuple[str, str], tuple[int, object]] = {}
    inputs = bytearray()
    for record in records:
        dtype = record["param"].dtype
        present = frozenset(record["states"])
        _, hoisted, kernel = lower(record["rule"], record["scalars"], present)
        key = (kernel_name(kernel), dtype.name)
        if key not in kernels:
            kernels[key] = (len(kernels), kernel)
        record["kernel"] = kernel
        arrays = [record["param"], record["grad"],
                  *(record["states"][s] for s in kernel.arrays[2:])]
        n = record["param"].size
        inputs += np.array([kernels[key][0], n, len(arrays), len(hoisted), dtype.itemsize],
                           dtype=np.int64).tobytes()
        for array in arrays:
            inputs += np.ascontiguousarray(array, dtype=dtype).tobytes()
        inputs += np.asarray(hoisted, dtype=np.float64).astype(dtype).tobytes()
    source = tmp_path / "harness.cu"
    source.write_text(harness_source(kernels))
    # The device's options (no FMA contraction); the host compiler targets x86-64 SSE,
    # which rounds every float operation as the device does.
    subprocess.run(["nvcc", "--fmad=false", "-O2", "-std=c++14", "-o", str(tmp_path / "harness"),
                    str(source)], check=True, capture_output=True, timeout=600)
    (tmp_path / "in.bin").write_bytes(bytes(inputs))
    subprocess.run([str(tmp_path / "harness"), str(tmp_path / "in.bin"),
                    str(tmp_path / "out.bin")], check=True, timeout=120)
    output = memoryview((tmp_path / "out.bin").read_bytes())
    offset = 0
    rules_seen = set()
    for record in records:
        kernel, dtype, n = record["kernel"], record["param"].dtype, record["param"].size
        got = {}
        for name in kernel.arrays:
            got[name] = np.frombuffer(output[offset:offset + n * dtype.itemsize], dtype=dtype)
            offset += n * dtype.itemsize
        want = {"param": record["new_param"], **record["new_states"]}
        for name, value in want.items():
            np.testing.assert_allclose(got[name], value.reshape(-1), **TOLERANCE[dtype.name],
                                       err_msg=f"{record['case']} {name}")
        rules_seen.add(record["rule"].name)
    assert offset == len(output)
    # Steps that reduce each tensor: test_cuda_reductions.py.
    assert rules_seen == ELEMENTWISE_CASE_RULES
    print(f"{len(records)} records, {len(kernels)} kernel instantiations", file=sys.stderr)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_generated_kernels_compile_for_the_device(tmp_path):
    # One specialization of every rule (its first step, default options), the single- and
    # multi-tensor kernels and the table kernel, float and double: what NVRTC compiles on a
    # GPU machine, here compiled by nvcc.
    from optim_core.backends._cuda import COMPILE_OPTIONS

    parts = []
    for name, hyper in {name: hyper for name, hyper in reversed(ELEMENTWISE_CASES)}.items():
        for dtype, ctype in CUDA_TYPES.items():
            [call] = recorded_generic_steps([dtype], [(name, hyper)], steps=1)
            _, _, kernel = lower(call["rule"], call["scalars"], frozenset(call["states"][0]))
            source, kname = cuda_source(kernel), kernel_name(kernel)
            if source not in parts:
                parts.append(source)
            for variant in (kname, f"{kname}_vec"):
                signature = cuda_source(kernel).split(f"__global__ void {kname}(", 1)[1]
                signature = signature.split(")", 1)[0].replace("T*", f"{ctype}*").replace(
                    "T h", f"{ctype} h")
                line = f"template __global__ void {variant}<{ctype}>({signature});"
                if line not in parts:  # GD and SGD share kernels
                    parts.append(line)
            scalars = "".join(f", {ctype}" for _ in range(kernel.n_hoisted))
            for vectorized in ("false", "true"):
                line = (f"template __global__ void {kname}_multi<{ctype}, {vectorized}>("
                        f"const {kname}_batch, int{scalars});")
                if line not in parts:
                    parts.append(line)
            # The step plans' kernel: the device-resident table, the gradients' addresses.
            line = (f"template __global__ void {kname}_table<{ctype}>(const long long*, "
                    f"const long long*, int{scalars});")
            if line not in parts:
                parts.append(line)
    source = tmp_path / "kernels.cu"
    source.write_text("\n".join(parts) + "\n")
    result = subprocess.run(["nvcc", *COMPILE_OPTIONS, "-arch=sm_90", "-c", "-o",
                             str(tmp_path / "kernels.o"), str(source)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
