"""The benchmark harness writes every format with a sane schema; percentiles are ordered (no timing asserts)."""
import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from edet_deploy.bench import run_bench, time_loop
from edet_deploy.measure import percentiles


def test_percentiles_and_loop():
    p = percentiles([5.0, 1.0, 3.0, 2.0, 4.0])
    assert p["p50"] == 3.0 and p["p50"] <= p["p90"] <= p["p99"] <= 5.0 and p["n"] == 5
    calls = []
    times = time_loop(calls.append, warmup=2, iters=4, seconds=None)
    assert calls == list(range(6)) and len(times) == 4  # warm-up calls are not timed; inputs rotate by index


def test_alternating_blocks_alternate_the_sides_and_time_every_call():
    """Blocks of calls/rounds per side, the order reversed every other round, each call timed with its one input."""
    import gc
    import time

    from edet_deploy.measure import alternating_blocks
    calls = []

    def side(name, seconds):
        def call(batch):
            calls.append((name, batch))
            time.sleep(seconds)
        return call
    times = alternating_blocks({"a": side("a", 0.0), "b": side("b", 0.002)}, ["x", "y", "z"], 8, rounds=4)
    assert [n for n, _ in calls] == ["a", "a", "b", "b", "b", "b", "a", "a"] * 2
    assert [b for n, b in calls if n == "a"] == [["x"], ["y"]] * 4  # each block starts at the first input
    assert len(times["a"]) == len(times["b"]) == 8
    assert min(times["b"]) >= 2.0 > max(times["a"])
    assert gc.isenabled()


def test_quick_bench_writes_all_formats(tmp_path):
    report = run_bench(["d0"], ["torch", "onnxruntime", "openvino", "tensorrt"], ["fp32"], [1], tmp_path, warmup=1,
                       iters=3, progress=False)
    rows = {(r["backend"], r["precision"]): r for r in report["results"]}
    assert rows[("tensorrt", "fp32")]["status"] == "skipped" and rows[("tensorrt", "fp32")]["reason"]
    for backend in ("torch", "onnxruntime", "openvino"):
        r = rows[(backend, "fp32")]
        assert r["status"] == "ok", r
        assert 0 < r["model_p50_ms"] <= r["model_p90_ms"] <= r["model_p99_ms"]
        assert 0 < r["pipeline_p50_ms"] <= r["pipeline_p90_ms"] <= r["pipeline_p99_ms"]
        assert r["first_inference_ms"] > 0 and r["load_ms"] > 0 and r["throughput_img_s"] > 0 and r["peak_rss_mb"] > 0
        assert r["threads"] >= 1 and r["iterations"] == 3
    data = json.loads((tmp_path / "bench.json").read_text())
    assert {"cpu", "cores", "threads", "gpu", "versions", "date"} <= set(data["machine"])
    with open(tmp_path / "bench.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == 4 and {"model", "backend", "precision", "model_p50_ms", "status"} <= set(csv_rows[0])
    md = (tmp_path / "bench.md").read_text()
    assert "| d0 | onnxruntime | fp32 |" in md and "| d0 | openvino | fp32 |" in md and "skipped: no" in md
    assert "eager PyTorch" in md and "OpenVINO FP32 vs ONNX Runtime FP32" in md
    for png in ("latency.png", "accuracy_vs_latency.png"):
        img = Image.open(tmp_path / png)
        assert img.format == "PNG" and img.size[0] > 300


def _row(model, backend, precision, p50):
    from dataclasses import asdict
    from edet_deploy.bench import Result
    return asdict(Result(model, backend, precision, 1, model_p50_ms=p50))


def _machine(cpu, date):
    return {"cpu": cpu, "cores": 2, "threads": 2, "gpu": None, "versions": {"numpy": "1"}, "date": date}


def test_merge_keeps_other_rows_and_never_compares_across_runs():
    from edet_deploy.reports import markdown_table, merge_reports, speedups
    base = {"machine": _machine("EPYC", "day 1"), "results": [
        _row("d0", "torch", "fp32", 120), _row("d0", "onnxruntime", "fp32", 80), _row("d3", "onnxruntime", "fp32", 400)]}
    new = {"machine": _machine("Xeon", "day 2"), "results": [
        _row("d0", "onnxruntime", "fp32", 60), _row("d0", "openvino", "fp32", 30)]}
    merged = merge_reports(base, new)
    rows = {(r["model"], r["backend"]): r["model_p50_ms"] for r in merged["results"]}
    assert rows == {("d0", "torch"): 120, ("d0", "onnxruntime"): 60, ("d0", "openvino"): 30, ("d3", "onnxruntime"): 400}
    assert [r["backend"] for r in merged["results"] if r["model"] == "d0"] == ["torch", "onnxruntime", "openvino"]
    assert speedups(merged, ("openvino", "fp32"), ("onnxruntime", "fp32")) == {"d0 b1": 2.0}  # same run
    assert speedups(merged) == {}  # torch (day 1) vs onnxruntime (day 2): different runs, no ratio
    md = markdown_table(merged)
    assert "EPYC" in md and "Xeon" in md and "Merged" in md and "OpenVINO FP32 vs ONNX Runtime FP32" in md
    again = merge_reports(merged, {"machine": _machine("Xeon", "day 3"), "results": [_row("d3", "openvino", "fp32", 9)]})
    assert len(again["sources"]) == 3 and len(again["results"]) == 5


def test_sweep_options_refuse_before_the_sweep():
    from edet_deploy import EdetError
    from edet_deploy.bench import sweep_options
    assert sweep_options("torch, openvino", "fp32,int8", "1,8") == (["torch", "openvino"], ["fp32", "int8"], [1, 8])
    with pytest.raises(EdetError, match="unknown backend/precision"):
        sweep_options("torch,tflite", "fp32", "1")
    with pytest.raises(EdetError, match="--batch takes integers"):
        sweep_options("torch", "fp32", "1,x")


def test_graph_for_refuses_before_exporting(tmp_path):
    from edet_deploy import EdetError
    from edet_deploy.precision.convert import graph_for
    with pytest.raises(EdetError, match="unknown precision"):
        graph_for("d0", "int4", tmp_path)
    with pytest.raises(EdetError, match="calibration data"):
        graph_for("d0", "int8", tmp_path)
    assert not list(tmp_path.iterdir())  # nothing was exported


def test_bf16_rows_run_the_fp32_graph_in_openvino(tmp_path):
    """bf16 is OpenVINO's: its row runs (where the CPU has the instructions), other backends say why not."""
    pytest.importorskip("openvino")
    from edet_deploy.backends.openvino import cpu_has_bf16
    report = run_bench(["d0"], ["onnxruntime", "openvino"], ["bf16"], [1], tmp_path, warmup=1, iters=3,
                       progress=False)
    rows = {r["backend"]: r for r in report["results"]}
    assert rows["onnxruntime"]["status"] == "skipped" and "OpenVINO" in rows["onnxruntime"]["reason"]
    ov = rows["openvino"]
    if cpu_has_bf16():
        assert ov["status"] == "ok" and ov["model_p50_ms"] > 0, ov
        assert ov["census_int8"] is None  # the FP32 graph's types do not describe a bf16 run
        assert not list((tmp_path / "graphs" / "d0").glob("*bf16*"))  # no bf16 graph file: a runtime setting
    else:
        assert ov["status"] == "skipped" and "bf16 instructions" in ov["reason"]


def _previous_results(out):
    """A good run's reports in `out`, to show that a later run did not touch them."""
    out.mkdir(parents=True, exist_ok=True)
    files = {name: f"previous {name}".encode() for name in ("bench.json", "bench.csv", "bench.md", "latency.png",
                                                             "accuracy_vs_latency.png")}
    for name, data in files.items():
        (out / name).write_bytes(data)
    return files


def test_nothing_measured_exits_1_keeps_previous_results_and_skips_carry_no_times(tmp_path, capsys):
    from edet_deploy.cli import main
    from edet_deploy.reports import write_reports
    out = tmp_path / "bench"
    before = _previous_results(out)
    assert main(["bench", "--models", "d0", "--backends", "tensorrt", "--precisions", "fp32", "--quick",
                 "--no-progress", "--out", str(out)]) == 1  # no GPU here: every combination is skipped
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[-1].startswith("edet-deploy bench: error: nothing was measured"), err
    assert "d0 tensorrt fp32 b1: skipped: no GPU" in err[-1]  # the cause, not only a pointer to a file
    assert {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()} == before  # nothing overwritten
    # A sweep that measures nothing writes no reports, and its skipped rows carry no times.
    report = run_bench(["d0"], ["tensorrt"], ["fp32"], [1], tmp_path / "fresh", warmup=1, iters=3, progress=False)
    assert not list((tmp_path / "fresh").glob("bench.*"))
    row = report["results"][0]
    assert row["status"] == "skipped" and row["reason"] == "no GPU"
    assert row["model_p50_ms"] is None and row["load_ms"] is None and row["throughput_img_s"] is None
    write_reports(report, tmp_path / "fresh", plots=False)  # as a mixed sweep writes its skipped rows
    with open(tmp_path / "fresh" / "bench.csv") as f:
        csv_row = next(csv.DictReader(f))
    assert csv_row["model_p50_ms"] == "" and csv_row["pipeline_p50_ms"] == ""


@pytest.mark.parametrize("args,cause", [
    (["--backends", ""], "--backends names no backend"),
    (["--backends", " , "], "--backends names no backend"),
    (["--precisions", ""], "--precisions names no precision"),
    (["--models", ""], "--models names nothing to bench"),
    (["--models", ",,"], "--models names nothing to bench"),
    (["--models", "d9"], "unknown model 'd9'"),
    (["--backends", "onnxruntime,tflite"], "unknown backend/precision ['tflite']"),
    (["--precisions", "int4"], "unknown backend/precision ['int4']"),
    (["--weights", "nope.pth"], "weights file not found: nope.pth"),
    (["--weights", "."], ". is a folder, not a weights file"),
    (["--batch", "1,,8"], "with none empty (in '1,,8')"),
    (["--batch", "1,8,"], "with none empty (in '1,8,')"),
])
def test_bad_bench_input_exits_2_before_any_work(args, cause, tmp_path, monkeypatch, capsys):
    """Bad input is one line and exit 2 naming the cause, before any export or timing, and the previous
    results in --out stay as they were."""
    from edet_deploy.cli import main
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "bench"
    before = _previous_results(out)
    argv = ["bench", "--models", "d0", "--backends", "onnxruntime", "--precisions", "fp32", "--quick",
            "--no-progress", "--out", str(out), *args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edet-deploy bench: error: ") and cause in err[0], err
    assert sorted(f.name for f in out.iterdir()) == sorted(before)  # no graphs exported, nothing written
    assert all((out / name).read_bytes() == data for name, data in before.items())


@pytest.mark.parametrize("args,expected", [
    ([], (3, 20)),
    (["--quick"], (1, 5)),
    (["--quick", "--iters", "50"], (1, 50)),
    (["--quick", "--warmup", "0"], (0, 5)),
    (["--warmup", "7", "--iters", "9"], (7, 9)),
])
def test_quick_sets_defaults_and_explicit_values_win(args, expected, monkeypatch, tmp_path):
    from edet_deploy import bench
    from edet_deploy.cli import main
    seen = {}

    def fake_run_bench(models, backends, precisions, batches, out, threads, warmup, iters, seconds, *rest, **kw):
        seen["warmup_iters"] = warmup, iters
        return {"results": [{"status": "ok"}]}
    monkeypatch.setattr(bench, "run_bench", fake_run_bench)
    assert main(["bench", "--backends", "onnxruntime", "--no-progress", "--out", str(tmp_path), *args]) == 0
    assert seen["warmup_iters"] == expected


def test_cpu_pressure_marks_a_loaded_run():
    """PSI read around a block: twice as many busy loops as cores keep runnable tasks waiting for a CPU, which
    is what PSI "some" counts."""
    import multiprocessing as mp
    import os
    import time

    from edet_deploy.measure import CpuPressure, cpu_pressure_total
    if cpu_pressure_total() is None:
        pytest.skip("this kernel has no PSI (/proc/pressure/cpu)")
    stop = mp.Event()
    hogs = [mp.Process(target=_spin, args=(stop,)) for _ in range(2 * (os.cpu_count() or 1))]
    for h in hogs:
        h.start()
    try:
        with CpuPressure() as p:
            time.sleep(2.0)
    finally:
        stop.set()
        for h in hogs:
            h.join(10)
            if h.is_alive():
                h.kill()
    assert p.pct is not None and p.pct > 50, p.pct


def _spin(stop):
    while not stop.is_set():
        pass


def test_bench_with_data_reports_measured_map_beside_latency(tmp_path):
    """`bench --data`: each row's mAP comes from the runner that was timed, and equals what `eval` measures
    for the same graph and images (pycocotools both times)."""
    from pathlib import Path

    from edet_deploy.bench import Accuracy
    from edet_deploy.cli import main
    from edet_deploy.data import generate_shapes
    weights = str(Path(__file__).resolve().parent.parent / "edet_deploy" / "assets" / "shapes_d0.safetensors")
    data = generate_shapes(tmp_path / "shapes", {"val": 16}, seed=5, progress=False)
    report = run_bench(["d0"], ["onnxruntime", "openvino"], ["fp32"], [1], tmp_path / "b", warmup=0, iters=2,
                       progress=False, weights=weights, accuracy=Accuracy(data, "val", eval_images=16))
    rows = {r["backend"]: r for r in report["results"]}
    assert all(r["status"] == "ok" and r["eval_images"] == 16 for r in rows.values()), rows
    assert rows["onnxruntime"]["map"] > 0.3  # trained weights on their own kind of images
    graph = next((tmp_path / "b" / "graphs").rglob("efficientdet_d0.onnx"))
    assert main(["eval", "--onnx", str(graph), "--backend", "onnxruntime", "--data", str(data),
                 "--report", str(tmp_path / "e.json"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["stats"]["AP"] == pytest.approx(rows["onnxruntime"]["map"])
    md = (tmp_path / "b" / "bench.md").read_text()
    assert "| mAP | AP50 |" in md and f"{rows['openvino']['map']:.4f}" in md
    with open(tmp_path / "b" / "bench.csv") as f:
        assert float(next(csv.DictReader(f))["map"]) == pytest.approx(rows["onnxruntime"]["map"])
    assert Image.open(tmp_path / "b" / "accuracy_vs_latency.png").format == "PNG"
    # Accuracy needs trained weights: refused before any work.
    assert main(["bench", "--data", str(data), "--out", str(tmp_path / "c")]) == 2


WEIGHTS = str(Path(__file__).resolve().parent.parent / "edet_deploy" / "assets" / "shapes_d0.safetensors")


def _truncated_last(data):
    ann = json.loads((data / "instances_val.json").read_text())
    last = data / "images" / "val" / ann["images"][-1]["file_name"]
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    return last


def _three_categories(data):
    ann = json.loads((data / "instances_val.json").read_text())
    ann["categories"] = ann["categories"][:3]
    (data / "instances_val.json").write_text(json.dumps(ann))
    return "has no category named cross"


@pytest.mark.parametrize("edit", [lambda d: _truncated_last(d).name, _three_categories], ids=["truncated", "classes"])
def test_bench_data_that_cannot_be_scored_exits_2_before_any_measurement(tmp_path, monkeypatch, capsys, edit):
    """`bench --data` on a split with a truncated image (or categories that do not pair with the weights'
    classes): one line and exit 2, found before any graph is made or timed, instead of latency measured, then
    thrown away with exit 1 "nothing was measured"."""
    from edet_deploy.bench import Bench
    from edet_deploy.cli import main
    from edet_deploy.data import generate_shapes
    data = generate_shapes(tmp_path / "ds", {"val": 3}, seed=5, progress=False)
    cause = edit(data)

    def no_measuring(self, *args):
        raise AssertionError("measured")
    monkeypatch.setattr(Bench, "run", no_measuring)
    out = tmp_path / "b"
    assert main(["bench", "--models", "d0", "--weights", WEIGHTS, "--backends", "onnxruntime", "--precisions",
                 "fp32", "--quick", "--no-progress", "--data", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edet-deploy bench: error: ") and cause in err[0], err
    assert not out.exists()


def test_a_failed_score_keeps_the_rows_latency(tmp_path, monkeypatch, caplog):
    """The accuracy part fails after the timing: the row stays measured (status ok, its times kept), mAP
    empty, and its reason says why; bench.md lists it."""
    from edet_deploy.bench import Accuracy, Bench
    from edet_deploy.data import generate_shapes
    data = generate_shapes(tmp_path / "ds", {"val": 2}, seed=5, progress=False)

    def failing(self, r, det):
        raise RuntimeError("scorer gone")
    monkeypatch.setattr(Bench, "_evaluate", failing)
    with caplog.at_level("WARNING", logger="edet_deploy"):
        report = run_bench(["d0"], ["onnxruntime"], ["fp32"], [1], tmp_path / "b", warmup=0, iters=2,
                           progress=False, weights=WEIGHTS, accuracy=Accuracy(data, "val"))
    row = report["results"][0]
    assert row["status"] == "ok" and row["model_p50_ms"] > 0 and row["pipeline_p50_ms"] > 0 and row["load_ms"] > 0
    assert row["map"] is None and row["reason"] == "accuracy not measured: RuntimeError: scorer gone"
    assert any("accuracy not measured" in r.getMessage() for r in caplog.records)
    md = (tmp_path / "b" / "bench.md").read_text()
    assert "- d0 onnxruntime fp32 b1: accuracy not measured: RuntimeError: scorer gone" in md
    assert "| mAP | AP50 |" in md
