"""The documentation (README.md and docs/*.md) points only at things that exist: relative links and
their #anchors, repository paths, `s4bt_hf.…` names and `python -m` modules; every docs page is
reachable from the README."""

import importlib
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.DOTALL)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
# Paths into the repository's own folders; "runs/…" and "exported/" are user output, not ours.
REPO_PATH = re.compile(r"(?<![\w./-])((?:s4bt_hf|tests|bench|examples|docs)/[\w./-]*)")
DOTTED_NAME = re.compile(r"(?<![\w./-])(s4bt_hf(?:\.\w+)+)")
RUN_MODULE = re.compile(r"(?:^|\s)-m\s+(s4bt_hf(?:\.\w+)*)")


def without_code(text):
    """The prose of a page: fenced blocks and inline code removed (links in code are not links)."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def github_anchor(heading):
    """The anchor GitHub gives a heading: markup dropped, lower case, punctuation other than '-'
    and '_' removed, spaces turned into '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = text.replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path):
    """Every heading anchor of a Markdown file (repeated headings get -1, -2, ... as on GitHub)."""
    seen = {}
    found = set()
    for line in FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        anchor = github_anchor(match.group(1))
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        found.add(anchor if count == 0 else f"{anchor}-{count}")
    return found


def relative_links(page):
    for target in LINK.findall(without_code(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        yield target


def test_pages_exist():
    assert (ROOT / "README.md").is_file()
    assert len(PAGES) > 1, "docs/ holds no page"


@pytest.mark.parametrize("page", PAGES, ids=lambda path: str(path.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in relative_links(page):
        file_part, _, anchor = target.partition("#")
        destination = (page.parent / file_part).resolve() if file_part else page
        if not destination.exists():
            broken.append(f"{target}: no such file")
        elif anchor and (destination.suffix != ".md" or anchor not in anchors(destination)):
            broken.append(f"{target}: no heading with anchor #{anchor} in {destination.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=lambda path: str(path.relative_to(ROOT)))
def test_repository_paths_exist(page):
    text = page.read_text(encoding="utf-8")
    paths = {path.rstrip(".") for path in REPO_PATH.findall(text)}
    missing = sorted(path for path in paths if not (ROOT / path).exists())
    assert not missing, f"{page.relative_to(ROOT)} mentions paths that do not exist: {missing}"


def resolve_dotted(name):
    """Import the longest module prefix of `name`, then look the rest up as attributes."""
    parts = name.split(".")
    for split in range(len(parts), 0, -1):
        module_name = ".".join(parts[:split])
        try:
            found = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name is not None and module_name.startswith(error.name):
                continue  # this prefix is not a module: try a shorter one
            raise
        for attribute in parts[split:]:
            found = getattr(found, attribute)
        return found
    raise ModuleNotFoundError(name)


@pytest.mark.parametrize("page", PAGES, ids=lambda path: str(path.relative_to(ROOT)))
def test_dotted_names_resolve(page):
    names = set(DOTTED_NAME.findall(page.read_text(encoding="utf-8")))
    unresolved = []
    for name in sorted(names):
        try:
            resolve_dotted(name)
        except (ImportError, AttributeError) as error:
            unresolved.append(f"{name} ({error})")
    assert not unresolved, f"{page.relative_to(ROOT)} names what does not exist: {unresolved}"


@pytest.mark.parametrize("page", PAGES, ids=lambda path: str(path.relative_to(ROOT)))
def test_run_modules_are_runnable(page):
    """`python -m NAME` needs a module, or a package with a __main__ module."""
    not_runnable = []
    for name in sorted(set(RUN_MODULE.findall(page.read_text(encoding="utf-8")))):
        spec = importlib.util.find_spec(name)
        if spec is None:
            not_runnable.append(f"{name} (no such module)")
        elif spec.submodule_search_locations is not None and importlib.util.find_spec(f"{name}.__main__") is None:
            not_runnable.append(f"{name} (a package without __main__.py)")
    assert not not_runnable, f"{page.relative_to(ROOT)}: `-m` cannot run {not_runnable}"


def test_every_docs_page_is_linked_from_the_readme():
    readme = ROOT / "README.md"
    linked = {(readme.parent / target.partition("#")[0]).resolve() for target in relative_links(readme)}
    unlinked = [str(page.relative_to(ROOT)) for page in PAGES[1:] if page.resolve() not in linked]
    assert not unlinked, f"docs pages not linked from README.md: {unlinked}"


def test_github_anchor():
    assert github_anchor("The paper's experiment (`make reproduce`)") == "the-papers-experiment-make-reproduce"
    assert github_anchor("Which method, without retraining? (`s4bt compare-reductions`)") == (
        "which-method-without-retraining-s4bt-compare-reductions"
    )
    arms = "Compression-aware arms (`--compression-aware`)"
    assert github_anchor(arms) == "compression-aware-arms---compression-aware"
