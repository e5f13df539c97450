"""Running the scripts as a user does (subprocess, tiny model, CPU) and reading what they wrote."""

import contextlib
import os
import runpy
import signal
import subprocess
import sys
import threading
from pathlib import Path

import torch

import runs

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
# The smallest complete run: 4 images of the toy task, 2 DDIM steps, 2 minibatches; evaluated at 2 and 3 steps.
TINY = ["--model", "tiny", "--reward", "color", "--prompts", "colors", "--num-steps", "2", "--sample-batch-size", "4",
        "--num-batches-per-epoch", "1", "--train-batch-size", "2", "--image-every", "1", "--save-every", "1",
        "--eval-num-steps", "3"]
ACCUMULATE = {"reinforce": [], "ppo": ["--gradient-accumulation-steps", "1"],
              "loop": ["--gradient-accumulation-steps", "1"]}


# How far apart two float32 evaluations of the same network may be when only their summation order or batch shapes
# differ (another CPU's kernels, a batch split across processes or calls), relative to the result's norm. Each of
# L <~ 30 sequential layers (forward and backward) sums m <~ 1000 products with a rounding error of about sqrt(m) u,
# u = 2^-24 ~ 6e-8 the float32 unit roundoff, so the result is within ~L sqrt(m) u ~ 6e-5 of its norm; 1e-4 sits
# above that and about 100 times above what the suite measures (1e-6). It bounds the norm, not each element: an
# element near zero may differ by all of itself, which is why equality tests compare norms.
NETWORK_RTOL = 1e-4


def benchmark(name: str):
    """benchmarks/NAME.py imported as a module (the folder is not a package): its functions, without running it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_close_normwise(actual: torch.Tensor, expected: torch.Tensor, rtol: float = NETWORK_RTOL):
    """|actual - expected| <= rtol |expected| in the 2-norm over all elements."""
    error, scale = (actual - expected).norm().item(), expected.norm().item()
    assert error <= rtol * scale, f"normwise relative difference {error / scale:.3g} > {rtol:.3g} (norm {scale:.3g})"


def run(script: str, *args, torchrun: int = 0, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    # --standalone: torchrun picks a free port (a fixed one collides with any other run on the machine)
    prefix = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
              str(torchrun)] if torchrun else [PYTHON]
    proc = subprocess.run(prefix + [str(ROOT / f"{script}.py"), *map(str, args)], cwd=ROOT, env=OFFLINE,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@contextlib.contextmanager
def as_a_process():
    """Around a script's main run in this process: what the end of its own process would do is done here too. Its
    run-folder locks are released, and the exception and signal handlers it installed are undone."""
    hooks = sys.excepthook, threading.excepthook
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        runs.release()
        sys.excepthook, threading.excepthook = hooks
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def run_here(script: str) -> dict:
    """`python script.py` with the current sys.argv, in this process (as_a_process); its globals when it ends."""
    with as_a_process():
        return runpy.run_path(str(ROOT / f"{script}.py"), run_name="__main__")


def in_process(script: str, argv: list, monkeypatch) -> str:
    """Run a script's main here as `python script.py argv` would; return the SystemExit message ('' if none). Any
    other exception propagates: a traceback fails the test."""
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *map(str, argv)])
    try:
        run_here(script)
    except SystemExit as e:
        return str(e)
    return ""


def run_main(script: str, *args) -> dict:
    """A script's main block in this process (no interpreter start-up) with `args` as its command line; returns its
    globals as they are when it finishes, so a test can read what the script computed (advantages, losses, buffer).
    The global RNG, which the scripts seed, is restored afterwards."""
    argv = sys.argv
    sys.argv = [f"{script}.py", *map(str, args)]
    try:
        with torch.random.fork_rng(devices=[]):
            return run_here(script)
    finally:
        sys.argv = argv


def scalars(run_dir: Path) -> dict:
    """TensorBoard scalars of a run: tag -> list of (step, value)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def lora_weights(checkpoint: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(checkpoint / "pytorch_lora_weights.safetensors")


def training_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "training_state.pt", weights_only=True)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The last non-empty line of stderr: where a one-line error must be."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""
