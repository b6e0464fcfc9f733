"""The built wheel is the minimind_jax package alone, and its `minimind-jax` command works where it is installed.

The wheel goes into a fresh virtual environment that borrows this environment's dependencies (a .pth line, no
network, nothing downloaded); the commands run from a directory outside the repository, so only the installed
package can answer.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import numpy as np
import pytest
from flax import nnx

from minimind_jax.model.transformer import MiniMind
from minimind_jax.weights import save_pth
from minimind_jax.weights.pth import read_state_dict
from tests.conftest import REPO_ROOT
from tests.support.models import tiny

pytestmark = pytest.mark.slow

# What a checkout has beyond its tracked files: none of it belongs in a build.
UNTRACKED = (
    ".git",
    ".venv",
    "build",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".cache",
    "out",
    "checkpoints",
    "runs",
    "demo_out",
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel built from a copy of the checkout (a build in place would reuse a stale build/ folder)."""
    source = tmp_path_factory.mktemp("source") / "minimind-jax"
    shutil.copytree(REPO_ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(*UNTRACKED))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(out),
            str(source),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    [path] = out.glob("minimind_jax-*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
    """A fresh venv with the wheel installed: (its bin/ folder, a log of each interpreter start's MALLOC_ARENA_MAX)."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site_packages = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # A plain path line does not run the .pth files in that folder, so the repository's editable install stays off.
    dependency_dirs = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    with open(os.path.join(site_packages, "project_dependencies.pth"), "w") as pth:
        pth.writelines(f"{path}\n" for path in dependency_dirs)
    starts_log = venv / "starts.log"
    with open(os.path.join(site_packages, "sitecustomize.py"), "w") as startup:  # runs once per interpreter start
        startup.write(
            f"import os\nopen({str(starts_log)!r}, 'a').write(os.environ.get('MALLOC_ARENA_MAX', '-') + ' ')\n"
        )
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
        check=True,
        capture_output=True,
        text=True,
    )
    return venv / "bin", starts_log


@pytest.fixture
def outside(tmp_path, monkeypatch):
    """Environment for a command run outside the repository: no PYTHONPATH, no malloc settings of the caller."""
    for name in (
        "PYTHONPATH",
        "MALLOC_ARENA_MAX",
        "MALLOC_MMAP_MAX_",
        "MALLOC_TRIM_THRESHOLD_",
        "MINIMIND_JAX_SYSTEM_MALLOC",
    ):
        monkeypatch.delenv(name, raising=False)
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    return workdir


def test_the_wheel_holds_only_the_minimind_jax_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {"minimind_jax", wheel.name.split("-py3")[0] + ".dist-info"}
    presets = {name for name in names if name.startswith("minimind_jax/configs/")}
    assert {f"minimind_jax/configs/{p}.yaml" for p in ("minimind2-small", "minimind3-moe", "demo")} <= presets
    page = {f"minimind_jax/inference/web/{name}" for name in ("index.html", "chat.js", "chat.css")}
    assert page <= set(names)  # the chat page of main.py serve
    assert {"minimind_jax/weights/mapping.py", "minimind_jax/weights/pth.py", "minimind_jax/cli/convert.py"} <= set(
        names
    )


def test_the_installed_command_converts_from_outside_the_repository(installed, outside, tmp_path):
    bin_dir, starts_log = installed
    run = lambda *argv: subprocess.run([str(a) for a in argv], cwd=outside, capture_output=True, text=True)

    where = run(
        bin_dir / "python",
        "-c",
        "import importlib.util, minimind_jax.weights, minimind_jax.model.config as c; "
        "print(minimind_jax.__file__); print(importlib.util.find_spec('convert')); "
        "print(c.load_preset('minimind3-moe').num_experts_per_tok)",
    )
    assert where.returncode == 0, where.stderr
    package_file, convert_spec, top_k = where.stdout.split()
    assert package_file.startswith(str(bin_dir.parent)), package_file  # the wheel's copy, not the checkout
    assert convert_spec == "None"  # no top-level `convert` to shadow anyone's
    assert top_k == "1"  # a preset read from the installed package data

    help_run = run(bin_dir / "minimind-jax", "--help")
    assert help_run.returncode == 0, help_run.stderr
    assert help_run.stdout.startswith("usage: minimind-jax ")
    assert all(command in help_run.stdout for command in ("sft", "pretrain", "convert", "chat", "eval", "demo"))

    source = tmp_path / "tiny.pth"
    save_pth(MiniMind(tiny("minimind2-small"), rngs=nnx.Rngs(3)), source, dtype="float32")
    starts_log.write_text("")
    forward = run(bin_dir / "minimind-jax", "convert", source, "ckpt")
    assert forward.returncode == 0, forward.stderr
    # The command restarted itself once with the malloc settings: two interpreter starts, the second with them.
    assert starts_log.read_text().split() == ["-", "1"]
    assert (outside / "ckpt" / "config.json").is_file()
    back = run(bin_dir / "minimind-jax", "convert", "ckpt", "back.pth", "--dtype", "float32")
    assert back.returncode == 0, back.stderr
    original, returned = read_state_dict(source), read_state_dict(outside / "back.pth")
    assert list(original) == list(returned)
    assert all(np.array_equal(original[key], returned[key]) for key in original)
