"""What a user can cause, reported in one line: the flag rules and the exit without a traceback.

Every module reports bad input the same way, `fail(message)`: one line on stderr, `error: ...`, and a non-zero
exit. The flag rules (`FLAG_RULES`, `ETA_RULES`) are checked by name before anything loads, so every script, benchmark
and world tool that has a flag checks it the same way (`check_flags`; the scripts' `runs.validate_args` adds the
model family's defaults). `exit_in_one_line` turns a Ctrl-C, a SIGTERM, a write the machine refuses or a failed
torchrun peer into one line that says what to do next. This module imports nothing of the project's: common.py,
rewards.py, runs.py and the scripts all build on it.
"""

import errno
import math
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import torch.distributed as dist

def fail(message: str):
    """Stop with one line on stderr and a non-zero exit (the one way bad input is reported). In a torchrun job the
    line names the process, and the others are told (`tell_the_others`)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        tell_the_others(f"process {dist.get_rank()} failed: {message}")
        message = f"process {dist.get_rank()}: {message}"
    raise SystemExit(f"error: {message}")


# A torchrun process that fails leaves its line in the job's key-value store (torchrun's agent holds it) before it
# exits, so that the others, which see only a closed connection or torchrun's SIGTERM, can say which process failed
# and why. A process killed outright (SIGKILL, out of memory) leaves nothing: the others then say "another process".
FAILED_KEY = "diffusion_rl/failed"


def tell_the_others(line: str):
    try:
        dist.distributed_c10d._get_default_store().set(FAILED_KEY, " ".join(line.split()))
    except Exception:  # noqa: BLE001 - no store (a plain run), or it is gone: the line on stderr is what matters
        pass


def what_the_others_said() -> Optional[str]:
    """The line a failed process of this torchrun job left (see FAILED_KEY), or None."""
    try:
        store = dist.distributed_c10d._get_default_store()
        return store.get(FAILED_KEY).decode(errors="replace") if store.check([FAILED_KEY]) else None
    except Exception:  # noqa: BLE001
        return None


def one_line(error: BaseException, limit: int = 160) -> str:
    """An exception as `Type: message` on one line (library messages often span several)."""
    return f"{type(error).__name__}: {' '.join(str(error).split())[:limit]}"


# A write the machine refused: disk full, over quota, read-only file system, over the file-size limit. (Permission
# and I/O errors also come from reads, of a model or reward weights: those keep their own messages or tracebacks.)
REFUSED_WRITES = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


# What a collective raises when another process of the job died or stopped answering (gloo; NCCL's watchdog aborts).
PEER_FAILURES = ("Timed out", "timed out", "Connection closed by peer", "Connection reset by peer", "Broken pipe")


def exit_in_one_line(next_step: Callable[[], str], enabled: bool = True, folder: Optional[Path] = None):
    """From now on, a Ctrl-C, a SIGTERM or a write the machine refuses ends the process with one line on stderr,
    ending with `next_step()` (what to do now), instead of a traceback. Any other exception keeps its traceback: it is
    a bug. (A sys.excepthook: it runs once the exception has unwound the program, so every `finally` has run. A refused
    write in a background writer thread is left to the main thread, to which TensorBoard's writer re-raises it.)
    `folder` is where the process writes (the run folder): a refused write without a file name is on its disk. The
    hook itself never fails: whatever the exception carries (a bytes or str file name, none), it prints its line.
    In a torchrun job a process that fails tells the others (FAILED_KEY), which then name it in their own line; once
    the line is printed, SIGTERM (torchrun's, to every process when one fails) is ignored for the rest of the exit."""
    previous = sys.excepthook

    def hook(kind, error, traceback):
        try:  # the process is ending: torchrun's SIGTERM, sent when a process fails, must not interrupt this hook or
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the cleanup at exit with a traceback of its own
        except ValueError:  # not the main thread
            pass
        try:
            line = describe(kind, error)
        except Exception:  # noqa: BLE001 - a handler that fails would print its own traceback over the original
            line = None
        try:  # a failure of this process's own, in a torchrun job: tell the others
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and not (
                    issubclass(kind, KeyboardInterrupt) or peer_failed(kind, error)):
                tell_the_others(f"process {dist.get_rank()} failed: {line or one_line(error) + ' (a traceback)'}")
        except Exception:  # noqa: BLE001
            pass
        if line is None:
            return previous(kind, error, traceback)
        try:
            step = next_step()
        except Exception as e:  # noqa: BLE001
            step = f"(what to do next is unknown: {one_line(e, 60)})"
        if enabled or issubclass(kind, RuntimeError):  # a failed peer: every process says so, and what to do
            print(f"\nerror: {line}; {step}", file=sys.stderr, flush=True)
        elif not issubclass(kind, KeyboardInterrupt):  # another process of a torchrun job: its own cause, named
            print(f"\nerror (process {os.environ.get('RANK', '?')}): {line}", file=sys.stderr, flush=True)

    def describe(kind, error) -> Optional[str]:
        if issubclass(kind, KeyboardInterrupt):
            line = f"interrupted{' by SIGTERM' if str(error) == 'SIGTERM' else ''}"
            if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
                return line
            other = what_the_others_said()  # torchrun ends every process with SIGTERM when one fails
            why = f" after {other}" if other else (" (torchrun ends every process when one fails: another process "
                                                   "failed, or the job was stopped)" if str(error) == "SIGTERM" else "")
            return f"process {dist.get_rank()}: {line}{why}"
        if issubclass(kind, OSError) and error.errno in REFUSED_WRITES:
            name = getattr(error, "filename", None)
            where = Path(os.fsdecode(name)).absolute().parent if isinstance(name, (str, bytes, os.PathLike)) else (
                Path(folder).absolute() if folder is not None else Path.cwd())
            while not where.exists() and where != where.parent:
                where = where.parent
            try:
                free = f"; {shutil.disk_usage(where).free / 1e6:.1f} MB free on the disk of {str(where)!r}"
            except OSError:
                free = ""
            return f"a write failed ({one_line(error)}{free})"
        name = getattr(error, "filename", None)
        if issubclass(kind, FileNotFoundError) and folder is not None and isinstance(name, (str, bytes, os.PathLike)) \
                and Path(folder).absolute() in Path(os.fsdecode(name)).absolute().parents:
            return (f"the run folder {str(folder)!r} was removed or moved while the run wrote to it "
                    f"({one_line(error, 100)})")
        if peer_failed(kind, error):
            other = what_the_others_said()
            if other:
                return f"process {dist.get_rank()}: stopped because {other}"
            said = " ".join(str(error).split("] ", 1)[-1].split())[:100]  # gloo's message, without its source file
            return (f"process {os.environ.get('RANK', '?')}: another process of this torchrun job failed or stopped "
                    f"answering (RuntimeError: {said}); a process waits {collective_timeout():g} s for the others "
                    f"(set {TIMEOUT_VARIABLE} to change it)")
        return None

    def peer_failed(kind, error) -> bool:
        return issubclass(kind, RuntimeError) and dist.is_available() and dist.is_initialized() and any(
            sign in str(error) for sign in PEER_FAILURES)

    def thread_hook(info):  # a writer thread (TensorBoard's) that fails hands its error to the main thread's next write
        if not (issubclass(info.exc_type, OSError) and info.exc_value.errno in REFUSED_WRITES):
            previous_thread_hook(info)

    sys.excepthook, previous_thread_hook, threading.excepthook = hook, threading.excepthook, thread_hook
    if threading.current_thread() is threading.main_thread():  # SIGTERM (a scheduler, torchrun, a study) as Ctrl-C:
        signal.signal(signal.SIGTERM, _terminated)  # the run unwinds, releases its folder and says how to continue
        signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored (`cmd &`)


def _terminated(signum, frame):
    raise KeyboardInterrupt("SIGTERM")


# How long a process waits in a collective for the others (a stopped or wedged process, a stuck reward server) before
# the whole torchrun job ends, every process with one line: DIFFUSION_RL_TIMEOUT seconds in the environment, 600 by
# default (torch's own are 30 minutes on gloo and 10 on NCCL, and end the job with a traceback). An epoch's longest
# wait is the main process's evaluation, image grids and checkpoint: well under a minute for SD 1.5 on a GPU.
TIMEOUT_VARIABLE = "DIFFUSION_RL_TIMEOUT"


def collective_timeout() -> float:
    value = os.environ.get(TIMEOUT_VARIABLE, "600")
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        fail(f"{TIMEOUT_VARIABLE}={value}: must be a finite number of seconds > 0")
    return seconds


PIPE_TIMEOUT = 10.0  # seconds a file that is a pipe may take to deliver its text


_PIPES = {}  # a pipe's path -> its bytes: a pipe can be read only once, and a run reads its prompts several times


def read_input_file(path: str) -> bytes:
    """The bytes of a file given on the command line (a prompt file). A regular file is read as it is; a pipe
    (`--prompt-file <(...)`, a FIFO) is read once, to its end, for at most PIPE_TIMEOUT seconds (a FIFO that no program
    writes would block forever), and kept for the process's life."""
    import select
    import stat

    if stat.S_ISREG(os.stat(path).st_mode):
        return Path(path).read_bytes()
    if path in _PIPES:
        return _PIPES[path]
    if not stat.S_ISFIFO(os.stat(path).st_mode):
        raise IsADirectoryError(errno.EISDIR, "not a regular file or a pipe", path) if Path(path).is_dir() else \
            OSError(errno.EINVAL, "not a regular file or a pipe", path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO without a writer would block at open
    chunks, deadline = [], time.monotonic() + PIPE_TIMEOUT
    try:
        poll = select.poll()
        poll.register(fd, select.POLLIN)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                fail(f"prompt file {path!r} is a pipe that gave no end of file within {PIPE_TIMEOUT:g} s (no program "
                     f"writes it?); give a regular file, or a pipe whose writer finishes")
            if not poll.poll(left * 1000):
                continue
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:
                continue
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(fd)
    _PIPES[path] = b"".join(chunks)
    return _PIPES[path]


# ----------------------------------------------------------------------------------------------------
# Flags: checked by name before anything loads, so every script that has a flag checks it the same way
# ----------------------------------------------------------------------------------------------------


def _at_least(n):
    return f"an integer >= {n}", lambda v: v >= n


_POSITIVE = "a finite number > 0", lambda v: math.isfinite(v) and v > 0
_SIZE = _at_least(1)
# flag -> (what it must be, test). A comparison with NaN is False, so every test below also rejects NaN. A flag that
# only one method has is checked in its script, after this.
FLAG_RULES = {
    "num_epochs": _at_least(1),
    "save_every": ("an integer >= 0 (0 saves only at the end)", lambda v: v >= 0),
    "image_every": ("an integer >= 0 (0 logs no images)", lambda v: v >= 0),
    "eval_num_steps": ("step counts in [1, 1000] (none: only --num-steps)", lambda v: all(1 <= n <= 1000 for n in v)),
    "lora_rank": ("an integer >= 0 (0 trains the whole UNet)", lambda v: v >= 0),
    "lora_alpha": ("a finite number > 0, or omitted for the rank", lambda v: v is None or (math.isfinite(v) and v > 0)),
    "num_steps": ("an integer in [1, 1000], Stable Diffusion's training timesteps", lambda v: 1 <= v <= 1000),
    "guidance": ("a finite number", math.isfinite),
    "sample_batch_size": _SIZE, "num_batches_per_epoch": _SIZE, "train_batch_size": _SIZE,
    "gradient_accumulation_steps": _SIZE, "num_inner_epochs": _SIZE, "value_batch_size": _SIZE, "k": _SIZE,
    "learning_rate": _POSITIVE, "value_learning_rate": _POSITIVE, "adam_epsilon": _POSITIVE,
    "adam_beta1": ("in [0, 1)", lambda v: 0 <= v < 1), "adam_beta2": ("in [0, 1)", lambda v: 0 <= v < 1),
    "weight_decay": ("a finite number >= 0", lambda v: math.isfinite(v) and v >= 0),
    "max_grad_norm": ("> 0 (a negative norm reverses every update; inf turns clipping off)", lambda v: v > 0),
    "clip": ("> 0 (a negative range drops the gradient of every ratio on one side)", lambda v: v > 0),
    "adv_clip_max": ("> 0 (a negative bound sets every advantage to it)", lambda v: v > 0),
    "timestep_fraction": ("in (0, 1]", lambda v: 0 < v <= 1),
    "timesteps_per_call": ("an integer >= 1, or omitted for the device's default", lambda v: v is None or v >= 1),
    "beta": ("a finite number >= 0 (0 turns the KL term off)", lambda v: math.isfinite(v) and v >= 0),
    "resolution": ("a positive multiple of 8 (pixels), or omitted for the model family's default",
                   lambda v: v is None or (v > 0 and v % 8 == 0)),
}
# --eta and --eval-eta depend on the family (checked in `fill_family_defaults`): family -> flag -> (requirement, test).
# DDIM's eta: above 1 a step's variance exceeds DDPM's and the mean's sqrt(1 - a' - sigma^2) turns NaN. Flow-GRPO's
# noise level a: std_t = a sqrt(sigma / (1 - sigma)) is finite for any a (flow_grpo/diffusers_patch/
# sd3_sde_with_logprob.py, line 47). 0 is deterministic, without log-probabilities: evaluation only.
ETA_RULES = {
    "sd": {"eta": ("in (0, 1]: 0 is deterministic and has no log-probabilities; above 1 a step's variance exceeds "
                   "DDPM's and the mean's sqrt(1 - a' - sigma^2) turns NaN", lambda v: 0 < v <= 1),
           "eval_eta": ("in [0, 1] on an SD 1.x/2.x model (DDIM's eta; 0 evaluates the deterministic sampler)",
                        lambda v: 0 <= v <= 1)},
    "flow": {"eta": ("a finite number > 0 on an SD 3.x model (Flow-GRPO's noise level a; 0 is the ODE, which has no "
                     "log-probabilities)", lambda v: math.isfinite(v) and v > 0),
             "eval_eta": ("a finite number >= 0 on an SD 3.x model (0 evaluates the ODE, as Flow-GRPO)",
                          lambda v: math.isfinite(v) and v >= 0)},
}


# The sampling flags a script leaves unset take its model family's defaults: on SD 1.x/2.x the script's own (its
# paper's, `SD_DEFAULTS` at the top of each script, over SD_COMMON_DEFAULTS); on SD 3.x Flow-GRPO's SD 3.5 configs
# (yifan123/flow_grpo config/grpo.py, geneval_sd3 and pickscore_sd3: 10 steps, guidance 4.5, evaluation at 40 steps,
# timestep_fraction 0.99; config/base.py: noise level 0.7; its evaluation samples with noise level 0,
# scripts/train_sd3.py line 258): no method here has a flow source of its own. (Flow-GRPO's learning rate 3e-4 and
# clip range 1e-4 are DDPO's, which PPO and LOOP already use.) An unset --eval-eta on SD 1.x/2.x stays unset: the
# evaluation samples with --eta, as it always has (and a checkpoint of an earlier version resumes unchanged).
# docs/flow.md has the table with every line.
FLOW_DEFAULTS = dict(num_steps=10, guidance=4.5, eta=0.7, timestep_fraction=0.99, eval_eta=0.0, eval_num_steps=(40,))
SD_COMMON_DEFAULTS = dict(timestep_fraction=1.0, eval_num_steps=(25, 100))


def check_flags(args, rules: Optional[dict] = None):
    """FLAG_RULES (and a tool's own `rules`, in the same form) for every flag `args` has, by name: the benchmarks and
    the world tools check the flags they share with the scripts exactly as the scripts do."""
    for name, (requirement, ok) in {**FLAG_RULES, **(rules or {})}.items():
        if hasattr(args, name) and not ok(getattr(args, name)):
            fail(f"--{name.replace('_', '-')} {getattr(args, name)}: must be {requirement}")


def divergence_hint(args) -> str:
    """The usual causes of non-finite losses, gradients or images, with this run's values."""
    value_lr = f" or --value-learning-rate {args.value_learning_rate:g}" if hasattr(args, "value_learning_rate") else ""
    return (f"likely causes: --learning-rate {args.learning_rate:g}{value_lr} too large, --guidance {args.guidance:g} "
            f"too large, or a reward of huge scale; lower the learning rate, then resume an earlier checkpoint or "
            f"start again")
