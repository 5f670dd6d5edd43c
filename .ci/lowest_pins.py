"""Print one `name==version` line for each `name>=version` lower bound in pyproject.toml.

.ci/run's lowest job installs these pins, so every lower bound the project declares is one that CI
ran. Covered: the dependencies and the extras named on the command line (.ci/run passes those of
the README's test command). torch is left out: no older CPU build is reachable from CI, so that
job uses the README's torch pin instead. Every other requirement must have a `>=` lower bound; one
without is an error here.

    python .ci/lowest_pins.py pyproject.toml dev,eval,diffusion
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

NOT_PINNED = {"torch"}
# name, optional [extras], ">=" version, then optionally ",<upper" (an upper bound stays as declared).
REQ = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*>=\s*([0-9][^,;\s]*)\s*(,\s*<.*)?")


def lower_pins(pyproject: Path, extras: list[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = list(project["dependencies"])
    declared = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in declared:
            raise SystemExit(f"{pyproject}: no extra {extra!r} (declared: {', '.join(declared)})")
        reqs += declared[extra]
    pins = []
    for req in reqs:
        m = REQ.fullmatch(req.strip())
        if m is None:
            raise SystemExit(f"{pyproject}: requirement {req!r} has no '>=' lower bound to test")
        if m.group(1).lower() not in NOT_PINNED:
            pins.append(f"{m.group(1)}=={m.group(2)}")
    return pins


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml")
    wanted = sys.argv[2].split(",") if len(sys.argv) > 2 and sys.argv[2] else []
    print("\n".join(lower_pins(path, wanted)))
