"""Print one `name==version` line for each `name>=version` lower bound in pyproject.toml.

.ci/run's lowest job installs these pins, so every lower bound the project declares is one that CI
ran. Covered: the dependencies and the extras the README's test command installs. torch is left
out: no older CPU build is reachable from CI, so that job uses the README's torch pin instead.
Every other requirement must have a `>=` lower bound; one without is an error here.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

EXTRAS = ("dev", "eval", "diffusion")
NOT_PINNED = {"torch"}
# name, optional [extras], ">=" version, then optionally ",<upper" (an upper bound stays as declared).
REQ = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*>=\s*([0-9][^,;\s]*)\s*(,\s*<.*)?")


def lower_pins(pyproject: Path) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in EXTRAS:
        reqs += project["optional-dependencies"][extra]
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
    print("\n".join(lower_pins(path)))
