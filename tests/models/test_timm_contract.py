"""timm's own ``tests/test_models.py``, for the installed timm version, run on the ELSA models.

The test file is not in this repository: the sdist of the installed timm is fetched at test time with
``pip download --no-binary :all: --no-deps`` into a cache directory (once per machine and version; set
``ELSA_TIMM_SDIST_CACHE`` to choose it) and only its ``tests/`` folder is unpacked. It runs in a pytest subprocess
with ``timm_contract_plugin`` (next to this file), which registers the ELSA models and puts them in the families
they extend (``elsa_swin`` with timm's Swin, ``elsa_volo`` with VOLO). TorchScript tests are left aside.

The test is skipped only when the package index cannot be reached (pip reports a connection failure); any other
download failure is an error.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import timm

import elsa

# Which of timm's tests run on which ELSA model, to stay within about two minutes on two cores: every test on
# elsa_swin_pico (the whole ELSA-Swin code at a small size), all but the backward passes and the slow pruning sweep
# on elsa_swin_tiny (an official variant), and the config, fx and feature tests on elsa_volo_d1_224.
MODELS = ("elsa_swin_pico", "elsa_swin_tiny", "elsa_volo_d1_224")
SELECTION = (
    "not torchscript and ("
    "elsa_swin_pico"
    " or (elsa_swin_tiny and not backward and not prune_intermediate_layers_contract)"
    " or (elsa_volo_d1_224 and (default_cfgs or forward_fx or forward_intermediates_features))"
    ")"
)
_OFFLINE_MARKERS = ("NewConnectionError", "Failed to establish a new connection", "Temporary failure in name "
                    "resolution", "Name or service not known", "Network is unreachable", "ConnectTimeout",
                    "ProxyError", "Connection refused", "No route to host")


def _cache_dir() -> Path:
    root = os.environ.get("ELSA_TIMM_SDIST_CACHE") or Path(tempfile.gettempdir()) / "elsa-timm-sdist"
    return Path(root) / f"timm-{timm.__version__}"


def _fetch_timm_tests() -> Path:
    """The unpacked ``tests/`` of the installed timm's sdist (downloaded once into the cache)."""
    version = timm.__version__
    target = _cache_dir()
    tests = target / "tests"
    if (tests / "test_models.py").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
               f"timm=={version}", "-d", tmp, "--disable-pip-version-check", "--timeout", "30"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            log = res.stdout + res.stderr
            if any(m in log for m in _OFFLINE_MARKERS):
                pytest.skip(f"the package index cannot be reached to fetch the timm {version} sdist:\n{log[-800:]}")
            raise AssertionError(f"pip download of the timm {version} sdist failed:\n{log[-3000:]}")
        archive = next(Path(tmp).glob("timm-*.tar.gz"))
        staging = Path(tmp) / "unpacked"
        with tarfile.open(archive) as tar:
            # its tests, and the pyproject that holds their pytest settings (markers); nothing else
            members = [m for m in tar.getmembers() if m.isfile() and ".." not in Path(m.name).parts
                       and ("/tests/" in m.name or m.name.count("/") == 1 and m.name.endswith("/pyproject.toml"))]
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.10.12
            tar.extractall(staging, members=members, **safe)
        (unpacked,) = [p for p in staging.iterdir() if p.is_dir()]
        try:
            os.replace(unpacked, target)
        except OSError:  # another process unpacked it first
            pass
    return target


@pytest.mark.slow
def test_timm_test_models_passes_on_the_elsa_models(tmp_path):
    root = _fetch_timm_tests()
    report = tmp_path / "report.xml"
    plugin_dir = Path(__file__).parent
    src = Path(elsa.__file__).resolve().parents[1]
    env = dict(os.environ, ELSA_TIMM_MODELS=",".join(MODELS),
               PYTHONPATH=os.pathsep.join(p for p in (str(plugin_dir), str(src), os.environ.get("PYTHONPATH")) if p))
    cmd = [sys.executable, "-m", "pytest", str(root / "tests" / "test_models.py"), "-p", "timm_contract_plugin",
           "-p", "no:cacheprovider", "-W", "ignore::pytest.PytestUnknownMarkWarning", "-q", "-k", SELECTION,
           f"--junitxml={report}", "--rootdir", str(root)]
    res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=1200)
    out = res.stdout[-6000:] + res.stderr[-2000:]
    assert report.is_file(), out
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    assert res.returncode == 0 and counts["failures"] == counts["errors"] == 0, out
    assert counts["skipped"] == 0, out  # none of timm's size limits applies to these models
    ran = " ".join(case.get("name", "") for case in suite.iter("testcase"))
    for model in MODELS:
        assert model in ran, f"timm's tests selected nothing for {model}:\n{out}"
    assert counts["tests"] >= 15, out  # 18 with timm 1.0.31: a sudden drop means the selection broke
