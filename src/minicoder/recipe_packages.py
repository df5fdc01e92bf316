"""The recipe's corpus venv: pinned, permissively licensed pure-Python packages installed by pip into a
folder of their own, whose site-packages then becomes a corpus source (`minicoder data corpus FOLDER`:
each package folder is a repository). The licence of every installed distribution is read from its
metadata and recorded; a distribution whose licence is not on the permissive list stops the stage.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from importlib.metadata import distributions
from pathlib import Path

from .errors import MinicoderError

PERMISSIVE = ("bsd", "mit", "apache", "psf", "python software foundation", "isc", "zlib", "unlicense", "0bsd")


def licence_of(dist) -> str:
    meta = dist.metadata
    text = meta.get("License-Expression") or meta.get("License") or ""
    if not text or len(text) > 80:  # a whole licence text pasted in: the classifiers say it shorter
        classifiers = [c.split("::")[-1].strip() for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
        text = "; ".join(classifiers) or (text.splitlines()[0] if text else "")
    return text.strip() or "unknown"


def install_packages(packages: list[str], venv: Path) -> dict:
    """pip-install `packages` (pinned `name==version`) into `venv`; return its site-packages and licences."""
    unpinned = [p for p in packages if "==" not in p]
    if unpinned:
        raise MinicoderError(f"recipe [packages] install: pin every package with ==, not {unpinned}")
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-compile", "--target", str(site),
                           *packages], capture_output=True, text=True)
    if proc.returncode:
        raise MinicoderError(f"pip could not install {' '.join(packages)}:\n{proc.stderr.strip()[-2000:]}")
    licences = {d.metadata["Name"]: {"version": d.version, "licence": licence_of(d)} for d in distributions(path=[str(site)])}
    refused = {n: v["licence"] for n, v in licences.items() if not any(w in v["licence"].lower() for w in PERMISSIVE)}
    if refused:
        raise MinicoderError(f"not permissively licensed (add them to the list only after checking): {refused}")
    return {"site_packages": str(site), "requested": packages, "licences": licences}
