"""The user docs stay true to the CLI: every option a command shows is on its docs page, links resolve."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from mmgen_deploy.cli.app import command
from mmgen_deploy.cli.common import OLD_SPELLINGS, visible_names

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

# The page that documents each command (its options table or text).
COMMAND_PAGES = {
    "quickstart": ["training.md"], "train": ["training.md"], "eval": ["training.md"],
    "import": ["import.md"], "export": ["export.md", "quantization.md"], "build-engine": ["tensorrt.md"],
    "generate": ["generate.md"], "parity": ["parity-and-bench.md"], "bench": ["parity-and-bench.md"],
    "serve": ["serving.md"], "client": ["serving.md"], "triton-repo": ["serving.md"], "batch": ["batch.md"],
    "info": ["run-directory.md"], "doctor": ["backends.md"], "distill": ["distill.md"],
    "tune": ["tune.md"],
}


def _leaf_commands() -> list[tuple[str, click.Command]]:
    def walk(cmd: click.Command, path: list[str]):
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in subs.items():
                yield from walk(sub, [*path, name])
        else:
            yield " ".join(path), cmd

    return list(walk(command(), []))


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md")), *sorted((ROOT / "benchmarks").glob("*.md"))]


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    return {re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            for m in re.finditer(r"^#+\s+(.*)$", page.read_text(), re.M)}


def test_every_command_has_a_page() -> None:
    top = {name.split()[0] for name, _ in _leaf_commands()}
    assert top == set(COMMAND_PAGES), top ^ set(COMMAND_PAGES)


@pytest.mark.parametrize("name,cmd", _leaf_commands(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_visible_option_is_on_the_command_page(name: str, cmd: click.Command) -> None:
    text = "".join((DOCS / page).read_text() for page in COMMAND_PAGES[name.split()[0]])
    missing = []
    for param in cmd.params:
        if param.param_type_name == "argument" or getattr(param, "hidden", False):
            continue
        long_names = [o for o in visible_names(param) if o.startswith("--") and o != "--help"]
        if long_names and not any(re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", text) for o in long_names):
            missing.append(long_names[0])
    assert not missing, f"mmgen {name}: {missing} not on {COMMAND_PAGES[name.split()[0]]}"


@pytest.mark.parametrize("name,cmd", _leaf_commands(), ids=lambda v: v if isinstance(v, str) else "")
def test_short_flags_are_given_with_their_option(name: str, cmd: click.Command) -> None:
    """A page names an option's short flag the way --help does: `-n, --n`."""
    text = "".join((DOCS / page).read_text() for page in COMMAND_PAGES[name.split()[0]])
    missing = []
    for param in cmd.params:
        names = visible_names(param) if param.param_type_name != "argument" else []
        long_names = [n for n in names if n.startswith("--")]
        missing += [f"{short}, {long_names[0]}" for short in names
                    if not short.startswith("--") and long_names and f"`{short}, {long_names[0]}" not in text]
    assert not missing, f"mmgen {name}: {missing} not on {COMMAND_PAGES[name.split()[0]]}"


def test_readme_lists_every_command_and_stays_short() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    for top in COMMAND_PAGES:
        assert f"`mmgen {top}" in readme or f"`{top}`" in readme, top
    assert "make demo" in readme and "make test" in readme


def test_relative_links_and_anchors_resolve() -> None:
    broken = []
    for page in _markdown_files():
        for link in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", link):
                continue
            path, _, anchor = link.partition("#")
            target = (page.parent / path).resolve() if path else page
            if not target.exists():
                broken.append(f"{page.relative_to(ROOT)}: {link}")
            elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
                broken.append(f"{page.relative_to(ROOT)}: {link} (no such heading)")
    assert not broken, broken


def test_docs_say_why_not_when() -> None:
    """History belongs in git: no work sessions or issue numbers in the user docs."""
    pattern = re.compile(r"\b(this|later|previous|earlier|next) session\b|\bissues? #?\d+", re.I)
    found = [f"{page.relative_to(ROOT)}: {m.group(0)}" for page in _markdown_files()
             for m in pattern.finditer(page.read_text())]
    assert not found, found


def test_docs_teach_the_current_spellings() -> None:
    """Examples in the docs use the names `--help` shows, not the old spellings kept for scripts."""
    old = {name for names in OLD_SPELLINGS.values() for name in names if name.startswith("--")}
    # --batch is old only where --batch-sizes / --batch-profile replaced it; no command shows it now.
    found = []
    for page in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        if page.name == "cli.md":  # the table of old spellings
            continue
        for block in re.findall(r"```(?:bash)?\n(.*?)```", page.read_text(), re.S):
            for line in block.splitlines():
                if line.lstrip().startswith("mmgen "):
                    found += [f"{page.name}: {o} in {line.strip()[:60]}" for o in old
                              if re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", line)]
    assert not found, found


def test_the_generate_page_states_the_sampling_defaults_and_bounds() -> None:
    """The docs say what `defaults.SAMPLING` holds (the CLI's options and the library read it)."""
    from mmgen_deploy.defaults import SAMPLING

    rows = {line.split("|")[1].strip(): line for line in (DOCS / "generate.md").read_text().splitlines()
            if line.startswith("| `")}
    assert f"({SAMPLING.batch_size}, at most {SAMPLING.max_batch_size})" in rows["`-b, --batch-size`"]
    assert f"({SAMPLING.steps})" in rows["`--steps`"]
    assert f"`{SAMPLING.sampler}` (default)" in rows["`--sampler`"]
    assert f"in 0..{SAMPLING.max_cfg_scale:g} ({SAMPLING.cfg_scale})" in rows["`--cfg-scale`"]
    assert f"in 0..{SAMPLING.max_eta:g}" in rows["`--eta`"]
