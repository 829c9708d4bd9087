"""The benchmark report on CPU: the quick suite's outputs, failure handling, the peers'
math against the oracle, and that the package import stays light."""
from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from sasa_triton import perf_suite as suites
from sasa_triton.report import __main__ as cli
from sasa_triton.report.baselines import unfold_attend
from sasa_triton.report.impls import Impl, attend_backends
from sasa_triton.report.results_csv import COLUMNS

from cases import Case, assert_close, make_inputs
from oracle import oracle_attend

ROOT = Path(__file__).resolve().parents[1]


def _explode_on_build(inputs, grad):
    raise RuntimeError("injected build failure")


def _explode_on_call(inputs, grad):
    def forward():
        raise RuntimeError("injected call failure")
    return forward, [inputs.q]


FAILING = (Impl("boom_build", "attention", _explode_on_build, "raises in build"),
           Impl("boom_call", "attention", _explode_on_call, "raises when called"))


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    """One run of the quick suite (tiny time budget) with two failing implementations."""
    out = tmp_path_factory.mktemp("report")
    outputs = cli.main(["--suite", "quick", "--out", str(out), "--cpu-budget", "0",
                        "--min-reps", "1"],
                       extra_impls=FAILING)
    return outputs


def test_quick_suite_writes_csv_with_documented_columns(quick_report):
    import pandas as pd

    frame = pd.read_csv(quick_report.csv)
    assert list(frame.columns)[:len(COLUMNS)] == COLUMNS
    cases = [s.name for s in suites.QUICK]
    assert list(dict.fromkeys(frame["case"])) == cases
    # one row per case x implementation x direction
    assert not frame.duplicated(["case", "impl", "direction"]).any()
    assert set(frame["direction"]) == {"fwd", "fwdbwd"}
    ok = frame[frame["status"] == "ok"]
    for impl in ("attend", "attend:reference", "unfold", "conv_kxk", "conv_3x3",
                 "conv_depthwise_kxk", "layer:Conv2d"):
        assert (ok["impl"] == impl).sum() == 2 * len(cases), impl
    assert (ok[["median_us", "p20_us", "p80_us", "floor_us", "ratio_to_floor"]] > 0).all().all()
    assert (ok["p20_us"] <= ok["p80_us"]).all()
    assert (ok["peak_mem_mib"] >= 0).all()
    dense = ok[ok["impl"] == "conv_kxk"]["ratio_to_dense_conv"]
    assert (dense.round(9) == 1.0).all()
    assert (frame["device_type"] == "cpu").all()
    # FlexAttention is CUDA only: recorded, with the reason
    flex = frame[frame["impl"].str.startswith("flex")]
    assert set(flex["status"]) == {"unsupported"} and flex["note"].str.contains("CUDA").all()
    # the layer from sasa_triton.nn runs or is recorded as unavailable, never silently absent
    sasa = frame[frame["impl"] == "layer:SASA2d"]
    assert len(sasa) == 2 * len(cases)
    assert set(sasa["status"]) <= {"ok", "unavailable"}


def test_columns_are_documented():
    doc = (ROOT / "docs" / "report.md").read_text()
    table_doc = sys.modules["sasa_triton.report.results_csv"].__doc__
    for column in COLUMNS:
        assert f"`{column}`" in doc, column
        assert column in table_doc, column


def test_quick_suite_writes_charts_and_summary(quick_report):
    names = {p.name for p in quick_report.charts}
    for stem in ("latency_by_case", "latency_vs_k", "latency_vs_heads", "peak_memory",
                 "ratio_to_floor"):
        for ext in ("png", "svg"):
            assert f"{stem}.{ext}" in names
            assert (quick_report.out_dir / f"{stem}.{ext}").stat().st_size > 1000
    summary = quick_report.summary.read_text()
    assert "CPU timings" in summary
    assert "results.csv" in summary and "torch" in summary
    assert "![latency_by_case](latency_by_case.png)" in summary


def test_only_charts_with_data_are_drawn(quick_report, tmp_path):
    import pandas as pd

    from sasa_triton.report.charts import draw_all

    frame = pd.read_csv(quick_report.csv)
    one_case = frame[(frame["case"] == "q-k3") & (frame["direction"] == "fwd")]
    drawn = {p.stem for p in draw_all(one_case, tmp_path)}
    assert drawn == {"latency_by_case", "peak_memory", "ratio_to_floor"}  # no sweeps
    failed = frame.assign(status="error: x")
    assert draw_all(failed, tmp_path / "none") == []


def test_failing_implementation_is_recorded_and_run_goes_on(quick_report):
    import pandas as pd

    frame = pd.read_csv(quick_report.csv)
    for name, message in (("boom_build", "injected build failure"),
                          ("boom_call", "injected call failure")):
        rows = frame[frame["impl"] == name]
        assert len(rows) == 2 * len(suites.QUICK)
        assert rows["status"].str.startswith(f"error: RuntimeError: {message}").all()
        assert rows["median_us"].isna().all()
    # the cases after the first failure were still measured
    last = frame[(frame["case"] == suites.QUICK[-1].name) & (frame["impl"] == "attend")]
    assert (last["status"] == "ok").all()


UNFOLD_CASES = [
    Case(H=6, W=5, heads=2, d=8, k=3, rel="shared"),
    Case(H=4, W=5, heads=2, d=7, k=5, rel="per_head"),  # window larger than the image
    Case(B=1, H=5, W=6, heads=1, d=4, k=3),
]


@pytest.mark.parametrize("case", UNFOLD_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("layout", ["contiguous", "nchw_view"])
def test_unfold_baseline_matches_oracle(case, layout):
    q, k, v, kwargs = make_inputs(case, torch.float64, layout, requires_grad=True)
    out = unfold_attend(q, k, v, case.k, rel_h=kwargs.get("rel_h"), rel_w=kwargs.get("rel_w"))
    expected = oracle_attend(q, k, v, case.k, padding="zeros", rel_h=kwargs.get("rel_h"),
                             rel_w=kwargs.get("rel_w"))
    assert_close(out, expected, torch.float64, "out")
    grad = torch.randn_like(expected)
    leaves = [q, k, v] + [kwargs[n] for n in ("rel_h", "rel_w") if n in kwargs]
    for got, want, name in zip(torch.autograd.grad(out, leaves, grad),
                               torch.autograd.grad(expected, leaves, grad),
                               ["q", "k", "v", "rel_h", "rel_w"]):
        assert_close(got, want, torch.float64, f"d{name}")


def test_flex_math_matches_oracle_in_mask_mode():
    """The FlexAttention peer (block mask + score_mod), run eagerly on CPU: same logits as
    attend with padding="mask"; d=8 exercises the padding of d to 16."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    from sasa_triton.report.flex import make_flex_neighborhood

    case = Case(B=1, H=5, W=6, heads=2, d=8, k=3, padding="mask", rel="shared")
    q, k, v, kwargs = make_inputs(case, torch.float32)
    for rel in (False, True):
        rel_h, rel_w = (kwargs["rel_h"], kwargs["rel_w"]) if rel else (None, None)
        run = make_flex_neighborhood(case.H, case.W, case.heads, case.d, case.k, "cpu", rel,
                                     compile=False)
        with warnings.catch_warnings():  # "called without torch.compile": on purpose
            warnings.simplefilter("ignore", UserWarning)
            out = run(q, k, v, rel_h, rel_w)
        expected = oracle_attend(q, k, v, case.k, padding="mask", rel_h=rel_h, rel_w=rel_w)
        assert_close(out, expected, torch.float32, f"flex rel={rel}")


def test_suites_follow_perf_md():
    s1, s2, s3, s4 = suites.SUITES["resnet50"]
    assert (s1.B, s1.H, s1.C, s1.heads, s1.d, s1.k) == (32, 56, 64, 8, 8, 7)
    assert (s4.H, s4.C, s4.d) == (7, 512, 64)
    assert [s.k for s in suites.SUITES["ksweep"]] == [3, 5, 7, 9, 11]
    assert [s.d for s in suites.SUITES["heads"]] == [128, 64, 32, 16, 8]
    names = [s.name for s in suites.SUITES["all"]]
    assert len(names) == len({s.key for s in suites.SUITES["all"]})  # s2 = k7 = h8 once
    assert "k7" not in names and "h8" not in names and "det" in names
    assert suites.default_suite("cpu") == "quick" and suites.default_suite("cuda") == "resnet50"


def test_report_never_runs_triton_backends_on_cpu(monkeypatch):
    from sasa_triton import variants

    monkeypatch.setitem(variants.VARIANTS, "fake_kernel",
                        variants.kernel_variant("fake_kernel", "nowhere", forward=True))
    assert "fake_kernel" not in attend_backends("cpu")
    assert "reference" in attend_backends("cpu")


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        cli.parse_args(["--suite", "nope"])
    with pytest.raises(ValueError, match="--dtype"):
        cli.main(["--dtype", "int8", "--out", "/nonexistent"])
    with pytest.raises(ValueError, match="--impl"):
        cli.main(["--impl", "nothing*", "--out", "/nonexistent"])


def test_importing_the_package_stays_light():
    code = ("import sys, sasa_triton, sasa_triton.report; "
            "heavy = [m for m in ('pandas', 'matplotlib', 'triton') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
