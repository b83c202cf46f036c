"""The benchmark command's machinery (timings themselves live in docs/benchmarks.md)."""

import io

import pytest
import timm
import torch

from visionzoo import bench
from visionzoo.cli import main


@pytest.fixture
def tiny_cases(monkeypatch):
    monkeypatch.setitem(bench.OP_CASES, "dense_attention", [bench.dense_case(1, 2, 16, 8)])


FORWARD, TRAIN = "forward", "forward+backward"


@pytest.mark.parametrize(
    "op, case, expected",
    [
        (
            "dense_attention",
            bench.dense_case(1, 2, 16, 8),
            [(FORWARD, "reference"), (FORWARD, "sdpa"), (TRAIN, "reference"), (TRAIN, "sdpa")],
        ),
        (  # flex runs forward only on CPU: no training row
            "neighborhood_attention",
            bench.neighborhood_case(1, 1, 8, 4, 3, rpb=True),
            [(FORWARD, "reference"), (FORWARD, "flex"), (FORWARD, "tiled"), (TRAIN, "reference"), (TRAIN, "tiled")],
        ),
    ],
)
def test_bench_op_times_every_backend_against_reference(monkeypatch, op, case, expected):
    monkeypatch.setitem(bench.OP_CASES, op, [case])
    rows = bench.bench_op(op, bench.RunSettings(min_run_time=0.01))
    assert [(r.mode, r.backend) for r in rows] == expected
    assert all(r.median_ms > 0 and r.speedup > 0 and r.peak_mib is not None for r in rows)
    assert rows[0].speedup == 1.0 and rows[0].dtype == "float32" and rows[0].device == "cpu"


def test_bench_op_rows_as_markdown_and_csv(tiny_cases):
    rows = bench.bench_op("dense_attention", bench.RunSettings(min_run_time=0.01))
    table = bench.format_markdown(rows)
    assert table.count("\n") == len(rows) + 1 and "| dense_attention | heads=2 N=16 d=8 | 1 | cpu |" in table
    stream = io.StringIO()
    bench.write_csv(rows, stream)
    assert stream.getvalue().splitlines()[0].startswith("op,case,batch,device,dtype,mode,backend,median_ms")


def test_bench_cli_writes_csv(tiny_cases, tmp_path, capsys):
    path = tmp_path / "ops.csv"
    assert (
        main(["bench", "--op", "dense_attention", "--forward-only", "--min-run-time", "0.01", "--csv", str(path)]) == 0
    )
    assert "forward+backward" not in capsys.readouterr().out
    assert len(path.read_text().splitlines()) == 3


def test_bench_backend_filter_keeps_the_reference_baseline(tiny_cases):
    rows = bench.bench_op(
        "dense_attention", bench.RunSettings(backward=False, min_run_time=0.01), backends=["reference"]
    )
    assert [r.backend for r in rows] == ["reference"]
    rows = bench.bench_op("dense_attention", bench.RunSettings(backward=False, min_run_time=0.01), backends=["sdpa"])
    assert [r.backend for r in rows] == ["reference", "sdpa"]


def test_bench_unknown_op_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown kernel op 'nope'"):
        bench.bench_op("nope")


def test_cpu_peak_memory_sees_a_large_allocation():
    peak = bench.peak_memory_mib(lambda: torch.ones(64, 2**20).sum(), torch.device("cpu"))
    assert 200 < peak < 1000  # 256 MiB tensor


def test_bench_mixer_times_ours_against_timm(monkeypatch):
    monkeypatch.setitem(bench.MIXER_CASES, "halo", [bench.halo_case(1, 8, 16, 2, 4, 1)])
    monkeypatch.setitem(bench.MIXER_CASES, "multi_axis", [bench.partition_case(1, 8, 32, 4, "grid")])
    monkeypatch.setitem(bench.MIXER_CASES, "channel", [bench.channel_case(1, 8, 32, 2)])
    for name in ("halo", "multi_axis", "channel"):
        rows = bench.bench_mixer(name, bench.RunSettings(min_run_time=0.01))
        assert [(r.mode, r.backend) for r in rows] == [
            ("forward", "timm"),
            ("forward", "visionzoo"),
            ("forward+backward", "timm"),
            ("forward+backward", "visionzoo"),
        ]
        assert rows[0].speedup == 1.0 and all(r.median_ms > 0 for r in rows)
    with pytest.raises(ValueError, match="no timm comparison for mixer 'global'"):
        bench.bench_mixer("global")


def test_bench_model_against_a_timm_model(tmp_path, capsys):
    args = ["bench", "ela_resnet18", "--compare", "resnet18", "--img-size", "32", "48", "--batch", "2"]
    chart = tmp_path / "models.png"
    assert main([*args, "--min-run-time", "0.01", "--csv", str(tmp_path / "models.csv"), "--chart", str(chart)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    ours, baseline = (line.split(" | ") for line in lines[2:])
    assert ours[0] == "| ela_resnet18" and baseline[0] == "| resnet18" and ours[2:4] == ["eager", "32x48"]
    assert all(cell.endswith("(1.00x)") for cell in baseline[7:10])  # the baseline against itself
    assert all(cell.endswith("x)") for cell in ours[7:10])
    rows = (tmp_path / "models.csv").read_text().splitlines()
    assert rows[0].startswith("model,device,mode,channels_last,input_size,batch,params,gmacs") and len(rows) == 3
    assert chart.read_bytes().startswith(b"\x89PNG")


def test_stats_reports_the_papers_top1(capsys):
    assert main(["stats", "nat_mini", "ela_resnet18", "--img-size", "64"]) == 0
    rows = {line.split(" | ")[0]: line for line in capsys.readouterr().out.splitlines()}
    assert rows["| nat_mini"].endswith("| 81.8 |") and rows["| ela_resnet18"].endswith("| - |")
    assert "| 0.45 | 2.7 | 64x64 |" in rows["| nat_mini"]  # ours at 64x64, the paper's at 224x224


def test_bench_model_figures_are_consistent():
    timing = bench.bench_model("resnet18", input_size=(32, 32), batch=2, train=False, min_run_time=0.01)
    assert timing.params == 11_689_512 and timing.train_img_s is None
    assert timing.latency_ms > 0 and timing.infer_img_s > 0 and 0.03 < timing.gmacs < 0.04  # 1.82 GMACs * (32/224)^2


def test_bench_model_under_autocast():
    timing = bench.bench_model("resnet18", input_size=(32, 32), batch=2, min_run_time=0.01, autocast=torch.bfloat16)
    assert timing.device == "cpu, bfloat16 autocast" and timing.train_img_s > 0


def test_compiled_rows_carry_their_ratio_to_the_eager_run(capsys):
    """``--compile`` times each model eagerly, then compiled (inductor: the warm-up compiles, untimed)."""
    args = ["bench", "test_resnet.r160_in1k", "--img-size", "32", "32", "--batch", "2", "--forward-only", "--compile"]
    assert main([*args, "--channels-last", "--min-run-time", "0.01"]) == 0
    eager, compiled = (line.split(" | ") for line in capsys.readouterr().out.strip().splitlines()[2:])
    assert eager[2] == "eager, channels-last" and compiled[2] == "compiled, channels-last"
    assert not eager[7].endswith("x)") and compiled[7].endswith("x)") and compiled[8].endswith("x)")


def test_chart_against_the_papers_top1_leaves_out_models_without_one(tmp_path):
    def timing(model, img_s):
        return bench.ModelTiming(
            model, "cpu", "eager", False, (224, 224), 32, 1, 4.5, 10.0, 1.0, img_s, None, None, None
        )

    chart = tmp_path / "top1.png"
    rows = [timing("nat_tiny", 100.0), timing("convnext_tiny", 300.0), timing("mixvit_tiny", 200.0)]
    assert bench.plot_model_timings(rows, str(chart), against="top1") == ["mixvit_tiny"]
    assert chart.read_bytes().startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="'gmacs' or 'top1'"):
        bench.plot_model_timings(rows, str(chart), against="params")


def test_aten_op_count_shows_the_tiled_path_dispatches_fewer_ops():
    from visionzoo.kernels import use_backend
    from visionzoo.stats import count_aten_ops

    model = timm.create_model("nat_mini", depths=(1, 1, 1, 1))
    with use_backend("reference"):
        reference = count_aten_ops(model, (64, 64))
    tiled = count_aten_ops(model, (64, 64))
    assert 0 < tiled < reference


def test_bench_unknown_names_are_one_line_errors(capsys):
    assert main(["bench", "nat_mini", "--compare", "swin_nope"]) == 2
    assert capsys.readouterr().err == "error: unknown model swin_nope (visionzoo list models: ours)\n"
    assert main(["bench", "--op", "nope"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown kernel op 'nope'; known: ['aggregated_attention'")
