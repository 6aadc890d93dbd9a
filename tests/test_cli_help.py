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


def _commands():
    """(`mmgen` subcommand path, Click command) for every command."""
    def walk(cmd, path):
        subcommands = getattr(cmd, "commands", None)
        if subcommands:
            for name, sub in subcommands.items():
                yield from walk(sub, [*path, name])
        else:
            yield " ".join(path), cmd

    yield from walk(command(), [])


def _visible_options():
    """(command, long name, short flags, metavar or None for a flag) of every option `--help` shows."""
    from mmgen_deploy.cli.common import visible_names

    for path, cmd in _commands():
        for param in cmd.params:
            if param.param_type_name != "option" or param.hidden:
                continue
            names = visible_names(param)
            long_names = [n for n in names if n.startswith("--")]
            shorts = tuple(n for n in names if not n.startswith("--"))
            yield path, long_names[0], long_names[1:], shorts, None if param.is_flag else param.metavar


def _uses() -> dict[str, list[str]]:
    uses: dict[str, list[str]] = {}
    for path, name, *_ in _visible_options():
        uses.setdefault(name, []).append(path)
    return uses


def test_every_shared_option_has_one_name_value_and_short_flag() -> None:
    """An option two commands take is in SHARED_OPTIONS, and takes the same kind of value and the same
    short flag in each; a short flag means one option everywhere; no command shows an old spelling."""
    from mmgen_deploy.cli.common import OLD_SPELLINGS, SHARED_OPTIONS

    uses = _uses()
    shared = {name for name, commands in uses.items() if len(commands) > 1}
    assert shared == set(SHARED_OPTIONS), (shared ^ set(SHARED_OPTIONS))
    short_meaning: dict[str, set[str]] = {}
    old = {spelling for spellings in OLD_SPELLINGS.values() for spelling in spellings if spelling.startswith("--")}
    for path, name, other_long, shorts, metavar in _visible_options():
        for short in shorts:
            short_meaning.setdefault(short, set()).add(name)
        assert not (set(other_long) | set(shorts) | {name}) & old, (path, name)
        if name in SHARED_OPTIONS:
            want = SHARED_OPTIONS[name]
            assert (metavar, shorts) == (want.value, (want.short,) if want.short else ()), (path, name)
    assert {s: names for s, names in short_meaning.items() if len(names) > 1} == {}


def test_docs_table_of_shared_options_is_the_code_s() -> None:
    from pathlib import Path

    from mmgen_deploy.cli.common import shared_options_markdown

    table = shared_options_markdown({name: commands for name, commands in _uses().items()})
    docs = (Path(__file__).parent.parent / "docs" / "cli.md").read_text()
    assert table in docs, "docs/cli.md: replace the shared-options table with\n" + table


@pytest.mark.parametrize("argv", [["generate", "R", "--stepz", "3"], ["generate", "R", "--steps", "q"], ["nothing"],
                                  ["generate"], ["bench", "R", "--precision"]], ids=" ".join)
def test_parser_errors_look_like_mmgen_errors(argv: list[str], capsys) -> None:
    """A mistyped option or value: one `error: ...` line on stderr and exit code 2, as mmgen's own
    usage errors, not Click's usage block with `Error:`."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert info.value.code == 2 and captured.out == ""
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Usage" not in captured.err, captured.err


def test_success_help_and_no_arguments_exit_as_before(capsys) -> None:
    for argv, code in ((["--version"], 0), (["info", "--help"], 0), ([], 2), (["train"], 2)):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == code, argv
        captured = capsys.readouterr()
        assert "Usage" in captured.out + captured.err or argv == ["--version"]


def test_docs_list_every_old_spelling() -> None:
    from pathlib import Path

    from mmgen_deploy.cli.common import OLD_SPELLINGS

    docs = (Path(__file__).parent.parent / "docs" / "cli.md").read_text().split("## Old spellings", 1)[1]
    rows = [line for line in docs.splitlines() if line.startswith("| ")]
    for new, olds in OLD_SPELLINGS.items():
        for old in olds:
            assert any(f"`{old}`" in row and f"`{new}`" in row for row in rows), (old, new)


def test_an_old_spelling_gets_a_note_naming_the_new_one(tmp_path, capsys) -> None:
    from mmgen_deploy.cli.common import old_spellings_in

    root = command()
    assert old_spellings_in(root, ["parity", "R", "--batch=2", "--steps", "3"]) == [("--batch", "--batch-sizes")]
    assert old_spellings_in(root, ["--debug", "export", "R", "-c", "decoder", "-p", "fp32"]) == [
        ("-p", "--precision"), ("-c", "--components")]
    assert old_spellings_in(root, ["generate", "R", "-c", "1", "-p", "x"]) == []  # -c/-p are --class/--prompt
    assert old_spellings_in(root, ["nothing", "--batch"]) == []
    assert old_spellings_in(root, ["parity", "R", "--torch-threads", "2"]) == [("--torch-threads", "--threads")]
    with pytest.raises(SystemExit) as info:
        main(["build-engine", str(tmp_path / "missing"), "--force"])
    err = capsys.readouterr().err
    assert info.value.code != 0 and "note: --force is now --rebuild" in err and "error:" in err


def test_every_seed_says_the_same_thing_about_what_it_repeats() -> None:
    """One definition per kind of seed: sampling commands promise the same images, training the same model,
    each with the conditions that promise needs (order, backend, precision, device, thread count)."""
    from mmgen_deploy.cli.common import SAMPLING_SEED_HELP, TRAINING_SEED_HELP

    seen: dict[str, str] = {}
    for path, cmd in _commands():
        for param in cmd.params:
            if "--seed" in getattr(param, "opts", ()):
                help_text = str(param.help)
                kind = "training" if help_text.startswith(TRAINING_SEED_HELP) else "sampling"
                assert help_text.startswith(SAMPLING_SEED_HELP if kind == "sampling" else TRAINING_SEED_HELP), path
                seen[path] = kind
    assert {name for name, kind in seen.items() if kind == "training"} >= {"train all", "train dit", "quickstart"}
    assert {name for name, kind in seen.items() if kind == "sampling"} >= {"generate", "client", "eval", "parity"}
    assert "thread count" in SAMPLING_SEED_HELP and "order" in SAMPLING_SEED_HELP
    assert "thread count" in TRAINING_SEED_HELP


def test_commands_that_run_one_backend_share_its_threads_option() -> None:
    """generate, batch, eval, bench and tune set the same thing with --threads, the backend's CPU threads, in
    the words of the one shared option; batch only adds what it also means under Ray."""
    from mmgen_deploy.cli.common import THREADS_OPTION

    shared = str(THREADS_OPTION.help)
    helps = {path: (str(param.help), param.min) for path, cmd in _commands() for param in cmd.params
             if "--threads" in getattr(param, "opts", ())}
    for path in ("generate", "eval", "bench", "tune"):
        assert helps[path] == (shared, 1), path
    batch_help, batch_min = helps["batch"]
    assert batch_help.startswith(shared) and "--ray" in batch_help and batch_min == 1
