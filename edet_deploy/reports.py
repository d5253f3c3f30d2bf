"""Benchmark reports: bench.json / bench.csv / bench.md, merging runs, speed-up ratios and the two plots. Kept
apart from the measurement (bench.py) so reports can be rewritten or merged without the harness."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Dict, List

from .log import logger
from .measure import BACKENDS, PRECISIONS


def write_reports(report: Dict, out: Path, plots: bool = True) -> None:
    from .io import atomic_path, write_json

    write_json(out / "bench.json", report)
    rows = report["results"]
    with atomic_path(out / "bench.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            fields = list(dict.fromkeys(k for r in rows for k in r)) or ["model"]  # merged runs: union of columns
            w = csv.DictWriter(f, fieldnames=fields, restval="")
            w.writeheader()
            w.writerows(rows)
    with atomic_path(out / "bench.md") as tmp:
        tmp.write_text(markdown_table(report))
    if not plots:
        return
    try:
        plot_latency(report, out / "latency.png")
        plot_accuracy_latency(report, out / "accuracy_vs_latency.png")
    except ImportError:
        logger.warning("matplotlib is not installed: no plots (pip install 'edet-deploy[plot]')")


def _key(r: Dict) -> tuple:
    return r["model"], r["backend"], r["precision"], r["batch"]


def merge_reports(base: Dict, new: Dict) -> Dict:
    """`base` with the rows of `new` replacing or joining its own (same model, backend, precision, batch), for
    adding backends to a sweep too slow to rerun whole. Each part keeps its machine and date in `sources`, and
    the markdown says which rows came from which run; ratios are only taken within one run."""
    def sources(report: Dict) -> List[Dict]:
        return report.get("sources") or [{"machine": report["machine"], "settings": report.get("settings"),
                                          "rows": [list(_key(r)) for r in report["results"]]}]
    new_keys = {_key(r) for r in new["results"]}
    merged_sources = []
    for src in sources(base):
        rows = [k for k in src["rows"] if tuple(k) not in new_keys]
        if rows:
            merged_sources.append({**src, "rows": rows})
    merged_sources += sources(new)
    from .configs import VARIANTS
    variants = list(VARIANTS)

    def order(r: Dict) -> tuple:
        return (variants.index(r["model"]) if r["model"] in variants else len(variants), r["batch"],
                BACKENDS.index(r["backend"]) if r["backend"] in BACKENDS else len(BACKENDS),
                PRECISIONS.index(r["precision"]) if r["precision"] in PRECISIONS else len(PRECISIONS))
    results = sorted([r for r in base["results"] if _key(r) not in new_keys] + list(new["results"]), key=order)
    return {"machine": new["machine"], "settings": new.get("settings"), "sources": merged_sources,
            "results": results}


def _same_run(report: Dict, a: tuple, b: tuple) -> bool:
    srcs = report.get("sources")
    if not srcs:
        return True
    return any([*a] in src["rows"] and [*b] in src["rows"] for src in srcs)


def markdown_table(report: Dict) -> str:
    m = report["machine"]
    lines = [f"# edet-deploy benchmark\n"]
    if report.get("sources"):
        lines.append("Merged from several runs (rows measured together are compared; a ratio never crosses runs):\n")
        for src in report["sources"]:
            sm = src["machine"]
            combos = sorted({f"{k[1]} {k[2]}" for k in src["rows"]})
            models = sorted({k[0] for k in src["rows"]}, key=lambda x: (len(x), x))
            lines.append(f"- {sm['cpu']}, {sm['cores']} cores, {sm['threads']} threads, {sm['date']}: "
                         f"{', '.join(models)} x {', '.join(combos)}. Versions: "
                         + ", ".join(f"{k} {v}" for k, v in sm["versions"].items()))
        lines.append("")
    else:
        lines.append(f"Machine: {m['cpu']} ({m.get('cpu_flags') or 'flags unknown'}), {m['cores']} cores, {m['threads']} threads used, "
                     f"GPU: {m['gpu'] or 'none'}; {m['date']}. Versions: "
                     + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".\n")
    lines += [
             "Latency in ms (model = graph alone on preprocessed input; pipeline = JPEG decode + preprocess + "
             "model + postprocess). First inference is excluded from percentiles and shown separately.\n",
             "Load = building the runner (graph load and compilation, no cache); first inf. = the first call after.\n",
             "Census: share of the graph's multiply-adds in int8 / fp16 / fp32 under TensorRT's strong typing "
             "(read from the graph's types; torch rows run FP32 eager).\n",
             "CPU PSI: share of the row's wall time during which some task waited for a CPU (Linux pressure "
             "stall information); rows marked **loaded** were measured on a busy machine.\n"]
    header = ("| model | backend | precision | batch | model p50 | p90 | p99 | pipeline p50 | img/s | load ms | "
              "first inf. | peak RSS MB | census int8/fp16/fp32 | CPU PSI % |")
    rule = "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"
    # With --data the columns stay even when no row could be scored: each such row says why below the table.
    accuracy = bool((report.get("settings") or {}).get("accuracy")) or any(r.get("map") is not None
                                                                           for r in report["results"])
    if accuracy:  # measured with --data: the runner that was timed, scored by pycocotools
        acc = (report.get("settings") or {}).get("accuracy") or {}
        lines.append(f"mAP / AP50: COCO metrics (pycocotools) of the row's own runner on {acc.get('data', '--data')} "
                     f"({acc.get('split', 'val')} split, {acc.get('eval_images') or 'all'} images); batch-1 rows.\n")
        header, rule = header + " mAP | AP50 |", rule + "---:|---:|"
    lines += [header, rule]
    for r in report["results"]:
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | {r['backend']} | {r['precision']} | {r['batch']} | "
                         f"{r['status']}: {r['reason']} ||||||||| " + ("|| " if accuracy else ""))
            continue
        cells = [_num(r, k, d) for k, d in (("model_p50_ms", 1), ("model_p90_ms", 1), ("model_p99_ms", 1),
                                             ("pipeline_p50_ms", 1), ("throughput_img_s", 2), ("load_ms", 0),
                                             ("first_inference_ms", 0), ("peak_rss_mb", 0))]
        psi = _num(r, "cpu_pressure_pct", 0) + (" **loaded**" if r.get("under_load") else "")
        lines.append(f"| {r['model']} | {r['backend']} | {r['precision']} | {r['batch']} | {' | '.join(cells)} | "
                     f"{_census_cell(r)} | {psi} |" + (f" {_num(r, 'map', 4)} | {_num(r, 'ap50', 4)} |"
                                                       if accuracy else ""))
    notes = [f"- {r['model']} {r['backend']} {r['precision']} b{r['batch']}: {r['reason']}"
             for r in report["results"] if r["status"] == "ok" and r.get("reason")]
    if notes:  # measured rows with a part missing (a score that failed after the timing)
        lines += ["", *notes]
    for title, pairs in RATIOS:
        ratios = speedups(report, *pairs)
        if ratios:
            lines += ["", f"{title} (model p50, same run; > 1 = faster):", ""]
            lines += [f"- {k}: {v:.2f}x" for k, v in ratios.items()]
    return "\n".join(lines) + "\n"


def _num(r: Dict, key: str, digits: int) -> str:
    """A measured value with `digits` decimals, '-' where nothing was measured."""
    value = r.get(key)
    return "-" if value is None else f"{value:.{digits}f}"


def _census_cell(r: Dict) -> str:
    if r.get("census_int8") is None:
        return "-"
    return "/".join(f"{100 * r[f'census_{p}']:.0f}%" for p in ("int8", "fp16", "fp32"))


# (title, (backend, precision) measured, (backend, precision) it is compared against)
RATIOS = [("ONNX Runtime FP32 vs eager PyTorch", (("onnxruntime", "fp32"), ("torch", "fp32"))),
          ("OpenVINO FP32 vs ONNX Runtime FP32", (("openvino", "fp32"), ("onnxruntime", "fp32"))),
          ("OpenVINO BF16 vs ONNX Runtime FP32", (("openvino", "bf16"), ("onnxruntime", "fp32"))),
          ("OpenVINO BF16 vs OpenVINO FP32", (("openvino", "bf16"), ("openvino", "fp32"))),
          ("OpenVINO INT8 (Q/DQ) vs OpenVINO FP32", (("openvino", "int8"), ("openvino", "fp32")))]


def speedups(report: Dict, subject=("onnxruntime", "fp32"), baseline=("torch", "fp32")) -> Dict[str, float]:
    """baseline p50 / subject p50 per model and batch, where both were measured."""
    by = {(r["model"], r["backend"], r["precision"], r["batch"]): r for r in report["results"] if r["status"] == "ok"}
    out = {}
    for (m, b, p, n), r in by.items():
        if ((b, p) == tuple(subject) and (m, *baseline, n) in by
                and _same_run(report, (m, b, p, n), (m, *baseline, n))):
            out[f"{m} b{n}"] = by[(m, *baseline, n)]["model_p50_ms"] / r["model_p50_ms"]
    return out


def _series(report: Dict, batch: int = 1):
    series: Dict[str, List[dict]] = {}
    for r in report["results"]:
        if r["status"] == "ok" and r["batch"] == batch:
            series.setdefault(f"{r['backend']} {r['precision']}", []).append(r)
    return series


def plot_latency(report: Dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from .configs import VARIANTS

    order = list(VARIANTS)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for label, rows in sorted(_series(report).items()):
        rows = sorted(rows, key=lambda r: order.index(r["model"]))
        ax.plot([r["model"].upper() for r in rows], [r["model_p50_ms"] for r in rows], marker="o", label=label)
    m = report["machine"]
    ax.set_yscale("log")
    ax.set_ylabel("latency p50, batch 1 (ms, log scale)")
    ax.set_title(f"EfficientDet latency by variant ({m['cores']} cores, {m['gpu'] or 'CPU only'})")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # nothing measured at batch 1: an empty plot, without a warning
        ax.legend()
    fig.tight_layout()
    _save(fig, path)


def plot_accuracy_latency(report: Dict, path: Path) -> None:
    """In the style of the EfficientDet paper's figure: accuracy against measured latency. With `bench --data`
    every row's measured mAP is plotted (all precisions); otherwise the published COCO AP of the FP32 rows (the
    paper's number is the FP32 model's, so it is never drawn for FP16/INT8)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from .configs import VARIANTS

    order = list(VARIANTS)
    fig, ax = plt.subplots(figsize=(7, 5), dpi=110)
    measured = any(r.get("map") is not None for r in report["results"])
    for label, rows in sorted(_series(report).items()):
        rows = sorted((r for r in rows if (r.get("map") is not None if measured else
                                           r["published_coco_ap"] is not None and r["precision"] == "fp32")),
                      key=lambda r: order.index(r["model"]))
        if not rows:
            continue
        xs = [r["model_p50_ms"] for r in rows]
        ys = [100 * r["map"] for r in rows] if measured else [r["published_coco_ap"] for r in rows]
        ax.plot(xs, ys, marker="o", label=label)
        for r, x, y in zip(rows, xs, ys):
            ax.annotate(r["model"].upper(), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("measured latency p50, batch 1 (ms, log scale)")
    ax.set_ylabel("mAP@[.5:.95] x 100 (measured, --data)" if measured else "COCO AP (published FP32, test-dev)")
    ax.set_title("Accuracy vs latency on this machine")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # a sweep without FP32 rows has nothing to plot here
        ax.legend()
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    from .io import atomic_path
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())
