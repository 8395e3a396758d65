"""What one iteration of a kernel's hot loop costs in SASS: instruction count and their kinds.

The hot loop is the innermost loop that holds the tensor-core instructions: a backward branch
``BRA`` to a lower address closes a loop ``[target, branch]``; of the loops that contain an MMA
instruction, the shortest is the one the kernel spends its time in (the K loop of a GEMM). Its
instructions (NOPs excluded) are what each iteration issues, so the count is comparable across
kernels and tile shapes: e.g. the dense Triton matmul tutorial's loop at a 128x32x32 bf16 tile on
sm_90 is 79 instructions for its HGMMAs.

Kinds: ``mma`` (HGMMA / HMMA ...), ``integer`` (address and mask arithmetic on the vector and
uniform datapaths), loads by where they go (``LDG`` global -> registers, ``LDGSTS`` = cp.async
global -> shared, ``UTMALDG`` = TMA, ``LDS`` / ``LDSM`` shared -> registers), ``STS`` stores to
shared, and ``division``: an integer division or modulo by a runtime value, which the compiler
expands into ``I2F`` + ``MUFU.RCP`` + ``F2I`` and a fix-up (about 20 instructions).
"""
from __future__ import annotations

import re

MMA = ("HGMMA", "HMMA", "IMMA", "QGMMA", "IGMMA", "UTCHMMA", "UTCQMMA")
LOADS = ("LDG", "LDGSTS", "UTMALDG", "LDS", "LDSM", "LDC", "LDL")
INTEGER = ("IMAD", "IADD3", "IADD", "VIADD", "LOP3", "SHF", "LEA", "ISETP", "SEL", "IMNMX", "VIMNMX", "IABS",
           "PRMT", "MOV", "IMUL", "I2F", "F2I", "SGXT", "PLOP3", "P2R", "R2P", "FLO", "POPC", "BMSK")

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)\s*([^;]*);")


def parse(sass: str) -> list[tuple[int, str, str, str]]:
    """``cuobjdump -sass`` text -> ``[(address, opcode, modifiers, operands)]`` in address order."""
    return [(int(addr, 16), op, mods, operands.strip())
            for addr, _pred, op, mods, operands in _LINE.findall(sass)]


def _base(op: str) -> str:
    """Uniform-datapath ops (``UIADD3``, ``ULEA``) count as their vector kind."""
    return op[1:] if op.startswith("U") and op[1:] in INTEGER else op


def loops(instructions: list[tuple[int, str, str, str]]) -> list[tuple[int, int]]:
    """Every ``[start, end]`` address range closed by a backward branch."""
    found = []
    for addr, op, _mods, operands in instructions:
        if op == "BRA":
            target = re.match(r"(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))", operands.split(",")[-1].strip())
            if target and target.group(1) and int(target.group(1), 16) < addr:
                found.append((int(target.group(1), 16), addr))
    return found


def hot_loop(sass: str) -> dict | None:
    """Instruction counts of the shortest loop that holds MMA instructions (else of the shortest
    loop); ``None`` for straight-line code."""
    instructions = parse(sass)
    spans = loops(instructions)
    if not spans:
        return None

    def body(span):
        return [ins for ins in instructions if span[0] <= ins[0] <= span[1] and ins[1] != "NOP"]

    with_mma = [s for s in spans if any(ins[1] in MMA for ins in body(s))]
    span = min(with_mma or spans, key=lambda s: s[1] - s[0])
    ops = [ins[1] for ins in body(span)]
    mods = [ins[1] + ins[2] for ins in body(span)]
    return dict(
        instructions=len(ops),
        mma=sum(op in MMA for op in ops),
        integer=sum(_base(op) in INTEGER for op in ops),
        loads={kind: n for kind in LOADS if (n := ops.count(kind))},
        sts=ops.count("STS"),
        division=any(m.startswith("MUFU.RCP") for m in mods) and "I2F" in ops,
    )
