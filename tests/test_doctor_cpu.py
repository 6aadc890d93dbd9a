"""`mmgen doctor`'s CPU rows: the BF16 / AMX / VNNI units read from /proc/cpuinfo and who uses them."""

from __future__ import annotations

import json

import pytest

from mmgen_deploy.cpuinfo import read_cpu_features

SAPPHIRE_RAPIDS = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8 avx_vnni
"""
SKYLAKE = """processor\t: 0
model name\t: Intel(R) Xeon(R) Gold 6130
flags\t\t: fpu sse2 avx2 avx512f
"""


def test_cpu_features_are_read_from_cpuinfo() -> None:
    spr = read_cpu_features(SAPPHIRE_RAPIDS)
    assert spr.model == "Intel(R) Xeon(R) Platinum 8480+"
    assert spr.native_bf16 and spr.amx and spr.vnni
    assert spr.present() == ["avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8", "avx512_vnni", "avx_vnni"]
    old = read_cpu_features(SKYLAKE)
    assert not (old.native_bf16 or old.amx or old.vnni) and old.present() == ["avx512f"]
    assert read_cpu_features("").flags == frozenset()


def test_doctor_reports_the_cpu_units_and_their_runtimes(capsys) -> None:
    from mmgen_deploy.cli.app import main
    from mmgen_deploy.cpuinfo import cpu_features

    with pytest.raises(SystemExit) as info:
        main(["doctor", "--json", "-"])
    assert info.value.code in (0, None)
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert {"cpu", "cpu bf16", "cpu int8", "openvino"} <= set(rows)
    assert rows["cpu"]["version"] == cpu_features().model
    if cpu_features().native_bf16:
        assert rows["cpu bf16"]["version"] != "-"
        if rows["openvino"]["status"] == "ok":
            assert "openvino" in rows["cpu bf16"]["detail"]
    else:
        assert rows["cpu bf16"]["status"] == "warn"
    if rows["openvino"]["status"] == "missing":
        assert "mmgen-deploy[openvino]" in rows["openvino"]["detail"]
