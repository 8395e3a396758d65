"""bench.sass: the hot loop of a kernel's SASS and what one iteration issues."""
from bench.sass import hot_loop, loops, parse

# A hand-written cuobjdump excerpt: a prologue, an outer loop [0x0040, 0x0120] and an inner loop
# [0x0060, 0x00f0] holding the MMAs, an integer division (I2F + MUFU.RCP) and three kinds of load.
SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;                     /* 0x00000a0000017a02 */
        /*0010*/                   S2R R0, SR_TID.X ;                         /* 0x0000000000007919 */
        /*0040*/                   IMAD R2, R0, 0x4, RZ ;                     /* 0x0000000400027824 */
        /*0050*/                   NOP ;                                      /* 0x0000000000007918 */
        /*0060*/                   LDG.E R4, desc[UR4][R2.64] ;               /* 0x0000000402047981 */
        /*0070*/                   I2F.U32.RP R5, R4 ;                        /* 0x0000000400057306 */
        /*0080*/                   MUFU.RCP R5, R5 ;                          /* 0x0000000500057308 */
        /*0090*/               @P0 LDGSTS.E.BYPASS.128 [R11], desc[UR4][R16.64] ; /* 0x00000000100b7fae */
        /*00a0*/                   UIADD3 UR4, UR4, 0x1, URZ ;                /* 0x0000000104047890 */
        /*00b0*/                   LDS.128 R8, [R3] ;                         /* 0x0000000003087984 */
        /*00c0*/                   HGMMA.64x32x16.F32.BF16 R24, gdesc[UR8], R24 ; /* 0x00600000081879f0 */
        /*00d0*/                   HGMMA.64x32x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ; /* 0x00600000081879f0 */
        /*00e0*/                   ISETP.GE.AND P0, PT, R4, R5, PT ;          /* 0x000000050400720c */
        /*00f0*/               @P0 BRA 0x60 ;                                 /* 0xfffffff400ac0947 */
        /*0100*/                   IADD3 R2, R2, 0x1, RZ ;                    /* 0x0000000102027810 */
        /*0110*/                   ISETP.NE.AND P1, PT, R2, R7, PT ;          /* 0x000000070200720c */
        /*0120*/               @P1 BRA 0x40 ;                                 /* 0xfffffff400ac0947 */
        /*0130*/                   EXIT ;                                     /* 0x000000000000794d */
        /*0140*/                   BRA 0x140;                                 /* 0xfffffffc00fc7947 */
"""


def test_parse_reads_addresses_opcodes_and_modifiers():
    ins = parse(SASS)
    assert len(ins) == 19
    assert ins[0] == (0x0, "MOV", "", "R1, c[0x0][0x28]")
    assert ins[7][:3] == (0x90, "LDGSTS", ".E.BYPASS.128")  # a predicated instruction keeps its opcode


def test_backward_branches_close_loops_and_self_branches_do_not():
    assert loops(parse(SASS)) == [(0x60, 0xF0), (0x40, 0x120)]


def test_hot_loop_is_the_shortest_loop_with_mma():
    loop = hot_loop(SASS)
    assert loop == dict(instructions=10, mma=2, integer=3, loads={"LDG": 1, "LDGSTS": 1, "LDS": 1}, sts=0,
                        division=True)


def test_without_mma_the_shortest_loop_counts_and_straight_code_has_none():
    no_mma = SASS.replace("HGMMA.64x32x16.F32.BF16", "FFMA")
    assert hot_loop(no_mma)["mma"] == 0 and hot_loop(no_mma)["instructions"] == 10
    assert hot_loop(no_mma.replace("MUFU.RCP", "FMUL"))["division"] is False
    assert hot_loop(SASS.replace("@P0 BRA 0x60", "@P0 BRA 0x130").replace("@P1 BRA 0x40", "NOP")) is None
