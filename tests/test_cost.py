"""python -m sasa_triton.cost: SASS reading, loop trip counts, the model, calibration and
the instruction watch (dynamic instruction totals against tests/cost_baseline.json).

Everything but the last test is pure Python on synthetic input (milliseconds). The watch
compiles the five launches of sasa_triton.cost.baseline.WATCH for sm_90 in a subprocess
(about 20-40 s from a cold Triton cache on 2 cores) and fails when any of them issues
more than 10% more instructions than the baseline recorded with this Triton version.
"""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sasa_triton.cost import baseline, classes, kernels, model, sass
from sasa_triton.cost.analyze import LaunchReport, tally
from sasa_triton.cost.cases import SUITES
from sasa_triton.cost.predict import CaseCost, LaunchCost

BASELINE = Path(__file__).with_name("cost_baseline.json")

# nvdisasm -c layout: an outer loop (.L_x_1) holding an inner one (.L_x_2), a subroutine
# after EXIT and the trailing spin, which are not part of the main region.
SASS_TEXT = """
        .text.kern:
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_TID.X ;
.L_x_1:
        /*0020*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0030*/                   IMAD R0, R0, 0x2, RZ ;
.L_x_2:
        /*0040*/                   HMMA.16816.F32.BF16 R8, R4, R6, R8 ;
        /*0050*/                   MUFU.EX2 R9, R9 ;
        /*0060*/                   LDG.E.U16 R10, desc[UR4][R2.64] ;
        /*0070*/               @P0 BRA `(.L_x_2) ;
        /*0080*/                   FFMA R1, R1, R2, R3 ;
        /*0090*/              @!P1 BRA `(.L_x_1) ;
        /*00a0*/                   STG.E desc[UR4][R2.64], R1 ;
        /*00b0*/                   CALL.REL.NOINC `($__internal_0_$__cuda_sm20_div_s64) ;
        /*00c0*/                   EXIT ;
$__internal_0_$__cuda_sm20_div_s64:
        /*00d0*/                   IMAD R0, R0, R0, RZ ;
        /*00e0*/                   RET.REL.NODEC R10 `(kern) ;
.L_x_3:
        /*00f0*/                   BRA `(.L_x_3);
        /*0100*/                   NOP;
"""


def test_sass_main_region_and_loops():
    ins = sass.parse(SASS_TEXT)
    assert [i.address for i in ins] == list(range(0, 0xD0, 0x10))  # no subroutine, no spin
    assert ins[7].opcode == "BRA" and ins[7].target == 0x40 and ins[7].predicated
    loops = sass.find_loops(ins)
    assert [(lp.start, lp.end, lp.depth, lp.parent) for lp in loops] == [
        (0x20, 0x90, 0, None), (0x40, 0x70, 1, 0)]
    assert sass.innermost_loop(loops, 0x50) == 1
    assert sass.innermost_loop(loops, 0x80) == 0
    assert sass.innermost_loop(loops, 0xA0) is None


def test_instruction_classes_and_widths():
    expect = {"HMMA.16816.F32.BF16": "mma", "FFMA.FTZ": "fp32", "MUFU.EX2": "mufu",
              "LDG.E.128": "ldg", "LDGSTS.E.BYPASS.128": "ldg", "STG.E": "stg",
              "LDSM.16.M88.4": "lds", "STS.128": "sts", "SHFL.BFLY": "shfl", "BAR.SYNC": "bar",
              "IMAD.MOV.U32": "int", "UIADD3": "int", "ULDC.64": "const", "BRA": "control",
              "STL": "local", "F2FP.BF16.F32.PACK_AB": "cvt", "XYZZY": "other"}
    assert {op: classes.instruction_class(op) for op in expect} == expect
    assert [classes.access_bytes(op) for op in
            ("LDG.E.128", "LDG.E.64", "LDG.E", "LDG.E.U16", "STG.E.U8", "LDSM.16.M88.4",
             "FFMA")] == [16, 8, 4, 2, 1, 16, 0]


def test_dynamic_counts_multiply_trip_counts():
    ins = sass.parse(SASS_TEXT)
    loops = sass.find_loops(ins)
    matched = [kernels.MatchedLoop("outer", 3, 3), kernels.MatchedLoop("inner", 4, 12)]
    t = tally(ins, loops, matched)
    # outside: LDC, S2R, STG, CALL, EXIT; outer body: LDG, IMAD, FFMA, BRA; inner: 4
    assert sum(t.outside.values()) == 5 and sum(t.loops[0].body.values()) == 4
    assert sum(t.loops[1].body.values()) == 4
    assert sum(t.per_program.values()) == 5 + 4 * 3 + 4 * 12
    assert t.per_program["mma"] == 12 and t.per_program["mufu"] == 12
    assert t.ldg_bytes_per_warp == 32 * (16 * 3 + 2 * 12)
    assert t.stg_bytes_per_warp == 32 * 4
    assert t.loops[1].mem == {"ldg.2B": 1}


# A slow pass: an if (the BRA at 0x10 jumps over it) holding a 0-trip loop and
# straight-line code before and after that loop.
SLOW_PASS_SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/               @P0 BRA `(.L_x_9) ;
        /*0020*/                   IMAD R2, R2, 0x2, RZ ;
.L_x_1:
        /*0030*/                   FFMA R1, R1, R2, R3 ;
        /*0040*/               @P1 BRA `(.L_x_1) ;
        /*0050*/                   IADD3 R2, R2, 0x1, RZ ;
.L_x_9:
        /*0060*/                   STG.E desc[UR4][R2.64], R1 ;
        /*0070*/                   EXIT ;
"""


def test_cold_if_body_runs_zero_times():
    ins = sass.parse(SLOW_PASS_SASS)
    loops = sass.find_loops(ins)
    assert sass.guarded_regions(ins, loops) == [sass.Guarded(0x10, 0x60, (0,))]
    # the loop is a slow pass (cold): the if's IMAD and IADD3 do not run either
    t = tally(ins, loops, [kernels.MatchedLoop("slow pass", 0, 0, cold=True)])
    assert sum(t.per_program.values()) == 4  # LDC, BRA, STG, EXIT
    assert t.cold == {"int": 2} and sum(t.outside.values()) == 4
    # a loop of 0 trips that is not marked cold: the if's straight-line code counts once
    t = tally(ins, loops, [kernels.MatchedLoop("rows", 0, 0)])
    assert sum(t.per_program.values()) == 6 and not t.cold
    # entered from elsewhere (a jump to 0x50 before the if): not an if's body
    entered = SLOW_PASS_SASS.replace("        /*0000*/                   LDC R1, c[0x0][0x28] ;",
                                     "        /*0000*/                   BRA `(.L_x_5) ;")
    entered = entered.replace("        /*0050*/", ".L_x_5:\n        /*0050*/")
    ins = sass.parse(entered)
    assert sass.guarded_regions(ins, sass.find_loops(ins)) == []
    t = tally(ins, sass.find_loops(ins), [kernels.MatchedLoop("slow pass", 0, 0, cold=True)])
    assert sum(t.per_program.values()) == 6 and not t.cold


def test_only_the_innermost_if_around_a_slow_pass_is_cold():
    # if (0x10 -> 0x80) { IMAD (runs); if (0x30 -> 0x70) { slow-pass loop } }
    text = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/               @P0 BRA `(.L_x_8) ;
        /*0020*/                   IMAD R2, R2, 0x2, RZ ;
        /*0030*/               @P3 BRA `(.L_x_7) ;
        /*0040*/                   IADD3 R2, R2, 0x1, RZ ;
.L_x_1:
        /*0050*/                   FFMA R1, R1, R2, R3 ;
        /*0060*/               @P1 BRA `(.L_x_1) ;
.L_x_7:
        /*0070*/                   IMAD R2, R2, 0x3, RZ ;
.L_x_8:
        /*0080*/                   STG.E desc[UR4][R2.64], R1 ;
        /*0090*/                   EXIT ;
"""
    ins = sass.parse(text)
    loops = sass.find_loops(ins)
    assert [(g.branch, g.target) for g in sass.guarded_regions(ins, loops)] == [
        (0x10, 0x80), (0x30, 0x70)]
    t = tally(ins, loops, [kernels.MatchedLoop("slow pass", 0, 0, cold=True)])
    assert t.cold == {"int": 1}  # the inner if's IADD3 only
    assert sum(t.per_program.values()) == 7  # LDC, BRA, IMAD, BRA, IMAD, STG, EXIT


def test_slow_pass_loops_are_cold():
    rows = dict(sizes=(28, 28, 8, 16), dil=(1, 1), BLOCK_M=32, BLOCK_W=8, KH=7, PADDING=0,
                CLIP=True, SPARE=False, PAIR=False)
    m = kernels.match_loops("_rows_fwd_kernel", rows, [0, 0, 1], [True, True, True])
    assert [x.cold for x in m.loops] == [False, True, True] and not m.note


def test_loop_table_matches_by_nesting():
    tiled = dict(HAS_REL=True, KW=7, KH=7, BLOCK_H=1, PADDING=0)
    m = kernels.match_loops("_tiled_fwd_kernel", tiled, [0, 0, 0], [False, True, True])
    assert [(x.trips, x.iterations) for x in m.loops] == [(7, 7), (7, 7), (0, 0)] and not m.note
    # the rel loop unrolled: window rows and the slow pass remain (the exp2 marker says so)
    m = kernels.match_loops("_tiled_fwd_kernel", tiled, [0, 0], [True, True])
    assert [x.name for x in m.loops] == ["window rows a<KH", "NaN slow pass (not taken)"]
    assert not m.note
    # two query rows per program (mask mode): nested loops, the rel loop unrolled or not
    rows2 = dict(HAS_REL=True, KW=5, KH=3, BLOCK_H=2, PADDING=1)
    m = kernels.match_loops("_tiled_fwd_kernel", rows2, [0, 1, 1, 1], [True, False, True, True])
    assert [x.iterations for x in m.loops] == [2, 10, 6, 0] and not m.note
    m = kernels.match_loops("_tiled_fwd_kernel", rows2, [0, 1, 1], [True, True, True])
    assert [(x.name, x.iterations) for x in m.loops] == [
        ("query rows r<BLOCK_H", 2), ("window rows a<KH", 6), ("NaN slow pass (not taken)", 0)]
    m = kernels.match_loops("_dq_kernel", dict(TY=5, TX=3), [0, 1])
    assert [x.iterations for x in m.loops] == [5, 15]
    m = kernels.match_loops("_dq_kernel", dict(TY=5, TX=3), [0, 1, 2])
    assert "do not match" in m.note and [x.iterations for x in m.loops] == [1, 1, 1]
    m = kernels.match_loops("_new_kernel", {}, [0])
    assert "no trip-count entry" in m.note


def test_key_kernel_loops_with_one_slow_pass_sub_tile():
    # rowsbwd's key kernel: 28 rows in blocks of 2 key rows, halo 3 (k 7); a 16-key tile
    # is one slow-pass sub-tile, so the compiler drops that loop: two top-level loops
    sizes = (28, 28, 1, 2, 8, 16, 16, 3, 3)  # (H, W, HEADS, ROWS, ..., HALO_H, HALO_W)
    one = dict(sizes=sizes, BLOCK_M=16, SUB_M=16, HALVES=False)
    m = kernels.match_loops("_key_bwd_kernel", one, [0, 0])
    assert [(x.trips, x.iterations) for x in m.loops] == [(7, 7), (0, 0)] and not m.note
    # 64 keys: four sub-tiles, the slow pass's query rows nested in their loop
    four = dict(one, BLOCK_M=64)
    m = kernels.match_loops("_key_bwd_kernel", four, [0, 0, 1])
    assert [(x.trips, x.iterations) for x in m.loops] == [(7, 7), (0, 0), (7, 0)]
    assert not m.note
    assert "do not match" in kernels.match_loops("_key_bwd_kernel", one, [0, 0, 1]).note


def test_model_floor_occupancy_and_bound():
    s1 = SUITES["resnet50"][0]
    assert model.io_floor_us(s1.B, s1.H, s1.W, s1.C, 2) == pytest.approx(17.36, abs=0.01)
    assert model.resident_programs(8, 242, 1024) == 1
    assert model.resident_programs(1, 133, 3584) == 15  # 65536 // (17 * 256)
    assert model.resident_programs(4, 32, 200_000) == 1  # shared memory binds
    h = model.H100
    # one full wave at 4 warps: 4 instr/clock/SM
    t = model.launch_time(1000.0, h["sms"], 4, 1, 0, 0, 1.0)
    assert t.bound == "issue" and t.issue_us == pytest.approx(1000 / (4 * h["clock_ghz"] * 1e3))
    assert model.launch_time(1000.0, h["sms"], 1, 1, 0, 0, 1.0).issue_us == pytest.approx(
        4 * t.issue_us)  # one warp per SM issues at most 1 per clock
    assert model.launch_time(1.0, 1, 4, 1, 0, 1e9, 1.0).bound == "HBM"
    assert model.launch_time(1.0, 1, 4, 1, 1e9, 1e3, 1.0).bound == "L2"
    assert model.launch_time(1.0, 1, 4, 1, 0, 0, 1.0).total_us >= h["launch_us"]


def _fake_case(shape, direction, warp_instructions_per_program, programs=10_000):
    rep = LaunchReport("k", (programs, 1, 1), programs, 4, 1, 100, 0, 0, 100, [], {}, {},
                       {"int": warp_instructions_per_program / 4}, 0.0, 0.0, 0, "")
    t = model.launch_time(rep.warp_instructions_per_program, programs, 4, 4, 0, 0, 0.55)
    return CaseCost(shape, direction, "auto", "v", None, [LaunchCost(rep, 4, t)], 0, 0.55)


def test_calibration_recovers_a_known_efficiency(tmp_path):
    from sasa_triton.cost.calibrate import bench_rows, fit
    from sasa_triton.cost.predict import retime

    shapes = SUITES["resnet50"]
    cases = [_fake_case(s, "fwd", 2e5 * (i + 1)) for i, s in enumerate(shapes)]
    measured = [retime(c, 0.4).predicted_us for c in cases]
    efficiency, rms = fit([([c], m) for c, m in zip(cases, measured)])
    assert efficiency == pytest.approx(0.4) and rms < 1e-6

    path = tmp_path / "results.csv"
    cols = ["case", "B", "H", "W", "C", "heads", "k", "dtype", "impl", "family", "direction",
            "status", "median_us", "timer", "device"]
    s1 = shapes[0]
    base = dict(case="s1", B=s1.B, H=s1.H, W=s1.W, C=s1.C, heads=s1.heads, k=s1.k,
                dtype="bfloat16", family="attention", timer="triton do_bench",
                device="NVIDIA H100 80GB HBM3")
    rows = [dict(base, impl="attend", direction="fwd", status="ok", median_us="500"),
            dict(base, impl="attend:tiled", direction="fwdbwd", status="ok", median_us="900"),
            dict(base, impl="unfold", direction="fwd", status="ok", median_us="5000"),
            dict(base, impl="attend", direction="fwd", status="error: x", median_us=""),
            dict(base, impl="attend", direction="fwd", status="ok", median_us="1",
                 dtype="float32"),
            dict(base, impl="attend", direction="fwd", status="ok", median_us="1", B=8)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols)
        writer.writeheader()
        writer.writerows(rows)
    got = bench_rows(path, {s.name: s for s in shapes})
    assert [(r["impl"], r["direction"], r["measured_us"]) for r in got] == [
        ("auto", "fwd", 500.0), ("tiled", "fwdbwd", 900.0)]


def _launch(kernel, n):
    return {"kernel": kernel, "warp_instructions": n}


def test_watch_comparison_fails_on_growth():
    base = {"s1/fwd/#0": _launch("a", 1000), "s2/bwd/#0": _launch("b", 2000)}
    assert baseline.compare(base, base) == []
    assert baseline.compare({"s1/fwd/#0": _launch("a", 1100), "s2/bwd/#0": _launch("b", 1)},
                            base) == []  # +10% exactly passes, fewer passes
    grown = baseline.compare({"s1/fwd/#0": _launch("a", 1101), "s2/bwd/#0": _launch("b", 2000)},
                             base)
    assert len(grown) == 1 and "s1/fwd/#0" in grown[0] and "+10.1%" in grown[0]
    assert "not in the baseline" in baseline.compare(
        {**base, "s3/fwd/#0": _launch("c", 1)}, base)[0]
    assert "not launched now" in baseline.compare({"s1/fwd/#0": _launch("a", 1000)}, base)[0]


def test_baseline_write_keeps_other_versions(tmp_path):
    path = tmp_path / "b.json"
    baseline.write(path, "3.8.0", "sm_90", {"x": _launch("a", 1)})
    baseline.write(path, "3.9.0", "sm_90", {"x": _launch("a", 2)})
    assert baseline.entry(path, "3.8.0")["launches"]["x"]["warp_instructions"] == 1
    assert baseline.entry(path, "3.9.0")["launches"]["x"]["warp_instructions"] == 2
    assert baseline.entry(path, "3.6.0") is None


def test_instruction_watch(tmp_path):
    """The watch set's dynamic instruction totals against the committed baseline."""
    import triton

    version = triton.__version__
    if baseline.entry(BASELINE, version) is None:
        known = sorted(baseline.read(BASELINE)["versions"])
        pytest.skip(f"no instruction baseline for Triton {version} (recorded: {known}); "
                    "record one with: python -m sasa_triton.cost --update-baseline "
                    "tests/cost_baseline.json")
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("this Triton install has no CUDA compiler backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "sasa_triton.cost", "--watch-json",
                           str(tmp_path / "watch.json"), "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    current = json.loads((tmp_path / "watch.json").read_text())["launches"]
    # s1, s2, s3 forward; s2 backward (rowsbwd: query kernel, table reduction, key kernel)
    assert len(current) == 6, current
    assert all(v["warp_instructions"] > 0 for v in current.values())
    # the outputs a run writes, labelled as predictions
    text = (out / "predicted.md").read_text()
    assert "PREDICTED" in text and ("UNCALIBRATED" in text or "calibrated (" in text)
    with open(out / "cases.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["case"], r["direction"]) for r in rows} == set(baseline.WATCH)
    assert all(float(r["predicted_us"]) > float(r["fwd_floor_us"]) for r in rows)
    # the comparison does fail on this data when the baseline were 10% lower
    lower = {k: dict(v, warp_instructions=int(v["warp_instructions"] / 1.11))
             for k, v in current.items()}
    assert len(baseline.compare(current, lower)) == len(current)
    problems = baseline.compare(current, baseline.entry(BASELINE, version)["launches"])
    assert not problems, (
        "dynamic instructions grew by more than 10% (or the launches changed):\n  "
        + "\n  ".join(problems) + "\nIf intended, update the baseline: python -m "
        "sasa_triton.cost --update-baseline tests/cost_baseline.json")
