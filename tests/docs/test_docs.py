"""The documentation site (``mkdocs.yml`` + ``docs/``): links, navigation, runnable examples, build.

What is checked:

* **Links.** Every relative link in ``docs/*.md``, ``docs/strategies/*.md`` (every page under
  ``docs/``) and ``README.md`` points to an existing file, and a ``#anchor`` on a Markdown target
  names one of its headings. Anchors are heading slugs as the page's renderer makes them: MkDocs
  (Python-Markdown ``toc``) for pages under ``docs/``, GitHub for ``README.md``. Links in code
  blocks, code spans and HTML comments are not links. A page under ``docs/`` must not link outside
  ``docs/`` or to a directory: MkDocs publishes only ``docs/``, so such links break on the site
  (name a source file as code instead: ``tokenreduce/adapters/llava.py``).
* **Navigation.** Every page under ``docs/`` is in the ``nav`` of ``mkdocs.yml`` exactly once, and
  every nav entry exists.
* **Set-up commands.** ``docs/index.md`` repeats the README's two set-up commands (the ``bash``
  blocks after ``<!-- main-command -->`` and ``<!-- test-command -->``) character for character.
* **Code examples run.** The fenced ``python`` blocks of each page under ``docs/`` are executed
  in order, in one namespace per page (later blocks see the names of earlier ones), in a fresh
  Python subprocess with a timeout of ``BLOCK_TIMEOUT_S`` seconds per page, from an empty
  temporary directory, with ``tests/`` on ``PYTHONPATH`` (as ``tests/conftest.py`` arranges for
  test modules, so examples may import ``oracle``), one torch thread and no Hugging Face Hub
  access. A failure names the page and line of the failing block and shows its traceback.
* **The site builds.** When ``mkdocs`` is installed, ``mkdocs build --strict`` succeeds (into a
  temporary directory, once per test session); without it the tests of the built site are skipped.
* **The built pages render.** In the built HTML (what a reader sees, not the Markdown), no
  paragraph or list item holds a line starting with ``- ``, ``* ``, ``+ `` or ``1. `` (a list that
  Python-Markdown did not render: a list right after a paragraph with no blank line between, or
  an item swallowed by a paragraph), and no literal ``**``, ``__`` or backtick is left in the text
  outside code. In the Markdown, a nested list is indented by 4 spaces (Python-Markdown
  flattens a list indented by 2, which GitHub would nest).
* **Examples stand alone.** A python block imports the modules it uses: a name that another block
  of the page imports (``torch``, ``tokenreduce``, ...) is imported again in every block using it,
  so that a reader can copy one block. Lines in python blocks, and in every block of the
  quickstart apart from the README's set-up commands, are at most ``CODE_LINE_MAX`` characters.

Opting a code block out (the ``# doc: skip`` convention): a ``python`` block that cannot run on a
CPU-only machine without downloads (a real 7B checkpoint, a GPU) starts with the marker comment
``# doc: skip`` on its **first line**, optionally followed by the reason, e.g.
``# doc: skip (needs the LLaVA-1.5-7B checkpoint)``. Such a block is not run; later blocks of the
page still are, so they must not depend on names it defines. Keep these few: an example that runs
is one that cannot silently rot. Blocks fenced with another language (``bash``, ``yaml``,
``text``, ...) are never run.
"""

from __future__ import annotations

import ast
import builtins
import importlib.util
import json
import os
import re
import subprocess
import sys
import unicodedata
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
README = REPO / "README.md"
MKDOCS_YML = REPO / "mkdocs.yml"

#: wall-clock limit for running all python blocks of one page (seconds)
BLOCK_TIMEOUT_S = 40
#: wall-clock limit for ``mkdocs build --strict`` (seconds)
BUILD_TIMEOUT_S = 60
#: the opt-out marker, on the first line of a python block
SKIP_MARKER = re.compile(r"^\s*#\s*doc:\s*skip\b")
#: README markers before the two set-up commands (also used by .ci/run for the test command)
SETUP_MARKERS = ("<!-- main-command -->", "<!-- test-command -->")
#: the longest line allowed in python blocks (and in the quickstart's blocks): readable without a scroll bar
CODE_LINE_MAX = 100


# =============================================================================================
# Markdown helpers
# =============================================================================================

_FENCE_OPEN = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")


@dataclass(frozen=True)
class Block:
    """A fenced code block.

    Attributes:
        lang: the first word of the info string, lower-cased (``""`` when none).
        line: 1-based line number of the first line *inside* the fence.
        code: the block's text, dedented by the fence's indentation, ending with a newline.
        n_lines: the number of lines inside the fence.
    """

    lang: str
    line: int
    code: str
    n_lines: int = 0  # lines inside the fence

    @property
    def skipped(self) -> bool:
        """Whether the block opts out of being run (``# doc: skip`` on its first line)."""
        first = self.code.splitlines()[0] if self.code.strip() else ""
        return bool(SKIP_MARKER.match(first))


def fenced_blocks(text: str) -> list[Block]:
    """The fenced code blocks (```` ``` ```` or ``~~~``, any indentation) of a Markdown text, in order.

    An unclosed fence runs to the end of the text (as CommonMark renders it).
    """
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE_OPEN.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence = len(m["indent"]), m["fence"]
        lang = (m["info"].split() or [""])[0].lower()
        close = re.compile(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not close.match(lines[j]):
            line = lines[j]
            strip = min(indent, len(line) - len(line.lstrip(" ")))
            body.append(line[strip:])
            j += 1
        blocks.append(Block(lang=lang, line=i + 2, code="\n".join(body) + "\n", n_lines=len(body)))
        i = j + 1
    return blocks


def code_lines(text: str) -> set[int]:
    """0-based indices of the lines of ``text`` inside fenced code blocks, the fences included."""
    lines: set[int] = set()
    for block in fenced_blocks(text):
        lines.update(range(block.line - 2, block.line + block.n_lines))
    return lines


def prose(text: str) -> str:
    """``text`` with code blocks, code spans and HTML comments blanked out; line numbers are kept."""
    code = code_lines(text)
    out = ["" if idx in code else line for idx, line in enumerate(text.splitlines())]
    joined = "\n".join(out)
    joined = re.sub(r"<!--.*?-->", lambda m: re.sub(r"[^\n]", " ", m.group(0)), joined, flags=re.S)
    return re.sub(r"(`+)(?!`)(.+?)(?<!`)\1(?!`)", lambda m: " " * len(m.group(0)), joined)


_ATX = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def heading_texts(text: str) -> list[str]:
    """The text of every ATX heading (``# ...``) outside code blocks, inline markup removed."""
    code = code_lines(text)
    texts = []
    for idx, line in enumerate(text.splitlines()):
        if idx in code:
            continue
        m = _ATX.match(line)
        if m:
            raw = m.group(2)
            raw = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", raw)  # links -> their text
            raw = re.sub(r"<[^>]+>", "", raw)  # inline HTML tags
            raw = raw.replace("`", "").replace("**", "").replace("*", "")
            texts.append(raw)
    return texts


def slug_mkdocs(text: str) -> str:
    """Python-Markdown's ``toc`` slug (MkDocs' default): ASCII-folded, punctuation removed,
    lower-cased, runs of spaces and hyphens joined into one ``-``."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def slug_github(text: str) -> str:
    """GitHub's heading anchor: lower-cased, punctuation other than ``-`` and ``_`` removed, every
    space a ``-`` (runs are not joined)."""
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(text: str, style: str) -> set[str]:
    """Heading anchors of a Markdown text under ``style`` ``"mkdocs"`` or ``"github"``, with the
    renderer's suffixes for repeated headings (MkDocs ``_1``, GitHub ``-1``), plus explicit HTML
    anchors (``id="..."`` / ``name="..."``)."""
    if style not in ("mkdocs", "github"):
        raise ValueError(f"unknown anchor style {style!r}; expected 'mkdocs' or 'github'")
    slug = slug_mkdocs if style == "mkdocs" else slug_github
    sep = "_" if style == "mkdocs" else "-"
    seen: set[str] = set()
    for heading in heading_texts(text):
        base = slug(heading)
        anchor, k = base, 0
        while anchor in seen or not anchor:
            k += 1
            anchor = f"{base}{sep}{k}"
        seen.add(anchor)
    seen.update(re.findall(r"""<[^>]+\b(?:id|name)\s*=\s*["']([^"']+)["']""", prose(text)))
    return seen


_INLINE_LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(?:<([^>]*)>|([^\s()]*(?:\([^\s()]*\)[^\s()]*)*))(?:\s+(?:\"[^\"]*\"|'[^']*'|\([^)]*\)))?\s*\)"
)
_REF_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?([^\s>]+)>?", re.M)
_HTML_LINK = re.compile(r"""\b(?:href|src)\s*=\s*["']([^"']+)["']""")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def links(text: str) -> list[tuple[int, str]]:
    """``(line, target)`` of every link and image in the prose of a Markdown text: inline links,
    reference definitions and HTML ``href`` / ``src``."""
    body = prose(text)
    found: list[tuple[int, str]] = []
    for pattern in (_INLINE_LINK, _REF_DEF, _HTML_LINK):
        for m in pattern.finditer(body):
            target = next((g for g in m.groups() if g is not None), "")
            found.append((body.count("\n", 0, m.start()) + 1, target.strip()))
    return sorted(found)


def check_links(page: Path, docs_dir: Path = DOCS, repo: Path = REPO) -> list[str]:
    """Problems with the relative links of ``page``, one message each (empty: all fine)."""
    in_docs = page.resolve().is_relative_to(docs_dir.resolve())
    rel = page.resolve().relative_to(repo.resolve()) if page.resolve().is_relative_to(repo.resolve()) else page
    problems = []
    for line, target in links(page.read_text(encoding="utf-8")):
        where = f"{rel}:{line}: link {target!r}"
        if not target:
            problems.append(f"{where}: empty link target")
            continue
        if _SCHEME.match(target) or target.startswith("//"):
            continue  # external (https:, mailto:, ...)
        path_part, _, anchor = target.partition("#")
        path_part = unquote(path_part.split("?", 1)[0])
        if path_part.startswith("/"):
            problems.append(f"{where}: absolute path; use a link relative to the page")
            continue
        dest = (page.parent / path_part).resolve() if path_part else page.resolve()
        if not dest.exists():
            problems.append(f"{where}: {path_part} does not exist (resolved to {dest})")
            continue
        if in_docs and not dest.is_relative_to(docs_dir.resolve()):
            problems.append(
                f"{where}: points outside {docs_dir.name}/, which MkDocs does not publish "
                "(the link breaks on the site); name the file as code instead"
            )
            continue
        if in_docs and dest.is_dir():
            problems.append(f"{where}: a directory; link a page in it")
            continue
        if anchor and dest.suffix == ".md":
            dest_style = "mkdocs" if dest.is_relative_to(docs_dir.resolve()) and in_docs else "github"
            known = anchors(dest.read_text(encoding="utf-8"), dest_style)
            if unquote(anchor) not in known:
                problems.append(
                    f"{where}: no heading with anchor #{anchor} in {dest.name} ({dest_style} slugs; "
                    f"anchors there: {', '.join(sorted(known)) or 'none'})"
                )
    return problems


def doc_pages(docs_dir: Path = DOCS) -> list[Path]:
    """Every Markdown page under ``docs_dir``, sorted."""
    return sorted(docs_dir.rglob("*.md"))


def _page_id(page: Path) -> str:
    return str(page.relative_to(REPO))


# =============================================================================================
# mkdocs.yml
# =============================================================================================


class _TolerantLoader(yaml.SafeLoader):
    """SafeLoader that reads MkDocs' custom tags (``!ENV``, ``!!python/name:``) as ``None``."""


_TolerantLoader.add_multi_constructor("!", lambda loader, suffix, node: None)
_TolerantLoader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)


def load_mkdocs_config(path: Path = MKDOCS_YML) -> dict:
    with path.open(encoding="utf-8") as fh:
        config = yaml.load(fh, Loader=_TolerantLoader)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(config).__name__}")
    return config


def nav_entries(nav) -> list[str]:
    """The page paths of a MkDocs ``nav`` (nested sections flattened, external URLs left out)."""
    out: list[str] = []
    items = nav if isinstance(nav, list) else [nav]
    for item in items:
        values = list(item.values()) if isinstance(item, dict) else [item]
        for value in values:
            if isinstance(value, (list, dict)):
                out.extend(nav_entries(value))
            elif isinstance(value, str) and not _SCHEME.match(value):
                out.append(value)
    return out


# =============================================================================================
# Rendering: the built HTML, nested lists in the Markdown, code blocks
# =============================================================================================

_UNRENDERED_LIST = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+\S")
_LITERAL_MARKUP = ("**", "__", "`")


class _TextBlocks(HTMLParser):
    """The text of each paragraph, list item, table cell and heading of an HTML page, code left out."""

    BLOCKS = frozenset({"p", "li", "td", "th", "h1", "h2", "h3", "h4", "h5", "h6", "dd", "dt"})
    CODE = frozenset({"code", "pre", "script", "style"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[tuple[str, str]] = []
        self._open: list[list[str]] = []  # [tag, own text] of the open blocks, innermost last
        self._code = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.CODE:
            self._code += 1
        elif tag in self.BLOCKS:
            self._open.append([tag, ""])

    def handle_endtag(self, tag):
        if tag in self.CODE:
            self._code = max(0, self._code - 1)
        elif tag in self.BLOCKS and self._open and self._open[-1][0] == tag:
            self.blocks.append(tuple(self._open.pop()))

    def handle_data(self, data):
        if self._open and not self._code:
            self._open[-1][1] += data


def main_content(html: str) -> str:
    """The page's own content: the theme's ``role="main"`` element when present (no navigation)."""
    m = re.search(r"<div[^>]*role=\"main\"[^>]*>(.*)", html, flags=re.S)
    return m.group(1) if m else html


def rendering_problems(html: str) -> list[str]:
    """What did not render in an HTML page: a paragraph, list item or cell with a line that starts
    like a list item, or literal Markdown emphasis / code markers in the text outside code."""
    parser = _TextBlocks()
    parser.feed(main_content(html))
    problems = []
    for tag, text in parser.blocks:
        lines = text.splitlines()
        listed = [line.strip() for line in lines[1:] if _UNRENDERED_LIST.match(line)]
        if lines and tag == "p" and _UNRENDERED_LIST.match(lines[0]):
            listed.insert(0, lines[0].strip())
        if listed:
            problems.append(f"<{tag}> holds a list that did not render: {listed[0][:80]!r}")
        for mark in _LITERAL_MARKUP:
            if mark in text:
                at = text.index(mark)
                problems.append(f"<{tag}> shows a literal {mark!r}: {text[max(0, at - 40) : at + 40].strip()!r}")
    return problems


_LIST_ITEM = re.compile(r"^(?P<indent> *)(?:[-*+]|\d+[.)])\s+\S")


def shallow_nested_items(text: str) -> list[int]:
    """1-based lines of list items nested by 1-3 spaces under another item (outside code blocks):
    Python-Markdown needs 4 and renders such a list flat."""
    code = code_lines(text)
    found, in_list = [], False
    lines = text.splitlines()
    for idx, line in enumerate(lines):
        if idx in code:
            in_list = False
            continue
        m = _LIST_ITEM.match(line)
        if m:
            if in_list and 0 < len(m["indent"]) < 4:
                found.append(idx + 1)
            in_list = True
        elif line.strip() and not line.startswith(" ") and idx and not lines[idx - 1].strip():
            in_list = False  # a paragraph after a blank line ends the list
    return found


def _bound_names(tree: ast.AST) -> tuple[set[str], set[str]]:
    """``(imported, defined)``: names bound by import statements, and by any other binding."""
    imported: set[str] = set()
    defined: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.update(a.asname or a.name for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            defined.add(node.id)
        elif isinstance(node, ast.arg):
            defined.add(node.arg)
    return imported, defined


def missing_imports(blocks: list[Block]) -> list[str]:
    """Names a python block uses without importing them while another block of the page imports
    them (the block runs only after the other one: a reader copying it alone gets a NameError)."""
    trees = []
    for block in blocks:
        try:
            trees.append((block, ast.parse(block.code)))
        except SyntaxError:
            continue  # test_python_blocks_run reports it
    imported_anywhere = set().union(*(_bound_names(tree)[0] for _, tree in trees)) if trees else set()
    problems = []
    for block, tree in trees:
        imported, defined = _bound_names(tree)
        used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        missing = sorted((used & imported_anywhere) - imported - defined - set(dir(builtins)))
        if missing:
            problems.append(f"the python block at line {block.line} uses {', '.join(missing)} without importing it")
    return problems


def long_code_lines(
    text: str, limit: int = CODE_LINE_MAX, langs: tuple[str, ...] | None = ("python", "py")
) -> list[str]:
    """``line N (L chars)`` for each line longer than ``limit`` in the fenced blocks of ``langs``
    (``None``: every block)."""
    found = []
    for block in fenced_blocks(text):
        if langs is not None and block.lang not in langs:
            continue
        for k, line in enumerate(block.code.splitlines()):
            if len(line) > limit:
                found.append(f"line {block.line + k} ({len(line)} chars, {block.lang or 'no language'})")
    return found


# =============================================================================================
# Self-tests of the helpers (so that a checker that finds nothing is known to be able to)
# =============================================================================================


def test_slugs_follow_mkdocs_and_github():
    assert (
        slug_mkdocs("Position ids: an ablation")
        == slug_github("Position ids: an ablation")
        == "position-ids-an-ablation"
    )
    heading = heading_texts("## Positions (`[A, B, S]`)\n")[0]
    assert slug_mkdocs(heading) == slug_github(heading) == "positions-a-b-s"
    assert slug_mkdocs("A -- b") == "a-b" and slug_github("A -- b") == "a----b"
    assert slug_mkdocs("`pio_ve`: PIO's mode") == "pio_ve-pios-mode"
    text = "# Intro\n\n```bash\n# not a heading\n```\n\n## Intro\n"
    assert anchors(text, "mkdocs") == {"intro", "intro_1"}
    assert anchors(text, "github") == {"intro", "intro-1"}


def test_fenced_blocks_and_skip_marker():
    text = (
        "text\n\n```python\nx = 1\n```\n\n"
        "- item\n\n  ~~~py\n  # doc: skip (needs a GPU)\n  y = 2\n  ~~~\n\n"
        "````markdown\n```python\nnot a block\n```\n````\n"
    )
    blocks = fenced_blocks(text)
    assert [(b.lang, b.line) for b in blocks] == [("python", 4), ("py", 10), ("markdown", 15)]
    assert blocks[0].code == "x = 1\n" and not blocks[0].skipped
    assert blocks[1].code.startswith("# doc: skip") and blocks[1].skipped
    assert "not a block" in blocks[2].code


def test_link_checker_finds_broken_links(tmp_path):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (tmp_path / "src.py").write_text("")
    (docs / "b.md").write_text("# Title\n\n## Some section: here\n")
    (docs / "sub" / "c.md").write_text("# C\n")
    (docs / "a.md").write_text(
        "[ok](b.md) [ok anchor](b.md#some-section-here) [ok nested](sub/c.md) [self](#local)\n"
        "## Local\n"
        "[missing](nope.md) [bad anchor](b.md#nothing) [outside](../src.py) [dir](sub/)\n"
        "`[in code](gone.md)` <https://example.com> [web](https://example.com/x#y)\n"
        "```text\n[in a block](gone.md)\n```\n"
        "[ref]: also-missing.md\n"
    )
    problems = check_links(docs / "a.md", docs_dir=docs, repo=tmp_path)
    flagged = sorted(re.search(r"link '([^']*)'", p).group(1) for p in problems)
    assert flagged == ["../src.py", "also-missing.md", "b.md#nothing", "nope.md", "sub/"], problems
    readme = tmp_path / "README.md"
    readme.write_text("[page](docs/b.md#some-section-here) [src](src.py) [bad](docs/b.md#title-1)\n")
    problems = check_links(readme, docs_dir=docs, repo=tmp_path)
    assert len(problems) == 1 and "#title-1" in problems[0], problems


def test_rendering_checks_find_lists_that_did_not_render():
    markdown = pytest.importorskip("markdown", reason="Python-Markdown comes with mkdocs")
    broken = (
        "Tested:\n- one\n- two\n\n"  # a list right after a paragraph
        "- **A.** item:\n  - nested by 2\n\n  a paragraph of A\n- **B.** swallowed\n\n"
        "Some **bold text left open.\n"
    )
    html = markdown.markdown(broken, extensions=["tables", "fenced_code"])
    problems = rendering_problems(html)
    assert any("'- one'" in p for p in problems), problems
    assert any("'- **B.** swallowed'" in p or "'- B. swallowed'" in p for p in problems), problems
    assert any("literal '**'" in p for p in problems), problems
    assert shallow_nested_items(broken) == [6]
    fixed = (
        "Tested:\n\n- one\n- two\n\n"
        "- **A.** item:\n    - nested by 4\n\n    a paragraph of A\n\n- **B.** an item\n\n"
        "Some **bold** text and `**kwargs` in code.\n\n```python\n- not a list\n```\n"
    )
    assert rendering_problems(markdown.markdown(fixed, extensions=["tables", "fenced_code"])) == []
    assert shallow_nested_items(fixed) == []


def test_import_and_line_length_checks_find_problems():
    page = (
        "```python\nimport torch\nfrom x import y\nz = torch.ones(1)\n```\n"
        "```python\nw = torch.zeros(1) + y(z)  # torch and y come from the block above\n```\n"
        "```python\nimport torch\n\ndef f(y):\n    return torch.ones(y)\n```\n"
        f"```python\nq = '{'x' * 120}'\n```\n```bash\necho {'x' * 120}\n```\n"
    )
    blocks = fenced_blocks(page)
    assert missing_imports(blocks) == [f"the python block at line {blocks[1].line} uses torch, y without importing it"]
    assert long_code_lines(page) == [f"line {blocks[3].line} (126 chars, python)"]
    assert len(long_code_lines(page, langs=None)) == 2


def test_nav_entries_flatten_sections():
    nav = [
        {"Home": "index.md"},
        {"Strategies": [{"a": "strategies/a.md"}, "strategies/b.md"]},
        {"Web": "https://x.org"},
    ]
    assert nav_entries(nav) == ["index.md", "strategies/a.md", "strategies/b.md"]


# =============================================================================================
# (a) links
# =============================================================================================


@pytest.mark.parametrize("page", [*doc_pages(), README], ids=_page_id)
def test_relative_links_resolve(page):
    problems = check_links(page)
    assert not problems, "broken links:\n" + "\n".join(problems)


# =============================================================================================
# (b) navigation
# =============================================================================================


def test_every_page_is_in_the_nav_and_every_nav_entry_exists():
    config = load_mkdocs_config()
    docs_dir = (REPO / config.get("docs_dir", "docs")).resolve()
    assert docs_dir == DOCS.resolve(), f"mkdocs.yml docs_dir is {config.get('docs_dir')!r}; the pages live in docs/"
    assert "nav" in config, "mkdocs.yml has no nav"
    entries = nav_entries(config["nav"])
    missing = [e for e in entries if not (docs_dir / e).is_file()]
    assert not missing, f"nav entries of mkdocs.yml without a page under docs/: {missing}"
    repeated = sorted({e for e in entries if entries.count(e) > 1})
    assert not repeated, f"pages listed more than once in the nav: {repeated}"
    pages = {p.relative_to(docs_dir).as_posix() for p in doc_pages(docs_dir)}
    left_out = sorted(pages - set(entries))
    assert not left_out, f"pages under docs/ missing from the nav of mkdocs.yml: {left_out}"
    assert entries[0] == "index.md", f"the first nav entry (the home page) is {entries[0]!r}, expected 'index.md'"


# =============================================================================================
# the quickstart repeats the README's set-up commands
# =============================================================================================


def block_after(text: str, marker: str, source: str) -> str:
    """The first fenced block after the line holding ``marker``."""
    lines = text.splitlines()
    at = next((i for i, line in enumerate(lines) if line.strip() == marker), None)
    if at is None:
        raise AssertionError(f"{source} has no line {marker!r}")
    blocks = [b for b in fenced_blocks("\n".join(lines[at:]))]
    if not blocks:
        raise AssertionError(f"{source} has no code block after {marker!r}")
    return blocks[0].code


@pytest.mark.parametrize("marker", SETUP_MARKERS)
def test_quickstart_setup_commands_equal_readme(marker):
    readme = block_after(README.read_text(encoding="utf-8"), marker, "README.md")
    index = block_after((DOCS / "index.md").read_text(encoding="utf-8"), marker, "docs/index.md")
    assert readme.strip(), f"README.md: the block after {marker} is empty"
    assert index == readme, (
        f"docs/index.md's command after {marker} differs from README.md's:\n"
        f"  README: {readme!r}\n  index:  {index!r}\ncopy it from README.md"
    )


def test_quickstart_has_a_runnable_example():
    blocks = [b for b in fenced_blocks((DOCS / "index.md").read_text(encoding="utf-8")) if b.lang in ("python", "py")]
    runnable = "".join(b.code for b in blocks if not b.skipped)
    assert "tokenreduce.apply(" in runnable and "load_reference(" in runnable, (
        "docs/index.md must show a runnable (not '# doc: skip') python example that loads the reference "
        "model and applies a plan"
    )


# =============================================================================================
# (c) the python blocks of each page run
# =============================================================================================

_RUNNER = r"""
import json, sys, traceback
blocks = json.loads(open(sys.argv[1], encoding="utf-8").read())
namespace = {"__name__": "__main__"}
for block in blocks:
    # pad with blank lines so that tracebacks point at the line in the Markdown file
    code = compile("\n" * (block["line"] - 1) + block["code"], block["file"], "exec")
    try:
        exec(code, namespace)
    except BaseException:
        sys.stderr.write(f"\nDOC BLOCK FAILED: the python block at {block['page']}:{block['line']}\n")
        traceback.print_exc()
        sys.exit(1)
"""


def python_blocks(page: Path) -> list[Block]:
    return [b for b in fenced_blocks(page.read_text(encoding="utf-8")) if b.lang in ("python", "py")]


def _pages_with_python() -> list[Path]:
    return [p for p in doc_pages() if python_blocks(p)]


def _doc_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        MPLBACKEND="Agg",
    )
    # the checkout first: the examples run against the code the tests run against (an installed copy may be older)
    paths = (str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", ""))
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


@pytest.mark.parametrize("page", _pages_with_python(), ids=_page_id)
def test_python_blocks_run(page, tmp_path):
    blocks = python_blocks(page)
    runnable = [b for b in blocks if not b.skipped]
    if not runnable:
        pytest.skip(f"every python block of {_page_id(page)} is marked '# doc: skip'")
    spec = [{"page": _page_id(page), "file": str(page), "line": b.line, "code": b.code} for b in runnable]
    spec_file = tmp_path / "blocks.json"
    spec_file.write_text(json.dumps(spec), encoding="utf-8")
    work = tmp_path / "cwd"
    work.mkdir()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _RUNNER, str(spec_file)],
            cwd=work,
            env=_doc_env(),
            capture_output=True,
            text=True,
            timeout=BLOCK_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"the python blocks of {_page_id(page)} did not finish in {BLOCK_TIMEOUT_S} s "
            f"(blocks at lines {[b.line for b in runnable]}); make them faster or mark a block '# doc: skip'"
        )
    if proc.returncode != 0:
        pytest.fail(
            f"a python block of {_page_id(page)} fails (exit {proc.returncode}); fix it, or mark a block that "
            f"cannot run on CPU here with '# doc: skip' on its first line.\n"
            f"--- stderr (tail) ---\n{proc.stderr[-6000:]}\n--- stdout (tail) ---\n{proc.stdout[-2000:]}",
            pytrace=False,
        )


# =============================================================================================
# (d) mkdocs build --strict
# =============================================================================================


@pytest.fixture(scope="module")
def built_site(tmp_path_factory):
    """``(process, site folder)`` of one ``mkdocs build --strict`` for all the tests of the built site."""
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed, so the strict site build is not checked (pip install mkdocs)")
    site = tmp_path_factory.mktemp("site")
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "mkdocs",
                "build",
                "--strict",
                "--config-file",
                str(MKDOCS_YML),
                "--site-dir",
                str(site),
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"mkdocs build --strict did not finish in {BUILD_TIMEOUT_S} s")
    return proc, site


def _page_html(site: Path, entry: str) -> Path:
    stem = entry[: -len(".md")]
    return site / ("index.html" if stem == "index" else f"{stem}/index.html")


def test_mkdocs_build_strict(built_site):
    proc, site = built_site
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    for entry in nav_entries(load_mkdocs_config()["nav"]):
        html = _page_html(site, entry)
        assert html.is_file(), f"the build has no page for nav entry {entry!r} (expected {html})"


def test_built_pages_render_lists_and_markup(built_site):
    proc, site = built_site
    if proc.returncode != 0:
        pytest.fail("the site did not build (see test_mkdocs_build_strict)", pytrace=False)
    problems = []
    for entry in nav_entries(load_mkdocs_config()["nav"]):
        html = _page_html(site, entry)
        problems += [
            f"docs/{entry} (built {html.relative_to(site)}): {p}" for p in rendering_problems(html.read_text())
        ]
    assert not problems, (
        "what the built site shows as text instead of rendering it (Python-Markdown needs a blank line before a "
        "list that follows a paragraph, and 4-space indents for nested lists and an item's later paragraphs):\n"
        + "\n".join(problems)
    )


@pytest.mark.parametrize("page", doc_pages(), ids=_page_id)
def test_nested_lists_are_indented_by_four_spaces(page):
    lines = shallow_nested_items(page.read_text(encoding="utf-8"))
    assert not lines, (
        f"{_page_id(page)}: nested list items indented by fewer than 4 spaces at lines {lines}; Python-Markdown "
        "(the site) renders them flat: indent them (and their continuation lines) by 4"
    )


@pytest.mark.parametrize("page", _pages_with_python(), ids=_page_id)
def test_python_blocks_import_what_they_use(page):
    problems = missing_imports([b for b in python_blocks(page)])
    assert not problems, f"{_page_id(page)}: " + "; ".join(problems) + " (a block a reader copies must run alone)"


@pytest.mark.parametrize("page", doc_pages(), ids=_page_id)
def test_code_lines_are_short(page):
    text = page.read_text(encoding="utf-8")
    long = long_code_lines(text)
    if page == DOCS / "index.md":  # every block of the quickstart, except the README's set-up commands
        setup = {block_after(text, marker, "docs/index.md") for marker in SETUP_MARKERS}
        others = "".join(f"```{b.lang}\n{b.code}```\n" for b in fenced_blocks(text) if b.code not in setup)
        long = sorted(set(long) | {f"{x} [quickstart]" for x in long_code_lines(others, langs=None)})
    assert not long, f"{_page_id(page)}: code lines over {CODE_LINE_MAX} characters: {', '.join(long)}"
