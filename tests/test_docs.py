"""The documentation against the code and the repository: the variant table equals `configs.VARIANTS`, the CLI
table names only subcommands and options the parser has, the README quotes the Makefile's test commands, and
every relative markdown link and every cited markdown file name points at something the repository holds."""
import argparse
import os
import re
from pathlib import Path

import pytest

from edet_deploy.cli import build_parser
from edet_deploy.configs import VARIANTS

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
# Directories that hold no documentation of ours: environments, build outputs, caches.
SKIP_DIRS = {".git", ".venv", "venv", "build", "dist", "node_modules", "__pycache__", ".pytest_cache", ".mypy_cache"}
TEXT_SUFFIXES = {".md", ".py", ".toml", ".sh", ".yaml", ".yml", ".pbtxt", ".cfg", ".ini", ".txt"}
TEXT_NAMES = {"Makefile", "Dockerfile", "run", ".dockerignore", ".gitignore"}
# Markdown reports a script writes at run time (not committed): name -> the script that must write it.
GENERATED_REPORTS = {"summary.md": "benchmarks/gpu_acceptance.py", "gpu_kernels.md": "benchmarks/gpu_kernels.py"}

VARIANT_HEADER = ["model", "input", "backbone", "BiFPN W / D", "head D", "fusion", "anchor scale", "levels",
                  "params", "FLOPs", "COCO AP"]


def _cells(line: str) -> list:
    """The cells of a markdown table row (`\\|` inside a cell is not a separator)."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def _tables(text: str) -> list:
    """Every markdown table in `text` as (header, rows), cells stripped."""
    tables, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and re.match(r"^\|[\s:|-]+\|$", lines[i + 1]):
            header, rows, i = _cells(lines[i]), [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            tables.append((header, rows))
        else:
            i += 1
    return tables


def _doc_pages() -> list:
    return [README, *sorted(DOCS.glob("*.md"))]


def _variant_row(cfg) -> list:
    """A variant as the docs' table writes it: the figures rounded as `edet-deploy models` prints them."""
    pub = cfg.published
    return [cfg.display_name, str(cfg.image_size), cfg.backbone, f"{cfg.fpn_channels} / {cfg.fpn_repeats}",
            str(cfg.head_repeats), cfg.fusion, f"{cfg.anchor_scale:.1f}", f"P{cfg.min_level}-P{cfg.max_level}",
            f"{pub['params_m']:.1f}M", f"{pub['flops_b']:.1f}B", f"{pub['coco_ap']:.1f}"]


def test_variant_tables_equal_configs():
    found = [(page, header, rows) for page in _doc_pages() for header, rows in _tables(page.read_text())
             if header[:3] == VARIANT_HEADER[:3]]
    assert found, "no variant table (| model | input | backbone | ...) in README.md or docs/"
    for page, header, rows in found:
        assert header == VARIANT_HEADER, f"{page.name}: columns {header}"
        assert [r[0] for r in rows] == [_variant_row(c)[0] for c in VARIANTS.values()], f"{page.name}: variants"
        for row, cfg in zip(rows, VARIANTS.values()):
            for col, got, want in zip(VARIANT_HEADER, row, _variant_row(cfg)):
                assert got == want, f"{page.name}, {cfg.name}, {col}: the table says {got!r}, configs.py {want!r}"


def test_variant_row_matches_the_models_command(capsys):
    from edet_deploy.cli import main
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    for line, cfg in zip(lines, VARIANTS.values()):
        row = _variant_row(cfg)
        printed = line.split()
        # model, input, backbone, W, D, head D, fusion, params, FLOPs, AP as `edet-deploy models` prints them
        assert [printed[1], printed[2], printed[7], printed[8], printed[9]] == [row[1], row[2], *row[8:]]


def _subparsers() -> dict:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def _options(parser: argparse.ArgumentParser) -> set:
    return {s for a in parser._actions for s in a.option_strings}


def _section(text: str, heading: str) -> str:
    start = text.index(f"\n{heading}\n")
    nxt = re.search(r"^## ", text[start + len(heading) + 2:], flags=re.M)
    return text[start:start + len(heading) + 2 + nxt.start()] if nxt else text[start:]


def test_cli_table_names_real_commands_and_options():
    subs, global_options = _subparsers(), _options(build_parser())
    rows = [r for h, rs in _tables(_section(README.read_text(), "## CLI")) if h[:2] == ["command", "what it does"]
            for r in rs]
    assert rows, "README's CLI table was not found"
    documented = set()
    for row in rows:
        spans = re.findall(r"`([^`]+)`", row[0])
        commands = []
        for span in spans:
            words = span.split()
            commands.append(words[1] if words[0] == "edet-deploy" else words[0])
        unknown = [c for c in commands if c not in subs]
        assert not unknown, f"the CLI table names commands the parser lacks: {unknown}"
        documented.update(commands)
        known = set(global_options).union(*(_options(subs[c]) for c in commands))
        options = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", " ".join(re.findall(r"`([^`]+)`", " ".join(row)))))
        assert options <= known, f"{commands}: the CLI table names options they lack: {sorted(options - known)}"
    assert documented == set(subs), f"commands missing from README's CLI table: {sorted(set(subs) - documented)}"


def test_readme_quotes_the_makefile_test_commands():
    makefile, readme = (ROOT / "Makefile").read_text(), README.read_text()
    for target in ("test", "test-unit", "test-slow"):
        recipe = re.search(rf"^{target}:.*\n\t(.+)$", makefile, flags=re.M).group(1)
        args = recipe.split(" -m pytest ", 1)[1]
        assert f"`make {target}` is `pytest {args}`" in readme, f"README does not quote `make {target}`: pytest {args}"
    markers = re.search(r"^markers = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), flags=re.M).group(1)
    defined = re.findall(r'"(\w+):', markers)
    assert sorted(defined) == ["server", "slow"], "README names the markers `server` and `slow`"
    assert all(f"`{m}`" in readme for m in defined)


# --- links and cited markdown files ---------------------------------------------------------------------------

def _text_files(root: Path):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info")
                       and (not d.startswith(".") or d == ".ci")]
        for name in filenames:
            path = Path(dirpath) / name
            if path.suffix in TEXT_SUFFIXES or name in TEXT_NAMES:
                yield path


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set:
    return {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", page.read_text(), flags=re.M)}


def broken_citations(root: Path) -> list:
    """'file: target' for every relative markdown link (and its #anchor) that leads nowhere, and every `*.md`
    name cited in a text file that no file of the repository has."""
    files = list(_text_files(root))
    rel = {p.relative_to(root).as_posix() for p in _text_files(root)} | {
        p.relative_to(root).as_posix() for p in root.rglob("*.md") if not (set(p.relative_to(root).parts) & SKIP_DIRS)}
    basenames = {r.rsplit("/", 1)[-1] for r in rel}
    broken = []
    for path in files:
        text = path.read_text(errors="replace")
        where = path.relative_to(root).as_posix()
        if path.suffix == ".md":
            for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                    continue
                file_part, _, anchor = target.partition("#")
                dest = (path.parent / file_part).resolve()
                if not dest.exists() or root.resolve() not in (dest, *dest.parents):
                    broken.append(f"{where}: link {target}")
                elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                    broken.append(f"{where}: link {target} (no such heading)")
        without_urls = re.sub(r"[a-z][a-z0-9+.-]*://\S+", " ", text)
        for name in re.findall(r"(?<![\w/.{}-])([\w][\w./-]*\.md)\b", without_urls):
            name = name[2:] if name.startswith("./") else name
            base = name.rsplit("/", 1)[-1]
            if ((path.parent / name).exists() or (root / name).exists()
                    or ("/" not in name and base in basenames)
                    or ("/" in name and any(r.endswith("/" + name) for r in rel))
                    or base in GENERATED_REPORTS):
                continue
            broken.append(f"{where}: cites {name}")
    return sorted(set(broken))


def test_every_cited_markdown_file_and_link_exists():
    assert broken_citations(ROOT) == []


def test_generated_report_names_are_written_by_their_scripts():
    for name, script in GENERATED_REPORTS.items():
        source = (ROOT / script).read_text()
        assert re.search(rf"""["'/]{re.escape(name)}["']\)\.write_text""", source), f"{script} does not write {name}"


def _md(stem: str) -> str:
    """A markdown file name built at run time, so that this file's source cites none that are missing."""
    return stem + ".md"


def test_citation_checker_finds_what_is_missing(tmp_path):
    a, b, gone, missing = _md("a"), _md("b"), _md("GONE"), _md("missing")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / a).write_text(f"# Top\n\n## Some part\n\n[ok](../README.md) [ok](#top) "
                                       f"[ok]({b}#some-part-2) [web](https://example.org/{gone})\n")
    (tmp_path / "docs" / b).write_text(f"## Some part 2\n[gone]({missing}) [anchor]({a}#nowhere)\n")
    (tmp_path / "README.md").write_text(f"see [docs](docs/{a}) and `docs/{b}`\n")
    (tmp_path / "code.py").write_text(f"# the table in {gone} and in README.md\n")
    assert broken_citations(tmp_path) == [f"code.py: cites {gone}", f"docs/{b}: cites {missing}",
                                          f"docs/{b}: link {a}#nowhere (no such heading)",
                                          f"docs/{b}: link {missing}"]


@pytest.mark.parametrize("page", [p.name for p in _doc_pages()[1:]])
def test_every_docs_page_is_linked_from_the_readme(page):
    assert f"(docs/{page})" in README.read_text(), f"README does not link docs/{page}"
