"""The docs the benchmark scripts rewrite: each script replaces only its own sections, keeps the
hand-written ones, and no section appears twice."""
import sys
from pathlib import Path

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import bench  # noqa: E402


def headings(text):
    return [line for line in text.splitlines() if line.startswith("## ")]


def test_every_docs_section_once():
    for path in sorted((ROOT / "docs").glob("*.md")):
        seen = headings(path.read_text())
        repeated = sorted({h for h in seen if seen.count(h) > 1})
        assert not repeated, f"{path.name}: sections repeated: {repeated}"


def test_bench_rewrites_its_sections_and_keeps_the_others(tmp_path):
    doc = tmp_path / "B.md"
    doc.write_text("# B\n\nold intro\n\n## GPU case\n\nold gpu\n\n## Hand-written\n\nkept\n\n"
                   "## Real model on the CPU\n\nold real\n")
    new = "# B\n\nnew intro\n\n## Loss memory\n\nnew loss\n\n## GPU case\n\nnew gpu\n"
    doc.write_text(new + bench.kept_sections(doc, new))
    bench.replace_section(doc, "Real model on the CPU", "## Real model on the CPU\n\nnew real\n")
    bench.replace_section(doc, "On-policy step", "## On-policy step\n\nnew on-policy\n")
    text = doc.read_text()
    assert headings(text) == ["## Loss memory", "## GPU case", "## Hand-written",
                              "## Real model on the CPU", "## On-policy step"]
    for gone in ("old intro", "old gpu", "old real"):
        assert gone not in text
    for kept in ("new intro", "kept", "new gpu", "new real", "new on-policy"):
        assert kept in text
