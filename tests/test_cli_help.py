"""`--help` reads well in an 80-column terminal: Click/pip conventions (RUN_DIR, TEXT, INTEGER)."""

from __future__ import annotations

import pytest

from mmgen_deploy.cli.app import command, main

COMMANDS = [["parity"], ["generate"], ["export"], ["build-engine"], ["train", "all"], ["quickstart"], ["eval"],
            ["import"], ["bench"], ["serve"], ["client"], ["triton-repo"], ["batch"], ["info"], ["doctor"], []]


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda a: " ".join(a) or "mmgen")
def test_help_fits_80_columns_with_readable_metavars(argv: list[str], capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    assert info.value.code in (0, None)
    text = capsys.readouterr().out
    assert text.startswith(f"Usage: mmgen {' '.join(argv)}".rstrip())
    assert max(len(line) for line in text.splitlines()) <= 80
    for placeholder in ("<int>", "<str>", "<float>", "<list[", "{run_dir}", "╭"):
        assert placeholder not in text, placeholder
    if argv[:1] in (["parity"], ["generate"], ["export"]):
        assert text.splitlines()[0].endswith("[OPTIONS] RUN_DIR")
        assert "--steps INTEGER" in text or "--opset INTEGER" in text


def test_every_value_is_named() -> None:
    def walk(cmd):
        yield cmd
        for sub in (getattr(cmd, "commands", None) or {}).values():
            yield from walk(sub)

    for cmd in walk(command()):
        for param in cmd.params:
            if param.param_type_name == "argument" or not (param.is_flag or param.count):
                assert param.metavar and not set(param.metavar) & set("<>{}"), (cmd.name, param.name)


def test_list_options_take_repeats_and_comma_lists_alike() -> None:
    """export, build-engine and bench read --components the same way (split_list)."""
    from mmgen_deploy.cli.common import split_list

    assert split_list(["denoiser,decoder", " quantizer ", "", "a,,b"]) == ["denoiser", "decoder", "quantizer", "a", "b"]
    assert split_list(None) == [] and split_list([]) == []
