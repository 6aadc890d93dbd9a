"""`mmgen doctor`'s CPU rows: the BF16 / AMX / VNNI units read from /proc/cpuinfo and who uses them."""

from __future__ import annotations

import json

import pytest

from mmgen_deploy.cpuinfo import read_cpu_features

SAPPHIRE_RAPIDS = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8 avx_vnni
"""
COOPER_LAKE = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8380H
flags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16
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


def test_doctor_tells_amx_from_avx512_bf16_only() -> None:
    """AMX: BF16 pays and auto uses it for large models. AVX-512 BF16 without AMX: a warning that
    BF16 is no faster there. Neither: FP32 is the fastest exact path."""
    from mmgen_deploy.doctor import cpu_bf16_check

    amx = cpu_bf16_check(read_cpu_features(SAPPHIRE_RAPIDS), openvino_bf16=True, torch_bf16=True)
    assert amx.status == "ok" and amx.version == "AMX-BF16 and AVX-512 BF16"
    assert "AMX" in amx.detail and "auto picks OpenVINO BF16" in amx.detail and "openvino" in amx.detail
    cooper = cpu_bf16_check(read_cpu_features(COOPER_LAKE), openvino_bf16=True, torch_bf16=True)
    assert cooper.status == "warn" and cooper.version == "AVX-512 BF16 (no AMX)"
    assert "without AMX" in cooper.detail and "no faster than FP32" in cooper.detail
    old = cpu_bf16_check(read_cpu_features(SKYLAKE), openvino_bf16=False, torch_bf16=False)
    assert (old.status, old.version) == ("warn", "-") and "no BF16 units" in old.detail


def test_doctor_lists_every_registry_backend_and_the_auto_order(capsys) -> None:
    from mmgen_deploy.cli.app import main
    from mmgen_deploy.runtime.backends import REGISTRY, describe_auto_order

    with pytest.raises(SystemExit) as info:
        main(["doctor", "--json", "-"])
    assert info.value.code in (0, None)
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    for name, spec in REGISTRY.items():
        row = rows[f"backend {name}"]
        assert row["status"] in ("ok", "missing")
        if row["status"] == "ok":
            assert row["detail"].startswith(", ".join(spec.precisions[:1]))
        else:
            assert spec.install_hint in row["detail"]
    assert rows["backend auto"]["detail"] == describe_auto_order()
