"""Rewrite the line counts in README.md's file tree from the files on disk (tests/test_readme.py checks them)."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
text = open(os.path.join(ROOT, "README.md")).read()
head, rest = text.split("## Files", 1)
pre, tree, post = rest.split("```", 2)
folder, lines = "", []
for line in tree.splitlines():
    if re.match(r"^\S+/\s*(\(.*)?$", line):
        folder = line.split()[0]
    m = re.match(r"^(\s*)(\S+\.(?:py|sh))(\s+)(\d+)(\s.*)$", line)
    if m:
        path = os.path.join(ROOT, folder if line.startswith(" ") else "", m[2])
        width = len(m[3]) + len(m[4])
        line = f"{m[1]}{m[2]}{str(sum(1 for _ in open(path))).rjust(width)}{m[5]}"
    lines.append(line)
open(os.path.join(ROOT, "README.md"), "w").write(head + "## Files" + pre + "```" + "\n".join(lines) + "\n```" + post)
