"""The README and docs/ as a newcomer reads them: the README stays a guide (at most ~300 lines,
numbers in docs/results.md) and no relative link or image in them points at nothing."""
import re
from pathlib import Path

from helpers import REPO

LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _docs() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_the_readme_is_a_guide_of_at_most_300_lines():
    n = len((REPO / "README.md").read_text().splitlines())
    assert n <= 300, f"README.md has {n} lines: move measurements to docs/results.md"


def test_every_relative_link_and_image_exists():
    missing = []
    for doc in _docs():
        for target in LINK.findall(doc.read_text()):
            if re.match(r"[a-z]+:", target):   # http:, https:, mailto:
                continue
            if not (doc.parent / target).exists():
                missing.append(f"{doc.relative_to(REPO)} -> {target}")
    assert not missing, missing


def test_the_readme_test_command_is_what_ci_runs():
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()
    setup = (REPO / "README.md").read_text().split("```bash\n", 1)[1].split("```", 1)[0]
    assert setup.splitlines()[2] == ci[-1]            # the set-up's third line: the tests
    # the two tiers together are every test: each is `mpi` or not
    assert ci[-1] == 'python -m pytest -m "not mpi" -n 2 && python -m pytest -m mpi'
