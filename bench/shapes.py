"""The one table of benchmark layers, used by bench/throughput.py (what it times) and by
bench/roofline.py (what it predicts).

Convs: input ``[batch, c_in, hw, hw]`` (the batch is a benchmark setting), kernel ``k x k``,
padding 1 for 3x3 and 0 for 1x1. Linears: weight ``[c_out, c_in]``, input ``[tokens, c_in]``.
``count`` = how many layers of that shape the model has. WRN rows are the sparse convs of
``blockdpr.models.WideResNet`` on 32x32 input (tests/test_bench.py checks them against the model);
ResNet-50 rows are torchvision's v1.5 bottlenecks (stride on the 3x3) at 224x224; ``smoke`` rows
are tiny shapes for CPU runs.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SHAPE_TABLE", "LayerShape", "parse_shape_table", "SHAPES", "LAYER_MODELS", "PASSES", "by_id"]

SHAPE_TABLE = """
model      name          kind    c_in  c_out  k  stride  hw  count
wrn-28-2   g1.in         conv      16     32  3       1  32      1
wrn-28-2   g1            conv      32     32  3       1  32      7
wrn-28-2   g2.in         conv      32     64  3       2  32      1
wrn-28-2   g2            conv      64     64  3       1  16      7
wrn-28-2   g3.in         conv      64    128  3       2  16      1
wrn-28-2   g3            conv     128    128  3       1   8      7
wrn-28-10  g1.in         conv      16    160  3       1  32      1
wrn-28-10  g1            conv     160    160  3       1  32      7
wrn-28-10  g2.in         conv     160    320  3       2  32      1
wrn-28-10  g2            conv     320    320  3       1  16      7
wrn-28-10  g3.in         conv     320    640  3       2  16      1
wrn-28-10  g3            conv     640    640  3       1   8      7
resnet-50  s2.reduce.0   conv      64     64  1       1  56      1
resnet-50  s2.reduce     conv     256     64  1       1  56      2
resnet-50  s2.3x3        conv      64     64  3       1  56      3
resnet-50  s2.expand     conv      64    256  1       1  56      3
resnet-50  s2.down       conv      64    256  1       1  56      1
resnet-50  s3.reduce.0   conv     256    128  1       1  56      1
resnet-50  s3.3x3.0      conv     128    128  3       2  56      1
resnet-50  s3.reduce     conv     512    128  1       1  28      3
resnet-50  s3.3x3        conv     128    128  3       1  28      3
resnet-50  s3.expand     conv     128    512  1       1  28      4
resnet-50  s3.down       conv     256    512  1       2  56      1
resnet-50  s4.reduce.0   conv     512    256  1       1  28      1
resnet-50  s4.3x3.0      conv     256    256  3       2  28      1
resnet-50  s4.reduce     conv    1024    256  1       1  14      5
resnet-50  s4.3x3        conv     256    256  3       1  14      5
resnet-50  s4.expand     conv     256   1024  1       1  14      6
resnet-50  s4.down       conv     512   1024  1       2  28      1
resnet-50  s5.reduce.0   conv    1024    512  1       1  14      1
resnet-50  s5.3x3.0      conv     512    512  3       2  14      1
resnet-50  s5.reduce     conv    2048    512  1       1   7      2
resnet-50  s5.3x3        conv     512    512  3       1   7      2
resnet-50  s5.expand     conv     512   2048  1       1   7      3
resnet-50  s5.down       conv    1024   2048  1       2  14      1
linear     1024          linear  1024   1024  1       1   0      1
linear     2048          linear  2048   2048  1       1   0      1
linear     4096          linear  4096   4096  1       1   0      1
linear     8192          linear  8192   8192  1       1   0      1
smoke      conv3x3       conv      32     32  3       1   8      1
smoke      conv3x3.s2    conv      32     64  3       2   8      1
smoke      conv1x1       conv      64     32  1       1   4      1
smoke      linear        linear    64     64  1       1   0      1
"""


@dataclass(frozen=True)
class LayerShape:
    """One row of SHAPE_TABLE."""

    model: str
    name: str
    kind: str  # "conv" or "linear"
    c_in: int
    c_out: int
    k: int
    stride: int
    hw: int  # input height = width (convs); 0 for linears
    count: int

    @property
    def id(self) -> str:
        """Shell-friendly id used by --layers, e.g. 'wrn-28-10/g3' or 'linear/4096'."""
        return f"{self.model}/{self.name}"

    @property
    def padding(self) -> int:
        return self.k // 2

    def describe(self) -> str:
        if self.kind == "linear":
            return f"linear {self.c_in}->{self.c_out}"
        return f"{self.k}x{self.k} {self.c_in}->{self.c_out} s{self.stride} @{self.hw}x{self.hw}"


def parse_shape_table(text: str = SHAPE_TABLE) -> list[LayerShape]:
    """SHAPE_TABLE -> LayerShape rows (header line skipped)."""
    lines = [line.split() for line in text.strip().splitlines()]
    return [LayerShape(m, n, kind, *map(int, rest)) for m, n, kind, *rest in lines[1:]]


SHAPES = parse_shape_table()
LAYER_MODELS = ("wrn-28-2", "wrn-28-10", "resnet-50", "linear")  # the real tables ("smoke": tiny CPU shapes)


def by_id(layer_id: str) -> LayerShape:
    """The SHAPES row with this id ('wrn-28-10/g3'); KeyError naming the known ids otherwise."""
    for s in SHAPES:
        if s.id == layer_id:
            return s
    raise KeyError(f"no benchmark layer {layer_id!r}; known: {[s.id for s in SHAPES]}")

# What is timed per layer: forward, backward of a precomputed output (input and weight gradients), both.
PASSES = ("fwd", "bwd", "fwdbwd")
