"""Run folders (runs.py), one test per class of defect, each seeded by its repro:
one writer per run folder; a resume that keeps the experiment, or branches it with --fork; one line for what a user
can cause (a prompt the reward cannot score, a damaged training state, Ctrl-C, SIGTERM, a full disk); a study that
reuses only runs of the same command and stops its children with itself.

Where a run can be in this process it is (tests/helpers.in_process: the libraries load once); where the property is
about a process (its exit, its signals, its stderr) it is a real one."""

import errno
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import OFFLINE, PYTHON, ROOT, as_a_process, error_line, in_process, lora_weights, training_state

import cli
import common
import runs

# The repro flags: a 4-image epoch of the toy task, 4 steps, one minibatch.
T = ["--model", "tiny", "--reward", "color", "--prompts", "colors", "--num-steps", 4, "--sample-batch-size", 4,
     "--num-batches-per-epoch", 1, "--train-batch-size", 4, "--image-every", 0]


def start(script: str, *argv, sigint_ignored: bool = False) -> subprocess.Popen:
    """The script as a process; `sigint_ignored`: as a shell starts `cmd &`, with SIGINT ignored."""
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None
    return subprocess.Popen([PYTHON, str(ROOT / f"{script}.py"), *map(str, argv)], cwd=ROOT, env=OFFLINE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=ignore)


def wait_for(condition, seconds: float = 120):
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.1)


def test_a_second_run_on_a_folder_in_use_is_refused_and_a_dead_owners_lock_is_taken_over(tmp_path, monkeypatch):
    """The issue's repro: two runs with the same --run-name. The second is refused in one line naming the folder and
    the first run's pid; every checkpoint then holds the first run's record. A lock file whose owner is gone (killed
    with SIGKILL: no exit handler ran) does not stop the next run."""
    first = start("reinforce", *T, "--num-epochs", 40, "--save-every", 1, "--output-dir", tmp_path,
                  "--run-name", "same")
    lock = tmp_path / ".same.lock"
    wait_for(lambda: lock.exists() and lock.read_text())
    line = in_process("reinforce", [*T, "--num-epochs", 4, "--save-every", 1, "--output-dir", tmp_path, "--run-name",
                                    "same", "--seed", 5, "--reward", "jpeg_compressibility"], monkeypatch)
    assert line.startswith(f"error: the run folder '{tmp_path / 'same'}' is in use by another run (pid {first.pid} on ")
    assert "\n" not in line
    (tmp_path / "latest").symlink_to(tmp_path / "same")  # the same folder by another name is the same folder
    line = in_process("reinforce", [*T, "--num-epochs", 4, "--output-dir", tmp_path, "--run-name", "latest"],
                      monkeypatch)
    assert f"is in use by another run (pid {first.pid} on " in line
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    records = [training_state(p)["record"] for p in sorted((tmp_path / "same" / "checkpoints").iterdir())]
    assert len(records) == 40 and {r["run"] for r in records} == {records[0]["run"]}
    assert records[0]["experiment"]["seed"] == 42 and not lock.exists()  # released at exit

    holder = subprocess.Popen([PYTHON, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | "
                               "os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'pid 1 on elsewhere'); "
                               "print('held', flush=True); time.sleep(600)", str(tmp_path / ".other.lock")],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    argv = [*T, "--num-epochs", 1, "--output-dir", tmp_path, "--run-name", "other"]
    assert "is in use by another run (pid 1 on elsewhere)" in in_process("reinforce", argv, monkeypatch)
    holder.kill()
    holder.wait()
    assert (tmp_path / ".other.lock").exists() and in_process("reinforce", argv, monkeypatch) == ""
    assert (tmp_path / "other" / "checkpoints" / "epoch_0001").is_dir() and not (tmp_path / ".other.lock").exists()


@pytest.fixture(scope="module")
def loop_run(tmp_path_factory):
    """loop.py for 2 epochs of the repro's setting, a checkpoint after each."""
    out = tmp_path_factory.mktemp("loop")
    with pytest.MonkeyPatch.context() as monkeypatch:
        assert in_process("loop", [*T, "--gradient-accumulation-steps", 1, "--num-epochs", 2, "--save-every", 1,
                                   "--output-dir", out, "--run-name", "a"], monkeypatch) == ""
    return out / "a"


def test_resume_refuses_a_changed_experiment_in_one_line_naming_both_values(loop_run, tmp_path, monkeypatch):
    """The issue's repro: --resume with another reward continued silently. Each flag that defines the experiment
    is refused, naming both values, and nothing is written; the flags the README lists as free are not."""
    (tmp_path / "prompts.txt").write_text("a red square\n")
    base = [*T, "--gradient-accumulation-steps", 1, "--num-epochs", 3, "--resume", loop_run]
    cases = [(["--reward",
               "jpeg_compressibility"], "--reward jpeg_compressibility here, --reward color in the checkpoint"),
             (["--seed", 5], "--seed 5 here, --seed 42 in the checkpoint"),
             (["--prompt-file", tmp_path / "prompts.txt"], f"--prompt-file {tmp_path / 'prompts.txt'} (text sha256 "),
             (["--sample-batch-size", 8, "--k",
               4], "--sample-batch-size 8 here, --sample-batch-size 4 in the checkpoint"),
             (["--clip", 0.5], "--clip 0.5 here, --clip 0.0001 in the checkpoint"),
             (["--num-steps", 3], "--num-steps 3 here, --num-steps 4 in the checkpoint"),
             (["--reward", "jpeg_compressibility", "--seed", 5], "(and 1 more: seed)"),
]
    problems = []
    for flags, message in cases:
        line = in_process("loop", [*base, "--output-dir", tmp_path / "runs", *flags], monkeypatch)
        if not (line.startswith("error: cannot resume from ") and message in line and "add --fork" in line
                and "\n" not in line):
            problems.append(f"{flags}: {line!r}")
    assert not problems
    line = in_process("loop", [*base[:-2], "--fork", "--output-dir", tmp_path / "runs"], monkeypatch)
    assert line == "error: --fork branches a resumed run into a new run folder; give --resume too"
    assert not (tmp_path / "runs").exists() and sorted(p.name for p in loop_run.parent.iterdir()) == ["a"]
    # free flags: a new learning rate, epochs, logging, precision; continues in the same folder
    home = tmp_path / "home"
    import shutil

    shutil.copytree(loop_run, home)
    assert in_process("loop", [*base[:-1], home, "--learning-rate", 1e-3, "--image-every", 1, "--eval-num-steps", 2,
                               "--mixed-precision", "no", "--save-every", 5], monkeypatch) == ""
    assert (home / "checkpoints" / "epoch_0003").is_dir() and sorted(p.name for p in tmp_path.iterdir()) == [
        "home", "prompts.txt"]


def test_fork_branches_a_changed_experiment_into_a_new_folder(loop_run, tmp_path, monkeypatch, capsys):
    """--fork with another seed: a new run folder beside the original, which stays byte for byte; its record names
    the parent and what changed, and its weights start from the checkpoint's."""
    home = tmp_path / "a"
    import shutil

    shutil.copytree(loop_run, home)
    before = {p.relative_to(home): p.read_bytes() for p in home.rglob("*") if p.is_file()}
    assert in_process("loop", [*T, "--gradient-accumulation-steps", 1, "--num-epochs", 3, "--seed", 5, "--fork",
                               "--resume", home], monkeypatch) == ""
    assert "--fork: this run branches from" in capsys.readouterr().out
    assert {p.relative_to(home): p.read_bytes() for p in home.rglob("*") if p.is_file()} == before
    (branch,) = [p for p in tmp_path.iterdir() if p.name.startswith("a__from_epoch_0002__")]
    record = training_state(branch / "checkpoints" / "epoch_0003")["record"]
    original = training_state(home / "checkpoints" / "epoch_0002")["record"]
    assert record["parent"].startswith(f"{original['run']} at {home / 'checkpoints' / 'epoch_0002'}, changing seed")
    assert record["experiment"]["seed"] == 5 and record["run"] != original["run"]
    line = in_process("loop", [*T, "--gradient-accumulation-steps", 1, "--num-epochs", 3, "--seed", 5, "--fork",
                               "--resume", home, "--output-dir", tmp_path, "--run-name", "a"], monkeypatch)
    assert line.startswith("error: --run-name a: --fork branches a changed experiment into a new run folder")
    # the stop message says "the same flags": with --fork and nothing changed, the branch continues in place
    assert in_process("loop", [*T, "--gradient-accumulation-steps", 1, "--num-epochs", 4, "--seed", 5, "--fork",
                               "--resume", branch], monkeypatch) == ""
    assert (branch / "checkpoints" / "epoch_0004").is_dir() and len(list(tmp_path.iterdir())) == 2
    # a checkpoint from before records held the experiment: refused, or branched with --fork
    old = tmp_path / "old"
    shutil.copytree(loop_run, old)
    path = old / "checkpoints" / "epoch_0002" / runs.STATE_FILE
    state = torch.load(path, weights_only=True)
    del state["record"]["experiment"]
    torch.save(state, path)
    argv = [*T, "--gradient-accumulation-steps", 1, "--num-epochs", 3, "--resume", old]
    assert "it does not record its experiment" in in_process("loop", argv, monkeypatch)
    assert in_process("loop", [*argv, "--fork"], monkeypatch) == ""
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("old__from_epoch_0002__")]) == 1


def test_the_gradscaler_state_loads_only_where_both_runs_use_fp16():
    """--mixed-precision may change on resume: a run saved without fp16 has an empty scaler state, and a run resumed
    without fp16 has a disabled scaler; neither is an error, and fp16 to fp16 keeps the scale."""
    on, off = torch.amp.GradScaler("cpu", enabled=True, init_scale=2.0**10), torch.amp.GradScaler("cpu", enabled=False)
    runs.load_scaler(on, off.state_dict())  # fp32 -> fp16: a fresh scaler
    runs.load_scaler(off, on.state_dict())  # fp16 -> fp32: none needed
    saved = torch.amp.GradScaler("cpu", enabled=True, init_scale=2.0**7).state_dict()
    runs.load_scaler(on, saved)
    assert off.state_dict() == {} and on.get_scale() == 2.0**7


def test_a_damaged_training_state_is_refused_before_the_model_loads(loop_run, tmp_path, monkeypatch):
    """A state that loads but lacks `optimizer` (or, from an older version, `record`): one line, before the model
    loads (load_pipeline here fails the test if it is reached)."""
    import shutil

    def loads(*args, **kwargs):
        raise AssertionError("the model loaded before the damaged state was refused")

    problems = []
    for key, message in [("optimizer", "its training state lacks 'optimizer' (damaged)"),
                         ("record", "does not record the script and flags that wrote it")]:
        home = tmp_path / key
        shutil.copytree(loop_run, home)
        path = home / "checkpoints" / "epoch_0002" / runs.STATE_FILE
        state = torch.load(path, weights_only=True)
        del state[key]
        torch.save(state, path)
        with monkeypatch.context() as m:
            m.setattr(common, "load_pipeline", loads)
            line = in_process("loop", [*T, "--gradient-accumulation-steps", 1, "--num-epochs", 3, "--resume", home], m)
        if not (line.startswith("error: cannot resume from ") and message in line):
            problems.append(f"{key}: {line!r}")
    assert not problems
    # a state that loads and lacks a key its record does not list (written before records listed them)
    state = runs.TrainingState({"epoch": 1})
    state.path = "x"
    with pytest.raises(SystemExit, match="its training state lacks 'optimizer'"):
        state["optimizer"]


@pytest.mark.parametrize("reward, prompts, message", [
    ("color", "simple_animals", "the color reward needs prompts that name one of"),
    ("shapes", "colors", "the shapes reward needs prompts that name '<colour> <shape>' objects")])
def test_prompts_a_reward_cannot_score_are_refused_before_the_model_loads(reward, prompts, message, tmp_path,
                                                                          monkeypatch):
    def loads(*args, **kwargs):
        raise AssertionError("the model loaded before the prompts were checked")

    monkeypatch.setattr(common, "load_pipeline", loads)
    line = in_process("loop", [*T, "--gradient-accumulation-steps", 1, "--num-epochs", 1, "--reward", reward,
                               "--prompts", prompts, "--output-dir", tmp_path / "runs"], monkeypatch)
    assert line.startswith(f"error: {message}") and "\n" not in line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_end_a_run_in_one_line_saying_how_to_continue(signum, tmp_path):
    """Stopped after its first checkpoints: no traceback, a non-zero exit, one line naming the newest complete
    checkpoint and the --resume that continues it, and the folder's lock released. SIGINT is sent to a run started
    with SIGINT ignored, as a shell starts `cmd &`: a run takes Ctrl-C's handler back."""
    proc = start("loop", *T, "--gradient-accumulation-steps", 1, "--num-epochs", 500, "--save-every", 1,
                 "--output-dir", tmp_path, "--run-name", "a", sigint_ignored=signum == signal.SIGINT)
    wait_for(lambda: (tmp_path / "a" / "checkpoints" / "epoch_0002").is_dir())
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip()]
    newest = runs.checkpoint_folders(tmp_path / "a")[-1][1]
    assert proc.returncode != 0 and "Traceback" not in err, err[-3000:]
    assert lines[-1] == (f"error: interrupted{' by SIGTERM' if signum == signal.SIGTERM else ''}; the newest "
                         f"checkpoint is {newest}; continue with the same flags and --resume {tmp_path / 'a'}")
    assert not (tmp_path / ".a.lock").exists()


FULL_DISK = """
import errno, runpy, sys
import {module} as target
def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", "{where}")
setattr({attribute}, full)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("what, module, attribute", [
    ("an image grid", "PIL.Image", "target.Image, 'save'"),
    ("TensorBoard's events", "tensorboard.summary.writer.record_writer", "target.RecordWriter, 'write'")])
def test_a_full_disk_while_writing_images_or_events_ends_the_run_in_one_line(what, module, attribute, tmp_path):
    """The disk fills (simulated: the write raises ENOSPC, as a full disk makes it) while the run writes an image
    grid, or while TensorBoard's writer thread writes its events: one line, no traceback (also none from the
    writer's thread), and the newest checkpoint intact."""
    script = FULL_DISK.format(module=module, attribute=attribute, where=tmp_path / "a" / "file")
    argv = [*T, "--gradient-accumulation-steps", 1, "--num-epochs", 2, "--image-every", 1, "--eval-num-steps",
            "--output-dir", tmp_path, "--run-name", "a"]
    proc = subprocess.run([PYTHON, "-c", script, str(ROOT / "loop.py"), *map(str, argv)], cwd=ROOT, env=OFFLINE,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert error_line(proc).startswith("error: a write failed (OSError: [Errno 28] No space left on device") and (
        "MB free on the disk of " in error_line(proc)), error_line(proc)
    assert error_line(proc).endswith("start the run again") or "--resume" in error_line(proc)
    for _, folder in runs.checkpoint_folders(tmp_path / "a"):
        assert runs.checkpoint_problem(folder) is None and lora_weights(folder)


def test_only_a_refused_write_or_an_interrupt_loses_its_traceback(capsys):
    """The hook turns ENOSPC and Ctrl-C into one line; a missing file, a permission error (reads raise those too)
    and any other exception reach the previous hook, with their tracebacks."""
    seen = []
    with as_a_process():
        sys.excepthook = lambda kind, error, tb: seen.append(kind)
        cli.exit_in_one_line(lambda: "what to do")
        for error in (OSError(errno.ENOSPC, "No space left on device", "/x/y"), KeyboardInterrupt(),
                      OSError(errno.ENOENT, "No such file"), OSError(errno.EACCES, "Permission denied"), ValueError()):
            sys.excepthook(type(error), error, None)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("error: a write failed (OSError: [Errno 28] No space left on device")
    assert lines[0].endswith("; what to do")
    assert lines[-1] == "error: interrupted; what to do" and len([x for x in lines if x]) == 2
    assert seen == [FileNotFoundError, PermissionError, ValueError]


STUDY = [PYTHON, str(ROOT / "benchmarks" / "study.py"), "--methods", "reinforce_k4", "--seeds", "1", "--final-images",
         "8",
         "--eval-every", "1", "--jobs", "1"]


def test_the_study_reuses_only_runs_of_the_same_command(tmp_path):
    """The same study with --num-steps 2, then 6, on one --out: the second once reused the first's run (it took 3 s
    and rewrote the table from the 2-step runs). Now results of other settings are never mixed: the second stops in
    one line naming the setting that differs and leaves the first's results and runs as they were, and a third call
    with the first's flags reuses its run."""
    import csv

    def study(steps):
        return subprocess.run([*STUDY, "--images", "16", "--num-steps", str(steps), "--out", str(tmp_path)], cwd=ROOT,
                              env=OFFLINE, capture_output=True, text=True, timeout=600)

    rows = lambda: [(r["images"], r["eval_reward"]) for r in csv.DictReader(open(tmp_path / "evals.csv"))]
    first = study(2)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    rows2, folders = rows(), sorted(p.name for p in (tmp_path / "runs").iterdir())
    other = study(6)
    assert other.returncode == 1 and other.stderr.strip().splitlines() == [other.stderr.strip()]
    assert "--num-steps 2 there, 6 here" in other.stderr and "skip" not in other.stdout
    assert rows() == rows2 and sorted(p.name for p in (tmp_path / "runs").iterdir()) == folders
    again = study(2)
    assert again.returncode == 0 and "skip reinforce_k4__1__" in again.stdout and rows() == rows2


def test_a_stopped_study_stops_its_runs_and_refuses_an_unusable_out(tmp_path):
    proc = subprocess.Popen([*STUDY, "--images", "480", "--out", str(tmp_path)], cwd=ROOT, env=OFFLINE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    def owners():  # "pid N on HOST since ..." of the runs in progress (a lock may go between glob and read)
        found = []
        for path in (tmp_path / "runs").glob(".*.lock"):
            try:
                found += [int(path.read_text().split()[1])] if path.read_text() else []
            except (OSError, IndexError, ValueError):
                pass
        return found

    wait_for(lambda: (tmp_path / "runs").is_dir() and owners())
    child = owners()[0]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: stopped by SIGTERM, with the runs in progress")
    with pytest.raises(ProcessLookupError):  # stopped and reaped before the study exited
        os.kill(child, 0)
    (tmp_path / "a_file").write_text("")
    for out, message in [(tmp_path / "a_file", "is a file"), (tmp_path / "a_file" / "below", "is a file")]:
        bad = subprocess.run([*STUDY, "--out", str(out)], cwd=ROOT, env=OFFLINE, capture_output=True, text=True,
                             timeout=120)
        assert bad.returncode == 1 and message in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
