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
