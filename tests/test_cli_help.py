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


def _parsed(argv: list[str]) -> dict:
    """The parameters Click parses from `mmgen ARGV` (nothing runs)."""
    root = command()
    cmd = root.commands[argv[0]]
    return cmd.make_context(argv[0], argv[1:], parent=root.make_context("mmgen", [argv[0]])).params


@pytest.mark.parametrize(("old", "new"), [
    (["parity", "R", "--batch", "2"], ["parity", "R", "--batch-sizes", "2"]),
    (["bench", "R", "--backends", "onnxruntime", "--precisions", "fp32", "--batch", "2", "-c", "decoder"],
     ["bench", "R", "--backend", "onnxruntime", "--precision", "fp32", "--batch-sizes", "2", "--components",
      "decoder"]),
    (["build-engine", "R", "--batch", "1:2:4", "--force", "--component", "decoder", "-c", "encoder"],
     ["build-engine", "R", "--batch-profile", "1:2:4", "--rebuild", "--components", "decoder", "--components",
      "encoder"]),
    (["export", "R", "-p", "fp32", "-c", "decoder"], ["export", "R", "--precision", "fp32", "--components", "decoder"]),
    (["import", "S", "-o", "R", "--force"], ["import", "S", "-o", "R", "--overwrite"]),
], ids=lambda argv: argv[0] if isinstance(argv, list) else "")
def test_old_spellings_still_parse_to_the_same_values(old: list[str], new: list[str]) -> None:
    assert _parsed(old) == _parsed(new)


def test_old_spellings_are_hidden_from_help(capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    for argv, hidden in ((["bench"], ("--backends", "--precisions", "--batch ", "-c,")),
                         (["build-engine"], ("--batch ", "--force", "--component ", "-c,")),
                         (["export"], ("-p,", "-c,")), (["import"], ("--force",)), (["parity"], ("--batch ",
                                                                                                 "--torch-threads"))):
        with pytest.raises(SystemExit):
            main([*argv, "--help"])
        text = capsys.readouterr().out
        assert not [h for h in hidden if h in text], (argv, text)
