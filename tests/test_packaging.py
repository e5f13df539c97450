"""The built artefact: a wheel built from this checkout and installed outside it holds every module and data folder
the scripts use, and runs them from any working directory with the checkout out of reach."""

import json
import subprocess
import site
import sys
from pathlib import Path

import pytest

import common
from helpers import ACCUMULATE, OFFLINE, TINY

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DATA = ("world", "prompts")  # the folders read by path beside common.py (SHAPES_DIR, SHAPES_FLOW_DIR, PROMPTS_DIR)


def git_files(*args) -> list:
    """The checkout's files as git sees them (tracked, and untracked but not ignored), those that exist."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", *args], cwd=ROOT,
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the files to ship are what git tracks")
    return sorted({f for f in out.decode().split("\0") if f and (ROOT / f).is_file()})


def root_modules() -> set:
    return {Path(f).stem for f in git_files() if "/" not in f and f.endswith(".py")}


def test_every_module_at_the_root_is_listed():
    """A new script or module at the root ships only if pyproject.toml lists it: the list is the .py files there."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["py-modules"])
    at_root = root_modules()
    assert listed == at_root, f"pyproject.toml [tool.setuptools] py-modules: add {sorted(at_root - listed)}, " \
                              f"remove {sorted(listed - at_root)}"


def pip(*args, cwd: Path):
    proc = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=600)
    assert proc.returncode == 0, f"pip {args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel built offline from a copy of the checkout (no stale build/ folder can leak into it), installed with
    pip into a folder of its own."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    for f in git_files():
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        (src / f).write_bytes((ROOT / f).read_bytes())
    pip("wheel", src, "--no-deps", "--no-build-isolation", "--no-index", "-w", tmp / "dist", cwd=tmp)
    pip("install", "--no-deps", "--no-index", "--target", tmp / "site", *(tmp / "dist").glob("*.whl"), cwd=tmp)
    return tmp / "site"


def isolated(target: Path, cwd: Path, *args, timeout: int = 600) -> subprocess.CompletedProcess:
    """Python on the installed copy and the dependencies only: no site initialisation (so no .pth file, which is how
    an editable install of the checkout is found), PYTHONPATH the installed copy then this interpreter's
    site-packages (a venv's, the base's where the venv sees them, the user's), run elsewhere."""
    deps = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
    paths = [str(target), *(d for d in dict.fromkeys(deps) if Path(d).is_dir())]
    env = {**OFFLINE, "PYTHONPATH": ":".join(paths)}
    proc = subprocess.run([sys.executable, "-S", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    what = " ".join(map(str, args))[:100]
    assert proc.returncode == 0, f"python -S {what} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n" \
                                 f"{proc.stderr[-3000:]}"
    return proc


PROBE = """
import importlib, json, sys
mods = {m: importlib.import_module(m) for m in sys.argv[1:]}
import common, world, world.pretrain_flow
models = {m: type(common.load_pipeline(m, lora_rank=4, seed=0)).__name__ for m in (common.SHAPES, common.SHAPES_FLOW)}
print(json.dumps(dict(files={m: mod.__file__ for m, mod in mods.items()}, sys_path=sys.path, models=models,
    dirs=[str(d) for d in (common.SHAPES_DIR, common.SHAPES_FLOW_DIR, common.PROMPTS_DIR, world.MODEL_DIR,
                           world.pretrain_flow.FLOW_MODEL_DIR)],
    prompt_sets=common.prompt_sets(), shapes=common.load_prompts("shapes"))))
"""


def test_wheel_ships_every_module_and_data_file(installed, tmp_path):
    """Every module imports from the installed copy, every file of the data folders is there byte for byte, and the
    paths common.py builds beside itself (both shapes models, the prompt sets) lead there and load."""
    shipped = [f for f in git_files(*DATA) if not f.endswith(".py")]
    assert {"world/shapes/model_index.json", "world/shapes_flow/model_index.json", "prompts/shapes.txt"} <= set(shipped)
    missing = [f for f in shipped if not (installed / f).is_file()
               or (installed / f).read_bytes() != (ROOT / f).read_bytes()]
    assert not missing, f"the installed copy lacks or differs in {missing}"

    modules = sorted(root_modules() | {f[:-3].replace("/", ".").removesuffix(".__init__")
                                       for f in git_files("world") if f.endswith(".py")})
    out = json.loads(isolated(installed, tmp_path, "-c", PROBE, *modules).stdout.strip().splitlines()[-1])
    assert str(ROOT) not in [str(Path(p or tmp_path).resolve()) for p in out["sys_path"]]
    outside = {m: f for m, f in out["files"].items() if not Path(f).resolve().is_relative_to(installed.resolve())}
    assert not outside and set(out["files"]) == set(modules), f"imported from elsewhere: {outside}"
    assert all(Path(d).resolve().is_relative_to(installed.resolve()) for d in out["dirs"]), out["dirs"]
    assert out["models"] == {"shapes": "StableDiffusionPipeline", "shapes-flow": "StableDiffusion3Pipeline"}
    sets = sorted(Path(f).stem for f in shipped if f.startswith("prompts/") and f.endswith(".txt"))
    assert out["prompt_sets"] == sets, out["prompt_sets"]
    assert out["shapes"] == common.load_prompts("shapes")  # read from the checkout by this process


def test_installed_loop_runs_one_epoch_elsewhere(installed, tmp_path):
    """`python -m loop` from the installed copy: --help, then one epoch of the tiny model whose run folder lands in
    the working directory (the default --output-dir runs), not beside the installed modules."""
    assert "--num-epochs" in isolated(installed, tmp_path, "-m", "loop", "--help").stdout
    isolated(installed, tmp_path, "-m", "loop", *TINY, *ACCUMULATE["loop"], "--num-epochs", "1")
    run_dirs = list((tmp_path / "runs").glob("loop__*"))
    assert len(run_dirs) == 1 and (run_dirs[0] / "checkpoints" / "epoch_0001").is_dir(), run_dirs
    assert not (installed / "runs").exists()
