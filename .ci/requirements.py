"""Print requirements declared in pyproject.toml, one a line, so CI installs what the project
declares instead of a copy that drifts.

    python .ci/requirements.py build-system     # [build-system] requires
    python .ci/requirements.py lint             # the `lint` extra
    python .ci/requirements.py dev:build        # only the requirement named `build` of the `dev` extra

Self-references of an extra (``bnfold[test]``) are left out: CI installs bnfold itself separately.
"""

import re
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python < 3.11: pip vendors the same parser
    from pip._vendor import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def requirement_name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;@]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def main(selectors) -> int:
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))
    lines = []
    for selector in selectors:
        if selector == "build-system":
            lines += project["build-system"]["requires"]
            continue
        extra, _, only = selector.partition(":")
        requirements = project["project"]["optional-dependencies"][extra]
        lines += [
            r
            for r in requirements
            if requirement_name(r) != "bnfold" and (not only or requirement_name(r) == only.lower())
        ]
    if not lines:
        print(f"no requirements match {' '.join(selectors)}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
