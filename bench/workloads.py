"""Benchmark workloads: the parameter tensor shapes an optimizer step updates.

Each workload is a list of named shapes. The two model workloads are written out
as data, tensor by tensor, in the order the reference implementations register
them (torchvision's ``resnet50`` and Hugging Face's ``GPT2Model``), so the
benchmark needs neither library nor any download.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Workload", "RESNET50", "GPT2_SMALL", "GPT2_SMALL_MATRICES", "GPT2_SMALL_BLOCK",
           "single", "many", "resolve", "WORKLOAD_NAMES", "quadratic_objective"]


@dataclass(frozen=True)
class Workload:
    """Named parameter shapes updated together by one optimizer step.

    Attributes
    ----------
    name : str
        Short name shown in the table ("1e7", "resnet50", ...).
    tensors : tuple of (str, tuple of int)
        Each parameter's name and shape.
    """

    name: str
    tensors: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [shape for _, shape in self.tensors]

    @property
    def n_tensors(self) -> int:
        return len(self.tensors)

    @property
    def numel(self) -> int:
        """Total number of parameter elements."""
        return sum(math.prod(shape) for shape in self.shapes)


#: torchvision ResNet-50: 161 parameter tensors (53 convolutions, 53 batch norms with
#: weight and bias, the classifier's weight and bias), 25,557,032 parameters.
_RESNET50_TENSORS: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("conv1.weight", (64, 3, 7, 7)),
    ("bn1.weight", (64,)),
    ("bn1.bias", (64,)),
    ("layer1.0.conv1.weight", (64, 64, 1, 1)),
    ("layer1.0.bn1.weight", (64,)),
    ("layer1.0.bn1.bias", (64,)),
    ("layer1.0.conv2.weight", (64, 64, 3, 3)),
    ("layer1.0.bn2.weight", (64,)),
    ("layer1.0.bn2.bias", (64,)),
    ("layer1.0.conv3.weight", (256, 64, 1, 1)),
    ("layer1.0.bn3.weight", (256,)),
    ("layer1.0.bn3.bias", (256,)),
    ("layer1.0.downsample.0.weight", (256, 64, 1, 1)),
    ("layer1.0.downsample.1.weight", (256,)),
    ("layer1.0.downsample.1.bias", (256,)),
    ("layer1.1.conv1.weight", (64, 256, 1, 1)),
    ("layer1.1.bn1.weight", (64,)),
    ("layer1.1.bn1.bias", (64,)),
    ("layer1.1.conv2.weight", (64, 64, 3, 3)),
    ("layer1.1.bn2.weight", (64,)),
    ("layer1.1.bn2.bias", (64,)),
    ("layer1.1.conv3.weight", (256, 64, 1, 1)),
    ("layer1.1.bn3.weight", (256,)),
    ("layer1.1.bn3.bias", (256,)),
    ("layer1.2.conv1.weight", (64, 256, 1, 1)),
    ("layer1.2.bn1.weight", (64,)),
    ("layer1.2.bn1.bias", (64,)),
    ("layer1.2.conv2.weight", (64, 64, 3, 3)),
    ("layer1.2.bn2.weight", (64,)),
    ("layer1.2.bn2.bias", (64,)),
    ("layer1.2.conv3.weight", (256, 64, 1, 1)),
    ("layer1.2.bn3.weight", (256,)),
    ("layer1.2.bn3.bias", (256,)),
    ("layer2.0.conv1.weight", (128, 256, 1, 1)),
    ("layer2.0.bn1.weight", (128,)),
    ("layer2.0.bn1.bias", (128,)),
    ("layer2.0.conv2.weight", (128, 128, 3, 3)),
    ("layer2.0.bn2.weight", (128,)),
    ("layer2.0.bn2.bias", (128,)),
    ("layer2.0.conv3.weight", (512, 128, 1, 1)),
    ("layer2.0.bn3.weight", (512,)),
    ("layer2.0.bn3.bias", (512,)),
    ("layer2.0.downsample.0.weight", (512, 256, 1, 1)),
    ("layer2.0.downsample.1.weight", (512,)),
    ("layer2.0.downsample.1.bias", (512,)),
    ("layer2.1.conv1.weight", (128, 512, 1, 1)),
    ("layer2.1.bn1.weight", (128,)),
    ("layer2.1.bn1.bias", (128,)),
    ("layer2.1.conv2.weight", (128, 128, 3, 3)),
    ("layer2.1.bn2.weight", (128,)),
    ("layer2.1.bn2.bias", (128,)),
    ("layer2.1.conv3.weight", (512, 128, 1, 1)),
    ("layer2.1.bn3.weight", (512,)),
    ("layer2.1.bn3.bias", (512,)),
    ("layer2.2.conv1.weight", (128, 512, 1, 1)),
    ("layer2.2.bn1.weight", (128,)),
    ("layer2.2.bn1.bias", (128,)),
    ("layer2.2.conv2.weight", (128, 128, 3, 3)),
    ("layer2.2.bn2.weight", (128,)),
    ("layer2.2.bn2.bias", (128,)),
    ("layer2.2.conv3.weight", (512, 128, 1, 1)),
    ("layer2.2.bn3.weight", (512,)),
    ("layer2.2.bn3.bias", (512,)),
    ("layer2.3.conv1.weight", (128, 512, 1, 1)),
    ("layer2.3.bn1.weight", (128,)),
    ("layer2.3.bn1.bias", (128,)),
    ("layer2.3.conv2.weight", (128, 128, 3, 3)),
    ("layer2.3.bn2.weight", (128,)),
    ("layer2.3.bn2.bias", (128,)),
    ("layer2.3.conv3.weight", (512, 128, 1, 1)),
    ("layer2.3.bn3.weight", (512,)),
    ("layer2.3.bn3.bias", (512,)),
    ("layer3.0.conv1.weight", (256, 512, 1, 1)),
    ("layer3.0.bn1.weight", (256,)),
    ("layer3.0.bn1.bias", (256,)),
    ("layer3.0.conv2.weight", (256, 256, 3, 3)),
    ("layer3.0.bn2.weight", (256,)),
    ("layer3.0.bn2.bias", (256,)),
    ("layer3.0.conv3.weight", (1024, 256, 1, 1)),
    ("layer3.0.bn3.weight", (1024,)),
    ("layer3.0.bn3.bias", (1024,)),
    ("layer3.0.downsample.0.weight", (1024, 512, 1, 1)),
    ("layer3.0.downsample.1.weight", (1024,)),
    ("layer3.0.downsample.1.bias", (1024,)),
    ("layer3.1.conv1.weight", (256, 1024, 1, 1)),
    ("layer3.1.bn1.weight", (256,)),
    ("layer3.1.bn1.bias", (256,)),
    ("layer3.1.conv2.weight", (256, 256, 3, 3)),
    ("layer3.1.bn2.weight", (256,)),
    ("layer3.1.bn2.bias", (256,)),
    ("layer3.1.conv3.weight", (1024, 256, 1, 1)),
    ("layer3.1.bn3.weight", (1024,)),
    ("layer3.1.bn3.bias", (1024,)),
    ("layer3.2.conv1.weight", (256, 1024, 1, 1)),
    ("layer3.2.bn1.weight", (256,)),
    ("layer3.2.bn1.bias", (256,)),
    ("layer3.2.conv2.weight", (256, 256, 3, 3)),
    ("layer3.2.bn2.weight", (256,)),
    ("layer3.2.bn2.bias", (256,)),
    ("layer3.2.conv3.weight", (1024, 256, 1, 1)),
    ("layer3.2.bn3.weight", (1024,)),
    ("layer3.2.bn3.bias", (1024,)),
    ("layer3.3.conv1.weight", (256, 1024, 1, 1)),
    ("layer3.3.bn1.weight", (256,)),
    ("layer3.3.bn1.bias", (256,)),
    ("layer3.3.conv2.weight", (256, 256, 3, 3)),
    ("layer3.3.bn2.weight", (256,)),
    ("layer3.3.bn2.bias", (256,)),
    ("layer3.3.conv3.weight", (1024, 256, 1, 1)),
    ("layer3.3.bn3.weight", (1024,)),
    ("layer3.3.bn3.bias", (1024,)),
    ("layer3.4.conv1.weight", (256, 1024, 1, 1)),
    ("layer3.4.bn1.weight", (256,)),
    ("layer3.4.bn1.bias", (256,)),
    ("layer3.4.conv2.weight", (256, 256, 3, 3)),
    ("layer3.4.bn2.weight", (256,)),
    ("layer3.4.bn2.bias", (256,)),
    ("layer3.4.conv3.weight", (1024, 256, 1, 1)),
    ("layer3.4.bn3.weight", (1024,)),
    ("layer3.4.bn3.bias", (1024,)),
    ("layer3.5.conv1.weight", (256, 1024, 1, 1)),
    ("layer3.5.bn1.weight", (256,)),
    ("layer3.5.bn1.bias", (256,)),
    ("layer3.5.conv2.weight", (256, 256, 3, 3)),
    ("layer3.5.bn2.weight", (256,)),
    ("layer3.5.bn2.bias", (256,)),
    ("layer3.5.conv3.weight", (1024, 256, 1, 1)),
    ("layer3.5.bn3.weight", (1024,)),
    ("layer3.5.bn3.bias", (1024,)),
    ("layer4.0.conv1.weight", (512, 1024, 1, 1)),
    ("layer4.0.bn1.weight", (512,)),
    ("layer4.0.bn1.bias", (512,)),
    ("layer4.0.conv2.weight", (512, 512, 3, 3)),
    ("layer4.0.bn2.weight", (512,)),
    ("layer4.0.bn2.bias", (512,)),
    ("layer4.0.conv3.weight", (2048, 512, 1, 1)),
    ("layer4.0.bn3.weight", (2048,)),
    ("layer4.0.bn3.bias", (2048,)),
    ("layer4.0.downsample.0.weight", (2048, 1024, 1, 1)),
    ("layer4.0.downsample.1.weight", (2048,)),
    ("layer4.0.downsample.1.bias", (2048,)),
    ("layer4.1.conv1.weight", (512, 2048, 1, 1)),
    ("layer4.1.bn1.weight", (512,)),
    ("layer4.1.bn1.bias", (512,)),
    ("layer4.1.conv2.weight", (512, 512, 3, 3)),
    ("layer4.1.bn2.weight", (512,)),
    ("layer4.1.bn2.bias", (512,)),
    ("layer4.1.conv3.weight", (2048, 512, 1, 1)),
    ("layer4.1.bn3.weight", (2048,)),
    ("layer4.1.bn3.bias", (2048,)),
    ("layer4.2.conv1.weight", (512, 2048, 1, 1)),
    ("layer4.2.bn1.weight", (512,)),
    ("layer4.2.bn1.bias", (512,)),
    ("layer4.2.conv2.weight", (512, 512, 3, 3)),
    ("layer4.2.bn2.weight", (512,)),
    ("layer4.2.bn2.bias", (512,)),
    ("layer4.2.conv3.weight", (2048, 512, 1, 1)),
    ("layer4.2.bn3.weight", (2048,)),
    ("layer4.2.bn3.bias", (2048,)),
    ("fc.weight", (1000, 2048)),
    ("fc.bias", (1000,)),
)

#: One GPT-2 transformer block (Hugging Face ``GPT2Block``, n_embd 768); Conv1D
#: weights are stored (in_features, out_features).
_GPT2_BLOCK: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("ln_1.weight", (768,)),
    ("ln_1.bias", (768,)),
    ("attn.c_attn.weight", (768, 2304)),
    ("attn.c_attn.bias", (2304,)),
    ("attn.c_proj.weight", (768, 768)),
    ("attn.c_proj.bias", (768,)),
    ("ln_2.weight", (768,)),
    ("ln_2.bias", (768,)),
    ("mlp.c_fc.weight", (768, 3072)),
    ("mlp.c_fc.bias", (3072,)),
    ("mlp.c_proj.weight", (3072, 768)),
    ("mlp.c_proj.bias", (768,)),
)
_GPT2_LAYERS = 12

#: GPT-2 small (124M): token and position embeddings, 12 blocks, final layer norm;
#: 148 tensors, 124,439,808 parameters (the tied LM head adds none).
_GPT2_SMALL_TENSORS: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("wte.weight", (50257, 768)),
    ("wpe.weight", (1024, 768)),
    *((f"h.{layer}.{name}", shape) for layer in range(_GPT2_LAYERS) for name, shape in _GPT2_BLOCK),
    ("ln_f.weight", (768,)),
    ("ln_f.bias", (768,)),
)

RESNET50 = Workload("resnet50", _RESNET50_TENSORS)
GPT2_SMALL = Workload("gpt2-small", _GPT2_SMALL_TENSORS)
#: GPT-2 small's hidden matrices, what Muon optimizes in practice (the embeddings, biases
#: and layer norms go to AdamW): per block the attention's c_attn (768, 2304) and c_proj
#: (768, 768), the MLP's c_fc (768, 3072) and c_proj (3072, 768); 48 tensors, 84,934,656
#: parameters.
GPT2_SMALL_MATRICES = Workload("gpt2-small-matrices", tuple(
    (name, shape) for name, shape in _GPT2_SMALL_TENSORS
    if len(shape) == 2 and name.startswith("h.")))
#: One block's four of them (a twelfth of the step), for a quick Muon measurement.
GPT2_SMALL_BLOCK = Workload("gpt2-small-block", GPT2_SMALL_MATRICES.tensors[:4])


def single(numel: int) -> Workload:
    """One flat tensor of ``numel`` elements, named by its size ("1e7")."""
    if numel < 1:
        raise ValueError(f"a tensor needs at least one element, got {numel}")
    return Workload(_size_name(numel), (("p", (numel,)),))


def many(count: int, numel: int) -> Workload:
    """``count`` tensors of ``numel`` elements each, named "COUNTxNUMEL"."""
    if count < 1 or numel < 1:
        raise ValueError(f"need count >= 1 and numel >= 1, got {count} x {numel}")
    return Workload(f"{count}x{numel}", tuple((f"p{i}", (numel,)) for i in range(count)))


#: Workload names :func:`resolve` accepts besides "single" and "COUNTxNUMEL".
WORKLOAD_NAMES = ("single", "resnet50", "gpt2-small", "gpt2-small-matrices", "gpt2-small-block",
                  "1000x1000")


def resolve(name: str, sizes: list[int]) -> list[Workload]:
    """The workloads a command-line name stands for.

    "single" gives one tensor per entry of ``sizes``; "resnet50" and "gpt2-small"
    the model shapes; "COUNTxNUMEL" (e.g. "1000x1000") that many equal tensors.
    """
    if name == "single":
        return [single(n) for n in sizes]
    if name == RESNET50.name:
        return [RESNET50]
    if name == GPT2_SMALL.name:
        return [GPT2_SMALL]
    for workload in (GPT2_SMALL_MATRICES, GPT2_SMALL_BLOCK):
        if name == workload.name:
            return [workload]
    match = re.fullmatch(r"(\d+)x(\d+)", name)
    if match:
        return [many(int(match[1]), int(match[2]))]
    raise ValueError(f"unknown workload {name!r}; expected one of {WORKLOAD_NAMES} "
                     "or COUNTxNUMEL")


def parse_size(text: str) -> int:
    """An element count written as "1e7", "10000000" or "1_000_000"."""
    value = float(text.replace("_", ""))
    if not value.is_integer() or value < 1:
        raise ValueError(f"size must be a positive integer, got {text!r}")
    return int(value)


def _size_name(numel: int) -> str:
    exponent = round(math.log10(numel))
    return f"1e{exponent}" if 10**exponent == numel else str(numel)


def quadratic_objective(xp: Any, params: Sequence[Any], grads: Sequence[Any]
                        ) -> Callable[[Sequence[Any]], tuple[Any, list[Any]]]:
    """What the L-BFGS rows minimize: a diagonal quadratic over a workload's tensors,

    ``f(p) = sum_i 0.5 * c_i (p_i - t_i)^2`` with targets ``t`` the workload's gradients and
    curvatures ``c = 1 + 100 |t|`` (about 1 to 5: L-BFGS has work to do). Returns
    ``objective(params) -> (loss, grads)`` in namespace ``xp`` (NumPy, CuPy or torch), two
    temporaries and one dot product per tensor, the loss left on the device.
    """
    targets = list(grads)
    curvatures = [1 + 100 * xp.abs(t) for t in targets]

    def objective(current: Sequence[Any]) -> tuple[Any, list[Any]]:
        loss, out = 0.0, []
        for param, target, curvature in zip(current, targets, curvatures, strict=True):
            delta = param - target
            grad = curvature * delta
            loss = loss + xp.sum(grad * delta)
            out.append(grad)
        return 0.5 * loss, out

    return objective
