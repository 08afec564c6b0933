"""Every relative link in README.md and docs/*.md resolves to a file, and an #anchor to a heading
of the file it points to (GitHub's slugs)."""
import glob
import os
import re
from urllib.parse import unquote

import pytest

from conftest import ROOT

PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def prose(text):
    """The page's lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.split("\n"):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def slug(heading):
    """GitHub's anchor for a heading: its text (markup stripped), lower case, every character
    but letters, digits, spaces, hyphens and underscores dropped, spaces turned into hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)   # a link's text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")      # html tags, code marks
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path):
    """The anchors of a markdown file's headings; repeated slugs get -1, -2, ... as on GitHub."""
    seen, out = {}, set()
    with open(path, encoding="utf-8") as f:
        for line in prose(f.read()):
            m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
            if not m:
                continue
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def relative_links(path):
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(prose(f.read()), 1):
            for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):  # a link in code is not a link
                if not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
                    yield number, target


def broken_links(path):
    problems = []
    for number, target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(path), unquote(file_part))) if file_part else path
        where = f"{os.path.relpath(path, ROOT)}: {target}"
        if not os.path.exists(dest):
            problems.append(f"{where}: no file {os.path.relpath(dest, ROOT)}")
        elif anchor and not dest.endswith(".md"):
            problems.append(f"{where}: an anchor into a file that is not markdown")
        elif anchor and unquote(anchor).lower() not in anchors(dest):
            problems.append(f"{where}: no heading #{anchor} in {os.path.relpath(dest, ROOT)}")
    return problems


def test_the_pages_exist():
    names = {os.path.basename(p) for p in PAGES}
    assert {"README.md", "own_data.md", "methods.md", "metrics.md", "report.md", "deployment.md", "serving.md",
            "scaleout.md", "tipc.md", "benchmarks.md", "testing.md", "architecture.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_resolve(page):
    assert broken_links(page) == []


def test_every_docs_page_is_linked_from_the_readme():
    linked = {os.path.normpath(os.path.join(ROOT, t.partition("#")[0])) for _, t in relative_links(PAGES[0])}
    assert sorted(set(PAGES[1:]) - linked) == []


def test_the_checker_finds_broken_links(tmp_path):
    (tmp_path / "other.md").write_text("# A `code` title: with punctuation!\n\n## Same\n\n## Same\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#a-code-title-with-punctuation) [dup](other.md#same-1) [self](#top)\n\n# Top\n"
                    "[missing file](nowhere.md) [missing heading](other.md#nope) [web](https://example.com/x)\n"
                    "```\n[in code](ignored.md)\n```\n")
    assert broken_links(str(page)) == [f"{os.path.relpath(str(page), ROOT)}: nowhere.md: no file "
                                       f"{os.path.relpath(str(tmp_path / 'nowhere.md'), ROOT)}",
                                       f"{os.path.relpath(str(page), ROOT)}: other.md#nope: no heading #nope in "
                                       f"{os.path.relpath(str(tmp_path / 'other.md'), ROOT)}"]


def test_the_readme_is_a_front_page():
    with open(PAGES[0], encoding="utf-8") as f:
        text = f.read()
    assert text.count("\n") <= 150
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        ci_command = f.read().strip().splitlines()[-1]
    assert f"```bash\n{ci_command}\n```" in text, "the README's test command must be what .ci/run runs"
