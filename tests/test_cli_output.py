"""What commands print fits an 80-column terminal (and a pipe, which rich treats as 80 columns)
with words whole; counts read as English; `mmgen info` lists the class names `generate` takes."""

from __future__ import annotations

import io

import pytest
from rich.console import Console


def _lines(renderables: list, width: int = 80) -> list[str]:
    out = io.StringIO()
    console = Console(file=out, width=width, highlight=False)
    for item in renderables:
        console.print(item)
    return out.getvalue().splitlines()


def test_doctor_fits_80_columns_with_every_detail_whole(capsys, monkeypatch) -> None:
    from mmgen_deploy.cli.app import main
    from mmgen_deploy.doctor import collect

    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit) as info:
        main(["doctor"])
    assert info.value.code in (0, None)
    text = capsys.readouterr().out
    assert max(len(line) for line in text.splitlines()) <= 80 and "…" not in text
    for check in collect():  # each word of each detail, whole (wrapped at spaces, never cut)
        for word in check.detail.split():
            assert word in text, word


def test_parity_table_fits_80_columns() -> None:
    from mmgen_deploy.parity.report import Check, ParityReport

    report = ParityReport("parity: onnxruntime fp16 vs torch fp32 (runs/quickstart)")
    for group, name, value, threshold, direction in (
            ("denoiser", "model_output rel_l2 (random, batch 16)", 1.234e-3, 5e-2, "<="),
            ("quantizer", "indices agreement (real, batch 3)", 0.99871, 0.999, ">="),
            ("end-to-end", "median image latent rel_l2", 2.1e-7, 1e-3, "<=")):
        report.checks.append(Check(group, name, value, threshold, direction))
    out = io.StringIO()
    report.render(Console(file=out, width=80, highlight=False))
    text = out.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80 and "…" not in text
    assert "FAILED" in text and "indices agreement" in text and "<= 0.05" in text


def _bench_result():
    from mmgen_deploy.parity.bench import BackendResult, BenchResult, Latency

    def backend(name: str, precision: str, scale: float) -> BackendResult:
        latency = {c: {b: Latency(median_ms=scale * b * 12.345, p90_ms=scale * b * 13.5, runs=10) for b in (1, 16)}
                   for c in ("encoder", "quantizer", "decoder", "denoiser")}
        return BackendResult(name, precision, components=latency, images_per_s={1: 9.87 / scale, 16: 123.4 / scale},
                             peak_host_mib=1234.0, denoiser_gflops={1: 12.3, 16: 456.7},
                             decoder_gflops={1: 7.8, 16: 234.5},
                             time_split={b: {"denoiser": 0.8, "quantizer+decoder": 0.15, "other": 0.05}
                                         for b in (1, 16)},
                             device="cpu")

    return BenchResult("runs/quickstart", [1, 16], 10, 4.0, 1000.0,
                       [backend("onnxruntime", "fp32", 1.0), backend("openvino", "bf16", 0.5),
                        BackendResult("tensorrt", "fp16", error="TensorRT is not installed (pip install "
                                                                "'mmgen-deploy[tensorrt]')")],
                       matmul_peaks={"fp32": 1000.0, "bf16": 4000.0, "int8": 8000.0})


def test_bench_tables_fit_80_columns_and_keep_every_row() -> None:
    result = _bench_result()
    lines = _lines(result.tables())
    text = "\n".join(lines)
    assert max(len(line) for line in lines) <= 80 and "…" not in text
    assert text.count("onnxruntime fp32") == 4 and text.count("openvino bf16") == 4  # 2 batches x 2 tables
    assert "tensorrt" not in text and any("tensorrt fp16 failed: TensorRT is not installed" in n
                                          for n in result.notes())
    assert "| backend | precision | batch |" in result.markdown()  # the file keeps the wide table


def _validated(worst: list[tuple[str, str, str, float, float]]) -> dict:
    """A manifest entry's validation: (output, inputs, metric, value, tolerance) per worst row."""
    return {"passed": True, "batches": [1, 3], "worst": [
        {"output": o, "inputs": i, "metric": m, "value": v, "tolerance": t, "max_abs": 0.0, "batch": 3}
        for o, i, m, v, t in worst]}


def test_export_summary_shows_each_outputs_own_limit_and_fits_80_columns() -> None:
    """Each row is read against the limit its output was checked against (the component spec's, as the
    manifest records it): an INT8 denoiser at 0.14 shows its own 0.2, not a precision-wide 5e-2."""
    from mmgen_deploy.cli.export import summary_table

    quantized = {"quantized_nodes": 25, "high_precision_compute_nodes": ["a"] * 8}
    manifest = {"files": {
        "fp32": {"encoder": {"bytes": 4e5, "validation": _validated([("h", "random", "rel_l2", 3.3e-7, 1e-5),
                                                                    ("h", "real", "rel_l2", 5.8e-7, 1e-5)])}},
        "int8": {
            "quantizer": {"bytes": 1e4, "component_precision": "fp32", "quantization": quantized,
                          "validation": _validated([("indices", "random", "agreement", 1.0, 1.0),
                                                    ("indices", "real", "agreement", 0.999994, 1.0)])},
            "denoiser": {"bytes": 3.1e6, "component_precision": "int8", "quantization": quantized,
                         "validation": _validated([("model_output", "random", "rel_l2", 0.09, 0.25),
                                                   ("model_output", "real", "rel_l2", 0.14, 0.2)])}}}}
    lines = _lines([summary_table(manifest, ["fp32", "int8"], ["encoder", "quantizer", "denoiser"])])
    text = "\n".join(lines)
    assert max(len(line) for line in lines) <= 80 and "…" not in text
    row = {words[0]: words[1:] for words in map(str.split, lines) if words and "/" in words[0]}
    assert row["int8/denoiser"][:4] == ["model_output", "9.0e-2", "1.4e-1", "0.25/0.2"]
    assert row["fp32/encoder"][:4] == ["h", "3.3e-7", "5.8e-7", "1e-5"]
    assert row["int8/quantizer"][:5] == ["indices", "100", "%", "99.999", "%"]  # never rounded up to 100 %
    assert "5e-2" not in text and "tolerance" not in text


def test_plural_and_the_progress_count_before_a_total_is_known() -> None:
    from rich.progress import Progress

    from mmgen_deploy.cli.common import count_column, plural

    assert [plural(n, "image") for n in (0, 1, 2)] == ["0 images", "1 image", "2 images"]
    with Progress(count_column(), console=Console(file=io.StringIO())) as progress:
        task = progress.add_task("x", total=None)
        column = count_column()
        assert str(column.render(progress.tasks[task])) == ""
        progress.update(task, completed=3, total=8)
        assert str(column.render(progress.tasks[task])) == "3/8"


def test_info_lists_the_class_names_generate_takes(exported_tiny_run, capsys, monkeypatch) -> None:
    from mmgen_deploy.cli.app import main

    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit) as info:
        main(["info", str(exported_tiny_run.root)])
    assert info.value.code in (0, None)
    text = capsys.readouterr().out
    assert "classes (--class)" in text and "0 shape 0" in text and "17 shape 17" in text
    assert max(len(line) for line in text.splitlines()) <= 80
