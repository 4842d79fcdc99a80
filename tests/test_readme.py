"""The README's file tree tells the truth: every listed file exists with the stated line count."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_line_counts_are_true():
    text = open(os.path.join(ROOT, "README.md")).read()
    tree = text.split("## Files", 1)[1].split("```")[1]
    folder, checked = "", 0
    for line in tree.splitlines():
        if re.match(r"^\S+/\s*(\(.*)?$", line):
            folder = line.split()[0]
            continue
        m = re.match(r"^\s*(\S+\.(?:py|sh))\s+(\d+)\s", line)
        if m:
            path = os.path.join(ROOT, folder if line.startswith(" ") else "", m[1])
            assert os.path.exists(path), f"README lists {path}, which does not exist"
            assert sum(1 for _ in open(path)) == int(m[2]), f"README says {m[1]} has {m[2]} lines"
            checked += 1
    listed = {os.path.basename(f) for f in re.findall(r"^\s*(\S+\.py)\s+\d+", tree, re.M)}
    on_disk = {f for f in os.listdir(os.path.join(ROOT, "avnano")) if f.endswith(".py") and f != "__init__.py"}
    assert on_disk <= listed, f"not in the README tree: {sorted(on_disk - listed)}"
    assert checked >= 20
