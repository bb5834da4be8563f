"""Write a PEP 503 simple index (``<dir>/simple/<project>/index.html``) for the wheels in
``<dir>/files``, so that ``pip install --index-url file://<dir>/simple`` finds them: what
scripts/image/build.sh mounts into the image build in place of the CPU torch index."""
from __future__ import annotations

import html
import re
import sys
from pathlib import Path


def project(filename: str) -> str:
    """The normalized project name of a wheel or sdist file name."""
    name = re.split(r"-\d", filename, maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def write_index(root: Path) -> dict[str, list[str]]:
    projects: dict[str, list[str]] = {}
    for path in sorted((root / "files").iterdir()):
        if path.name.endswith((".whl", ".tar.gz", ".zip")):
            projects.setdefault(project(path.name), []).append(path.name)
    simple = root / "simple"
    for name, files in projects.items():
        (simple / name).mkdir(parents=True, exist_ok=True)
        links = "".join(f'<a href="../../files/{html.escape(f)}">{html.escape(f)}</a>\n' for f in files)
        (simple / name / "index.html").write_text(f"<!DOCTYPE html>\n<html><body>\n{links}</body></html>\n")
    (simple / "index.html").write_text("<!DOCTYPE html>\n<html><body>\n" + "".join(
        f'<a href="{n}/">{n}</a>\n' for n in sorted(projects)) + "</body></html>\n")
    return projects


if __name__ == "__main__":
    write_index(Path(sys.argv[1]))
