"""Reliability, one test per class of failure: bad flags fail in one line before anything loads or is written; a
reward that raises, non-finite images and non-finite rewards are told apart; a diverged run never leaves a checkpoint
that resume picks; resume checks the script and flags of what it resumes, branches from an older checkpoint instead of
overwriting later ones, and falls back from a damaged newest checkpoint.

The scripts run in this process as `python script.py ...` would (runpy; the libraries are imported once, so a case
that fails before the model loads takes ~0.1 s and a run of the tiny model a second or two); one test runs the real
command line to check the exit status and that stderr holds no traceback."""

import dataclasses
import errno
import importlib
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import (OFFLINE, PYTHON, ROOT, as_a_process, benchmark, error_line, in_process, lora_weights, run,
                     training_state)

import cli
import common
import rewards
import runs

SCRIPTS = ["reinforce", "ppo", "loop", "dpok", "score_as_action"]
# Valid for every script: 4 images (one LOOP group of 4), 2 steps, minibatches of 2.
QUICK = ["--model", "tiny", "--reward", "color", "--prompts", "colors", "--num-steps", 2, "--sample-batch-size", 4,
         "--num-batches-per-epoch", 1, "--train-batch-size", 2, "--num-epochs", 1, "--image-every", 0]

# (flags, what the one-line error must say); a case runs for every script that has its first flag.
BAD_FLAGS = [
    (["--num-epochs", 0], "--num-epochs 0: must be an integer >= 1"),
    (["--save-every", -1], "--save-every -1: must be"),
    (["--image-every", -1], "--image-every -1: must be"),
    (["--num-steps", 0], "--num-steps 0: must be"),
    (["--num-steps", 2000], "--num-steps 2000: must be an integer in [1, 1000]"),
    (["--sample-batch-size", 0], "--sample-batch-size 0: must be"),
    (["--num-batches-per-epoch", 0], "--num-batches-per-epoch 0: must be"),
    (["--train-batch-size", 0], "--train-batch-size 0: must be"),
    (["--gradient-accumulation-steps", 0], "--gradient-accumulation-steps 0: must be"),
    (["--num-inner-epochs", 0], "--num-inner-epochs 0: must be"),
    (["--timestep-fraction", 0], "--timestep-fraction 0.0: must be in (0, 1]"),
    (["--timestep-fraction", 1.5], "--timestep-fraction 1.5: must be in (0, 1]"),
    (["--timestep-fraction", 0.25], "= 0 timesteps per trajectory"),
    (["--learning-rate", "nan"], "--learning-rate nan: must be a finite number > 0"),
    (["--learning-rate", -1], "--learning-rate -1.0: must be a finite number > 0"),
    (["--value-learning-rate", "inf"], "--value-learning-rate inf: must be a finite number > 0"),
    (["--max-grad-norm", -1], "--max-grad-norm -1.0: must be > 0"),
    (["--clip", -1], "--clip -1.0: must be > 0"),
    (["--adv-clip-max", -1], "--adv-clip-max -1.0: must be > 0"),
    (["--lora-rank", -1], "--lora-rank -1: must be"),
    (["--lora-alpha", 0], "--lora-alpha 0.0: must be"),
    (["--eta", 0], "--eta 0.0: must be in (0, 1]"),
    (["--eta", 1.5], "--eta 1.5: must be in (0, 1]"),
    (["--guidance", "nan"], "--guidance nan: must be a finite number"),
    (["--adam-beta2", 1], "--adam-beta2 1.0: must be in [0, 1)"),
    (["--weight-decay", -1], "--weight-decay -1.0: must be"),
    (["--beta", "nan"], "--beta nan: must be"),
    (["--value-batch-size", 0], "--value-batch-size 0: must be"),
    (["--k", 0], "--k 0"),
    (["--k", 3], "must hold whole groups of --k 3"),
    (["--device", "nonsense"], "--device 'nonsense' is not a device"),
    (["--resume", "/nonexistent/run"], "no checkpoint found"),
    (["--prompt-file", "/nonexistent/prompts.txt"], "cannot read prompt file"),
]
if not torch.cuda.is_available():
    BAD_FLAGS.append((["--device", "cuda"], "--device cuda: torch sees no CUDA GPU"))
SPECIFIC = {
    "ppo": [(["--stat-min-count", 17], "--stat-min-count 17 must be in [1, --stat-buffer-size 16]")],
    "loop": [(["--k", 1], "at least two images per prompt")],
    "dpok": [(["--alpha", 0], "--alpha 0.0: must be a finite number > 0"),
             (["--buffer-size", 1], "--buffer-size 1 must hold at least one micro-batch")],
    "score_as_action": [(["--eval-num-steps", 0], "--eval-num-steps")],
}


def check_cases(script, cases, monkeypatch, out):
    problems = []
    for argv, message in cases:
        line = in_process(script, [*QUICK, "--output-dir", out, *argv], monkeypatch)
        if not (line.startswith("error: ") and message in line and "\n" not in line):
            problems.append(f"{script} {' '.join(map(str, argv))}: {line!r} lacks {message!r}")
    return problems


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_flags_fail_in_one_line_before_anything_is_written(script, tmp_path, monkeypatch):
    """Every flag value that would crash later or silently change the algorithm, for every script that has the flag."""
    fields = {f.name for f in dataclasses.fields(importlib.import_module(script).Args)}
    cases = [(a, m) for a, m in BAD_FLAGS + SPECIFIC.get(script, []) if a[0][2:].replace("-", "_") in fields]
    out = tmp_path / "runs"
    assert not check_cases(script, cases, monkeypatch, out)
    assert not out.exists()  # no run folder and no events file after a failed start


def test_bad_places_fail_in_one_line(tmp_path, monkeypatch):
    """An output dir that is a file or not writable, a model folder whose model_index.json is {}: one line, nothing
    written. (Read-only is simulated: the suite may run as root, for whom permission bits do not stop a write.)"""
    (tmp_path / "a_file").write_text("")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model_index.json").write_text("{}")
    cases = [(["--output-dir", tmp_path / "a_file"], "is a file"),
             (["--output-dir", tmp_path / "a_file" / "below"], "is a file"),
             (["--model", tmp_path / "model"], "is not a complete diffusers Stable Diffusion folder (KeyError")]
    assert not check_cases("ppo", cases, monkeypatch, tmp_path / "runs")

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(runs.tempfile, "TemporaryDirectory", read_only)
    assert not check_cases("ppo", [([], "is not writable (OSError: [Errno 30] Read-only file system")], monkeypatch,
                           tmp_path / "runs")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "model"]


def test_the_real_command_line_prints_one_line_and_exits_1(tmp_path):
    proc = run("ppo", *QUICK, "--max-grad-norm", -1, "--output-dir", tmp_path, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert error_line(proc).startswith("error: --max-grad-norm -1.0: must be > 0") and not any(tmp_path.iterdir())


def test_raising_reward_nan_images_and_nan_rewards_are_told_apart(tmp_path, monkeypatch):
    def raises(images, prompts):
        raise ValueError("the reward server is down")

    def nan_images(pipe, latents):
        return torch.full((latents.shape[0], 3, 32, 32), float("nan"))

    argv = [*QUICK, "--output-dir", tmp_path, "--run-name", "r"]
    monkeypatch.setitem(rewards.REWARDS, "color", rewards.free(raises))
    line = in_process("loop", argv, monkeypatch)
    assert line.startswith("error: reward 'color' raised ValueError: the reward server is down") and "\n" not in line
    monkeypatch.setitem(rewards.REWARDS, "color",
                        rewards.free(lambda images, prompts: torch.full((images.shape[0],), float("nan"))))
    assert "returned non-finite values for finite images at epoch 0" in in_process("loop", argv, monkeypatch)
    monkeypatch.undo()
    monkeypatch.setattr(common, "decode_latents", nan_images)  # a diverged model, as the reward sees it
    line = in_process("loop", argv, monkeypatch)
    assert "non-finite images at epoch 0" in line and "--learning-rate 0.0003" in line and "--guidance 5" in line
    assert not (tmp_path / "r" / "checkpoints").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_diverged_run_leaves_no_checkpoint_that_resume_picks(tmp_path, monkeypatch, script):
    """lr 1e6: the first step throws the weights far off and the next gradients are NaN. The run stops naming the
    learning rate; no checkpoint holds non-finite weights, and any written from the diverged weights is renamed
    `*.diverged`, so that resume finds nothing to pick. (In this process: the model is built in a second.)"""
    fewer = ["--gradient-accumulation-steps", 1, "--num-policy-steps", 1] if script == "dpok" else []
    line = in_process(script, [*QUICK, *fewer, "--num-epochs", 4, "--save-every", 1, "--learning-rate", 1e6,
                               "--output-dir", tmp_path, "--run-name", "div"], monkeypatch)
    assert line.startswith("error: ") and "the model diverged" in line and "--learning-rate 1e+06" in line, line
    # epoch 1's weights gave a NaN gradient in epoch 2: the save is refused and epoch 1's checkpoint renamed
    folders = list((tmp_path / "div" / "checkpoints").glob("*"))
    assert [p.name for p in folders] == ["epoch_0001.diverged"]
    assert all(torch.isfinite(v).all() for v in lora_weights(folders[0]).values())  # what was written is finite
    with pytest.raises(SystemExit, match="diverged weights"):
        runs.find_checkpoint(tmp_path / "div")


def test_checked_reward_marks_non_finite_images_whatever_the_reward_says():
    """JPEG size scores a NaN image as if it were fine: the wrapper gives it NaN and `check` blames the model."""
    reward = runs.CheckedReward(rewards.jpeg_compressibility, "jpeg_compressibility")
    images = torch.rand(3, 3, 16, 16)
    images[1, 0, 0, 0] = float("nan")
    assert math.isfinite(rewards.jpeg_compressibility(images)[1])
    scores = reward(images, ["x"] * 3)
    assert scores[[0, 2]].isfinite().all() and scores[1].isnan()
    args = type("Args", (), dict(learning_rate=1e-4, guidance=5.0))()
    with pytest.raises(SystemExit, match="non-finite images at epoch 3"):
        reward.check(scores, 3, runs.Run(None, {}, args))
    reward.check(reward(torch.rand(2, 3, 16, 16), ["x"] * 2), 4, None)  # finite again: the count was reset
    with pytest.raises(SystemExit, match=r"returned torch.Size\(\[2, 1\]\) for 2 images"):
        runs.CheckedReward(lambda images, prompts: torch.zeros(2, 1), "bad")(torch.rand(2, 3, 8, 8), ["x"] * 2)


def test_save_refuses_non_finite_weights_and_a_full_disk_keeps_the_previous_checkpoint(tmp_path, tiny, monkeypatch):
    runs.save_checkpoint(tmp_path / "ckpt", tiny.unet, {"epoch": 1})
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}
    lora_b = next(p for n, p in tiny.unet.named_parameters() if "lora_B" in n)
    saved = lora_b.detach().clone()
    try:  # the shared tiny model: put its weight back whatever happens
        with torch.no_grad():
            lora_b[0, 0] = float("nan")
        with pytest.raises(SystemExit, match="not saving ckpt: the weights .* are not finite"):
            runs.save_checkpoint(tmp_path / "ckpt", tiny.unet, {"epoch": 2})
    finally:
        with torch.no_grad():
            lora_b.copy_(saved)
    with pytest.raises(SystemExit, match="training state are not finite"):
        runs.save_checkpoint(tmp_path / "ckpt", tiny.unet, {"epoch": 2, "value": [torch.tensor(math.inf)]})

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(SystemExit) as e:
        runs.save_checkpoint(tmp_path / "ckpt", tiny.unet, {"epoch": 2})
    assert "No space left on device" in str(e.value) and "\n" not in str(e.value)
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no .tmp left behind


def test_divergence_guard_skips_counts_and_stops(tmp_path):
    args = type("Args", (), dict(learning_rate=0.5, guidance=7.0))()
    run_ = runs.Run(tmp_path, {}, args)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    assert run_.step_ok(torch.tensor(1.0), scaler, 0)
    assert not run_.step_ok(torch.tensor(float("nan")), scaler, 0)
    assert not run_.step_ok(torch.tensor(math.inf), scaler, 0)
    assert run_.step_ok(torch.tensor(2.0), scaler, 0) and run_.skipped_steps == 2  # a finite step resets the count
    (tmp_path / "checkpoints" / "epoch_0003").mkdir(parents=True)
    run_.current = [tmp_path / "checkpoints" / "epoch_0003"]  # written from the current weights
    for _ in range(2):
        assert not run_.step_ok(torch.tensor(float("nan")), scaler, 1)
    with pytest.raises(SystemExit, match="3 optimiser steps in a row .* --learning-rate 0.5 too large"):
        run_.step_ok(torch.tensor(float("nan")), scaler, 1)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["epoch_0003.diverged"]



def test_the_on_policy_warning_comes_once_per_run_and_only_above_clip_over_10(tmp_path, capsys):
    run_ = runs.Run(tmp_path, {}, None)
    run_.check_on_policy(torch.tensor(1e-5), 1e-4, 0)  # at clip/10: quiet
    run_.check_on_policy(torch.tensor(float("nan")), 1e-4, 1)  # NaN is the divergence guard's business, not this one's
    assert capsys.readouterr().err == ""
    run_.check_on_policy(torch.tensor(3e-5), 1e-4, 2)
    run_.check_on_policy(torch.tensor(5e-4), 1e-4, 3)  # once per run, however large later
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: epoch 2: debug/ratio_dev_at_start 3.00e-05 exceeds "
                                                   "clip/10 = 1e-05")
    quiet = runs.Run(tmp_path, {}, None, enabled=False)  # the main process alone prints
    quiet.check_on_policy(torch.tensor(1.0), 1e-4, 0)
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------------------------------
# Resume
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory):
    """ppo.py for 2 epochs, a checkpoint after each."""
    out = tmp_path_factory.mktemp("ppo")
    with pytest.MonkeyPatch.context() as monkeypatch:
        assert in_process("ppo", [*QUICK, "--num-epochs", 2, "--save-every", 1, "--output-dir", out, "--run-name", "a"],
                          monkeypatch) == ""
    return out / "a"


def test_resume_refuses_another_script_other_flags_and_older_formats(ppo_run, tmp_path, monkeypatch):
    ckpt = ppo_run / "checkpoints" / "epoch_0001"
    cases = [(s, ["--resume", ppo_run], "it was written by ppo.py, not " + s) for s in SCRIPTS if s != "ppo"]
    cases += [("ppo", ["--resume", ckpt, *flags], message) for flags, message in [
        (["--lora-alpha", 8], "--lora-alpha 8.0 here, --lora-alpha 4.0 in the checkpoint"),
        (["--lora-rank", 2], "--lora-rank 2 here, --lora-rank 4 in the checkpoint"),
        (["--num-steps", 3], "--num-steps 3 here, --num-steps 2 in the checkpoint"),
        (["--guidance", 3], "--guidance 3.0 here, --guidance 5.0 in the checkpoint"),
        (["--num-epochs", 1], "it is at epoch 1 and --num-epochs is 1"),
        (["--num-epochs", 3, "--output-dir", ppo_run.parent, "--run-name", "a"],
         "would overwrite its later checkpoints (epoch_0002)")]]
    cases.append(("ppo", ["--output-dir", ppo_run.parent, "--run-name", "a"],
                  "already holds checkpoints of another run"))
    old = tmp_path / "old" / "checkpoints" / "epoch_0001"  # a checkpoint from before checkpoints had a record
    shutil.copytree(ckpt, old)
    state = training_state(old)
    del state["record"]
    torch.save(state, old / runs.STATE_FILE)
    cases.append(("ppo", ["--resume", old], "does not record the script and flags"))
    problems = []
    for script, argv, message in cases:
        line = in_process(script, [*QUICK, "--output-dir", tmp_path / "runs", *argv], monkeypatch)
        if not line.startswith("error: ") or message not in line or "\n" in line:
            problems.append(f"{script} {argv[2:]}: {line!r}")
    assert not problems
    assert not (tmp_path / "runs").exists() and sorted(p.name for p in (ppo_run / "checkpoints").iterdir()) == [
        "epoch_0001", "epoch_0002"]


def test_resume_from_an_older_checkpoint_branches_and_overwrites_nothing(ppo_run, tmp_path, monkeypatch, capsys):
    """From epoch 1 of a run that has epoch 2: a new run folder next to it, whose epoch 2 equals the original's
    (resume is exact), while the original folder is untouched; the branch records where it came from."""
    home = tmp_path / "a"
    shutil.copytree(ppo_run, home)
    before = {p.relative_to(home): p.read_bytes() for p in home.rglob("*") if p.is_file()}
    older = home / "checkpoints" / "epoch_0001"
    assert in_process("ppo", [*QUICK, "--num-epochs", 2, "--save-every", 1, "--resume", older], monkeypatch) == ""
    said = capsys.readouterr().out
    assert "epoch_0001 is older than its run's newest checkpoint epoch_0002: this run branches into" in said
    assert {p.relative_to(home): p.read_bytes() for p in home.rglob("*") if p.is_file()} == before
    (branch,) = [p for p in tmp_path.iterdir() if p.name.startswith("a__from_epoch_0001__")]
    a, b = lora_weights(home / "checkpoints" / "epoch_0002"), lora_weights(branch / "checkpoints" / "epoch_0002")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    original, branched = (training_state(p / "checkpoints" / "epoch_0002")["record"] for p in (home, branch))
    assert branched["run"] != original["run"] and branched["parent"].startswith(original["run"])
    assert branched["script"] == "ppo" and branched["flags"]["lora_rank"] == 4


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(ppo_run, tmp_path, monkeypatch, capsys):
    """epoch_0002 truncated: resuming the run folder says so, continues from epoch_0001 in the same folder, and
    writes an epoch_0002 equal to the original one."""
    home = tmp_path / "a"
    shutil.copytree(ppo_run, home)
    damaged = home / "checkpoints" / "epoch_0002" / runs.LORA_FILE
    damaged.write_bytes(damaged.read_bytes()[:-10])
    assert in_process("ppo", [*QUICK, "--num-epochs", 2, "--save-every", 1, "--resume", home], monkeypatch) == ""
    err = capsys.readouterr().err
    assert "epoch_0002 is damaged (pytorch_lora_weights.safetensors is truncated): resuming from epoch_0001" in err
    a, b = lora_weights(ppo_run / "checkpoints" / "epoch_0002"), lora_weights(home / "checkpoints" / "epoch_0002")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_resume_trains_with_the_learning_rate_given_now(ppo_run, tmp_path, monkeypatch):
    """The optimiser's moments come from the checkpoint, its learning rate from the flag (lowering it after a
    divergence is the point of resuming an earlier checkpoint)."""
    assert in_process("ppo", [*QUICK, "--num-epochs", 2, "--learning-rate", 1e-3, "--output-dir", tmp_path,
                              "--run-name", "b", "--resume", ppo_run / "checkpoints" / "epoch_0001"], monkeypatch) == ""
    state = training_state(tmp_path / "b" / "checkpoints" / "epoch_0002")
    assert state["optimizer"]["param_groups"][0]["lr"] == 1e-3 and state["optimizer"]["state"]


def test_newest_checkpoint_is_chosen_by_epoch_number(tmp_path, tiny):
    for epoch in (9999, 10000):
        runs.save_checkpoint(tmp_path / "checkpoints" / f"epoch_{epoch:04d}", tiny.unet, {"epoch": epoch})
    (tmp_path / "checkpoints" / "epoch_10001.tmp").mkdir()  # a save in progress is not a checkpoint
    path, state = runs.find_checkpoint(tmp_path)
    assert path.name == "epoch_10000" and state["epoch"] == 10000


# ----------------------------------------------------------------------------------------------------
# Regression table, third pass: one test per class of failure, each with its repro
# ----------------------------------------------------------------------------------------------------


def test_class_resume_is_exact_or_refused(ppo_run, tmp_path, monkeypatch):
    """A LoRA file holding half or none of its tensors loaded (only unexpected keys were checked) and the run said it
    resumed; random bytes in a weight file gave non-finite weights that diverged "with no checkpoint holding them".
    Each is now refused in one line naming what is wrong, and the checkpoint is left as it was."""
    from safetensors.torch import save_file

    weights = lora_weights(ppo_run / "checkpoints" / "epoch_0001")
    names = sorted(weights)
    nan = {**weights, names[1]: torch.full_like(weights[names[1]], float("nan"))}
    cases = [({k: weights[k] for k in names[::2]}, f"{len(names) // 2} of its {len(names)} LoRA tensors are missing"),
             ({}, f"{len(names)} of its {len(names)} LoRA tensors are missing"),
             (nan, "its weights are not finite")]
    problems = []
    for i, (tensors, message) in enumerate(cases):
        home = tmp_path / f"r{i}"
        shutil.copytree(ppo_run, home)
        save_file(tensors, home / "checkpoints" / "epoch_0002" / runs.LORA_FILE)
        before = {p.relative_to(home): p.read_bytes() for p in home.rglob("*") if p.is_file()}
        line = in_process("ppo", [*QUICK, "--num-epochs", 3, "--resume", home], monkeypatch)
        if not (line.startswith("error: cannot resume from") and message in line and "\n" not in line):
            problems.append(f"{message}: {line!r}")
        if {p.relative_to(home): p.read_bytes() for p in home.rglob("*") if p.is_file()} != before:
            problems.append(f"{message}: the run folder changed")
    assert not problems


def test_class_a_divergence_from_resumed_weights_names_the_resumed_checkpoint(tmp_path):
    args = type("Args", (), dict(learning_rate=0.5, guidance=7.0))()
    run_ = runs.Run(tmp_path, {}, args, checkpoint=tmp_path / "checkpoints" / "epoch_0003", resumed_weights=True)
    with pytest.raises(SystemExit, match="these are the weights of the resumed checkpoint .*epoch_0003"):
        run_.diverged("the gradient was not finite")
    run_.step_ok(torch.tensor(1.0), torch.amp.GradScaler("cpu", enabled=False), 0)  # a step: new weights
    with pytest.raises(SystemExit, match="no checkpoint holds these weights"):
        run_.diverged("the gradient was not finite")


def test_class_the_one_line_handler_never_crashes_and_names_the_full_disk(tmp_path, capsys):
    """TensorBoard raised ENOSPC with a bytes file name: the hook called Path() on it and crashed ("Error in
    sys.excepthook" and the traceback). A refused write without a file name reported the free space of the working
    folder's disk, not the run folder's. Now: one line each, naming the disk measured; a next step that fails does not
    lose the line either."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with as_a_process():
        sys.excepthook = lambda kind, error, tb: pytest.fail(f"reached the previous hook: {kind}")
        cli.exit_in_one_line(lambda: "what to do", folder=run_dir)
        for error in (OSError(errno.ENOSPC, "No space left on device", os.fsencode(run_dir / "events")),
                      OSError(errno.ENOSPC, "No space left on device")):
            sys.excepthook(type(error), error, None)
        cli.exit_in_one_line(lambda: 1 / 0, folder=run_dir)
        sys.excepthook(KeyboardInterrupt, KeyboardInterrupt(), None)
    lines = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(lines) == 3, lines
    for line in lines[:2]:
        assert line.startswith("error: a write failed (OSError: [Errno 28] No space left on device") and (
            f"MB free on the disk of {str(run_dir)!r}); what to do" in line), line
    assert lines[2].startswith("error: interrupted; (what to do next is unknown: ZeroDivisionError")


STOPPED_PEER = """import sys, time
sys.path.insert(0, sys.argv[1])
import cli, runs
d = runs.setup_distributed("cpu")
cli.exit_in_one_line(lambda: "what to do")
if d.rank == 1:
    time.sleep(90)  # a process that stopped (SIGSTOP, a stuck reward server, a wedged GPU)
runs.broadcast_flag(True, d.device)
"""


def test_class_every_wait_is_bounded_a_stopped_torchrun_process(tmp_path):
    """A torchrun process that stopped left the others blocked in a collective for gloo's 30 minutes, then a
    traceback. Now the process group has a timeout (DIFFUSION_RL_TIMEOUT, here 3 s): the waiting process ends with one
    line that names the timeout and how to change it, long before the stopped one would have woken."""
    (tmp_path / "stop.py").write_text(STOPPED_PEER)
    proc = subprocess.run([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(tmp_path / "stop.py"), str(ROOT)], cwd=ROOT,
                          env={**OFFLINE, "DIFFUSION_RL_TIMEOUT": "3"},
                          capture_output=True, text=True, timeout=80)
    assert proc.returncode != 0, proc.stderr[-2000:]
    line = next((x for x in proc.stderr.splitlines() if x.startswith("error: process 0:")), proc.stderr[-2000:])
    assert "another process of this torchrun job failed or stopped answering" in line, line
    assert "waits 3 s for the others (set DIFFUSION_RL_TIMEOUT to change it); what to do" in line, line
    assert "unbound_buffer" not in proc.stderr  # no gloo traceback from the process that waited


PEER_FAILS = """import glob, os, runpy, signal, sys, time, types
sys.path.insert(0, sys.argv[1])
import rewards, runs
how, failing, out, calls = sys.argv[2], sys.argv[3], sys.argv[4], []
def color(images, prompts):  # process `failing` fails in epoch 1 (its 2nd call), once epoch 1's checkpoint is saved
    calls.append(1)
    if os.environ["RANK"] == failing and len(calls) == 2:
        deadline = time.time() + 120
        while not glob.glob(os.path.join(out, "*", "checkpoints", "epoch_0001")) and time.time() < deadline:
            time.sleep(0.1)
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise ValueError("the reward server is down")
    return rewards.color(images, prompts)
rewards.REWARDS["color"] = rewards.free(color, prompts=rewards.REWARDS["color"].prompts)
if os.environ["RANK"] == "1":  # its clock is an hour ahead: the run folder's name (the start time) would differ
    runs.time = types.SimpleNamespace(time=lambda: time.time() + 3600, strftime=time.strftime)
sys.argv = sys.argv[5:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("how,failing", [("raise", 1), ("kill", 1), ("raise", 0)])
def test_class_torchrun_a_failed_process_is_named_and_every_survivor_names_the_newest_checkpoint(tmp_path, how,
                                                                                                  failing):
    """When one torchrun process failed (its reward raised, or it was killed), the survivor printed gloo's raw
    "Connection closed by peer" traceback (or, when torchrun's SIGTERM came during its exit, a traceback from the
    cleanup at exit) and no line naming the newest checkpoint. Now each process's stderr (torchrun --redirects keeps
    them apart) ends in one line and holds no traceback: the failed process names its own cause, the survivor names
    which process failed and why (told through the job's store; a killed one cannot tell: "another process") and the
    newest checkpoint to resume, also when it is not the main process and its clock differs (the run folder's name,
    which holds the start time, is the main process's)."""
    out, logs = tmp_path / "runs", tmp_path / "logs"
    (tmp_path / "fail.py").write_text(PEER_FAILS)
    argv = [*QUICK, "--num-epochs", 3, "--save-every", 1, "--output-dir", out]
    proc = subprocess.run([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "--log-dir", str(logs), "--redirects", "2", str(tmp_path / "fail.py"), str(ROOT), how,
                           str(failing), str(out), str(ROOT / "ppo.py"), *map(str, argv)], cwd=ROOT,
                          env={**OFFLINE, "DIFFUSION_RL_TIMEOUT": "20"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, proc.stderr[-2000:]
    newest = next(out.glob("*/checkpoints/epoch_0001"))
    assert not newest.with_name("epoch_0002").exists()
    stderr = {int(p.parent.name): p.read_text() for p in logs.glob("*/attempt_0/*/stderr.log")}
    assert sorted(stderr) == [0, 1], proc.stderr[-2000:]
    lines = {rank: [x for x in text.replace("\r", "\n").splitlines() if x.strip()] for rank, text in stderr.items()}
    errors = {rank: [x for x in rank_lines if x.startswith("error")] for rank, rank_lines in lines.items()}
    for rank, text in stderr.items():
        assert "Traceback" not in text, f"process {rank}: {text[-3000:]}"
        assert not [x for x in lines[rank] if not x.startswith("error") and re.search("gloo|Connection|Process", x)]
    cause, survivor = "reward 'color' raised ValueError: the reward server is down", 1 - failing
    assert len(errors[survivor]) == 1, errors
    assert f"; the newest checkpoint is {newest}; continue with the same flags" in errors[survivor][0], errors
    if how == "raise":
        assert errors[failing] == [f"error: process {failing}: {cause}; no update was made with these samples and "
                                   f"earlier checkpoints are intact: fix the reward function"], errors
        assert f"process {failing} failed: {cause}" in errors[survivor][0], errors  # which process, and why
    else:
        assert errors[failing] == [] and "another process" in errors[survivor][0], errors  # killed: it said nothing


LATE_SIGTERM = """import atexit, os, signal, sys, time
sys.path.insert(0, sys.argv[1])
import cli
cli.exit_in_one_line(lambda: "what to do")
atexit.register(lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(1)))  # torchrun's SIGTERM, during the exit
raise KeyboardInterrupt
"""


def test_class_torchrun_a_sigterm_during_the_exit_adds_no_traceback(tmp_path):
    """torchrun sends SIGTERM to every process once one has failed; a survivor that had printed its line and was in its
    cleanup at exit raised KeyboardInterrupt there ("Exception ignored in atexit callback" and a traceback; in one of
    two runs of the test above before the fix). Once the handler has printed its line, SIGTERM is ignored."""
    (tmp_path / "late.py").write_text(LATE_SIGTERM)
    proc = subprocess.run([PYTHON, str(tmp_path / "late.py"), str(ROOT)], cwd=ROOT, env=OFFLINE, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and proc.stderr.split() == "error: interrupted; what to do".split(), proc.stderr


def test_class_every_wait_is_bounded_prompt_pipes(tmp_path, monkeypatch):
    """`--prompt-file <(printf ...)` said "holds no prompts" (the pipe was read once per use, and only the first read
    sees its text); a FIFO no program writes blocked forever at open. Now a pipe is read once and kept, and a FIFO
    that gives no end of file within PIPE_TIMEOUT is refused in one line."""
    read, write = os.pipe()
    os.write(write, b"a red image\n\na blue image\n")
    os.close(write)
    path = f"/dev/fd/{read}"  # what bash's process substitution passes
    try:
        assert common.load_prompts("colors", path) == ["a red image", "a blue image"]
        assert common.load_eval_prompts("colors", path) == ["a red image", "a blue image"] * 16
        assert common.load_prompts("colors", path) == ["a red image", "a blue image"]
    finally:
        os.close(read)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    monkeypatch.setattr(cli, "PIPE_TIMEOUT", 0.5)
    with pytest.raises(SystemExit, match=r"^error: prompt file .*fifo' is a pipe that gave no end of file within 0.5"):
        common.load_prompts("colors", str(fifo))


def test_class_bad_places_devices_and_states_fail_in_one_line_before_the_model_loads(ppo_run, tmp_path, monkeypatch):
    """Each was a traceback before the one-line handler had a say: a --run-name whose lock file's name passes 255
    bytes, an --output-dir inside a symlink loop, a run folder whose parent is read-only (the lock cannot be made;
    simulated, as the suite may run as root), --device xla or meta (meta also left a run folder with only an events
    file), a training state whose fields have the wrong type."""
    (tmp_path / "loop_a").symlink_to(tmp_path / "loop_b")
    (tmp_path / "loop_b").symlink_to(tmp_path / "loop_a")
    wrong = tmp_path / "wrong"
    shutil.copytree(ppo_run, wrong)
    state = training_state(wrong / "checkpoints" / "epoch_0002")
    torch.save({**state, "epoch": "2"}, wrong / "checkpoints" / "epoch_0002" / runs.STATE_FILE)
    untyped = tmp_path / "untyped"
    shutil.copytree(ppo_run, untyped)
    torch.save({**state, "reward_curve": {"0": 1.0}}, untyped / "checkpoints" / "epoch_0002" / runs.STATE_FILE)
    out = tmp_path / "runs"
    rows = [(["--output-dir", out, "--run-name", "x" * 250], "choose a shorter --run-name"),
            (["--output-dir", tmp_path / "loop_a" / "below"], "choose another --output-dir"),
            (["--output-dir", out, "--device", "xla"], "--device xla: the scripts run on cuda, cuda:N or cpu"),
            (["--output-dir", out, "--device", "meta"], "--device meta: the scripts run on cuda, cuda:N or cpu"),
            (["--num-epochs", 3, "--resume", wrong], "'epoch' is of type str, not int"),
            (["--num-epochs", 3, "--resume", untyped], "'reward_curve' is of type dict, not list")]
    problems = [f"{argv}: {line!r}" for argv, message in rows
                if not ((line := in_process("ppo", [*QUICK, *argv], monkeypatch)).startswith("error: ")
                        and message in line and "\n" not in line)]
    real_open = os.open

    def read_only_parent(path, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(runs.os, "open", read_only_parent)
    line = in_process("ppo", [*QUICK, "--num-epochs", 3, "--resume", ppo_run, "--output-dir", out, "--run-name", "r"],
                      monkeypatch)
    if not (line.startswith("error: cannot lock the run folder") and "must be writable" in line and "\n" not in line):
        problems.append(f"read-only parent: {line!r}")
    assert not problems
    assert not out.exists() and sorted(p.name for p in (ppo_run / "checkpoints").iterdir()) == [
        "epoch_0001", "epoch_0002"]


REMOVED = """
import runpy, shutil, sys
import runs
save = runs.Run.save
def save_then_remove(self, epoch, unet, state):
    save(self, epoch, unet, state)
    shutil.rmtree(self.dir)  # the user removes the run folder while the run goes on
runs.Run.save = save_then_remove
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_class_a_run_in_a_non_utf8_locale_whose_folder_is_removed_mid_run_ends_in_one_line(tmp_path):
    """Under LC_ALL=C PYTHONUTF8=0 every offline model failed (the tokenizer's vocabulary was written in the locale's
    encoding, ASCII); a run folder removed while the run wrote to it ended in a FileNotFoundError traceback. Now the
    run starts, and the removal ends it in one line that names the folder."""
    env = {**OFFLINE, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": ""}
    argv = [*QUICK, "--num-epochs", 2, "--save-every", 1, "--output-dir", tmp_path, "--run-name", "gone"]
    proc = subprocess.run([PYTHON, "-c", REMOVED, str(ROOT / "ppo.py"), *map(str, argv)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert error_line(proc).startswith(f"error: the run folder {str(tmp_path / 'gone')!r} was removed or moved while "
                                       f"the run wrote to it (FileNotFoundError"), error_line(proc)


def test_class_benchmarks_and_world_tools_check_their_arguments_as_the_scripts_do(ppo_run, tmp_path, monkeypatch):
    """benchmarks/ and world/ accepted what the scripts refuse (--eta 2, --guidance nan, --lora-rank -1,
    --timesteps-per-call 0, --matmul-size 0), scored a tiny model's checkpoint as a shapes model, failed only after the
    work on an --out in a missing folder, and gave tracebacks for --jobs 0, no seeds, --extra=--guidance 3,
    --methods bogus, --device xla; world.pretrain wrote inside the committed model folder without --overwrite. Each is
    now one line before anything loads; world.reward and world.judge check their inputs."""
    import world

    rows = [
        ("benchmarks/evaluate", [ppo_run, "--eta", 2], "--eta 2.0: must be in (0, 1]"),
        ("benchmarks/evaluate", [ppo_run, "--guidance", "nan"], "--guidance nan: must be a finite number"),
        ("benchmarks/evaluate", [ppo_run, "--out", tmp_path / "missing" / "e.json"], "its folder does not exist"),
        ("benchmarks/evaluate", [ppo_run], "is a checkpoint of --model tiny; this evaluates shapes-world checkpoints"),
        ("benchmarks/train_step", ["--model", "tiny", "--timesteps-per-call", 0], "--timesteps-per-call 0: must be"),
        ("benchmarks/train_step", ["--model", "tiny", "--lora-rank", -1], "--lora-rank -1: must be"),
        ("benchmarks/train_step", ["--model", "tiny", "--matmul-size", 0], "--matmul-size 0: must be"),
        ("benchmarks/train_step", ["--model", "tiny", "--eta", 0], "--eta 0.0: must be in (0, 1]"),
        ("benchmarks/train_step", ["--model", "tiny", "--device", "xla"], "--device xla: the scripts run on"),
        ("benchmarks/demo_seeds", ["--jobs", 0], "give at least one seed and --jobs >= 1"),
        ("benchmarks/demo_seeds", ["--seeds"], "give at least one seed and --jobs >= 1"),
        ("benchmarks/demo_seeds", ["--extra=--guidance 3"], "--guidance is fixed here"),
        ("benchmarks/demo_seeds", ["--extra=--learning-rate"], "give pairs of a flag and its value"),
        ("benchmarks/throughput", ["--methods", "bogus"], "bogus is neither a setting"),
        ("world/pretrain", ["--out", common.SHAPES_DIR / "inner"], "is inside the committed model folder"),
        ("world/pretrain", ["--out", tmp_path / "m", "--device", "xla"], "--device 'xla': this trains on cpu"),
        ("world/pretrain_flow", ["--out", common.SHAPES_FLOW_DIR / "inner"], "is inside the committed model folder"),
    ]
    problems = []
    for tool, argv, message in rows:
        line = in_process(tool, argv, monkeypatch)
        if message not in line or "\n" in line.strip():
            problems.append(f"{tool} {argv}: {line!r}")
    assert not problems
    assert not (common.SHAPES_DIR / "inner").exists() and not (common.SHAPES_FLOW_DIR / "inner").exists()
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())

    images, prompts = torch.rand(2, 3, 32, 32), ["a red circle", "a blue square"]
    assert world.reward(images, prompts).isfinite().all()
    nan = images.clone()
    nan[1, 0, 0, 0] = float("nan")
    assert world.reward(nan, prompts)[0].isfinite() and world.reward(nan, prompts)[1].isnan()  # not 0.0
    for bad, words, fn in [((images, prompts[:1]), "2 images and 1 prompts", world.reward),
                           ((images * 255, prompts), "must be in [0, 1]", world.reward),
                           ((images[0], prompts[:1]), "(B, 3, H, W)", world.judge),
                           ((nan, prompts), "not finite", world.judge)]:
        with pytest.raises(ValueError, match=re.escape(words)):
            fn(*bad)


def files(folder) -> dict:
    """Every file below `folder` but the lock files, with its bytes."""
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()
            and not p.name.endswith(".lock")}


def quick_study_while_held(lock, out, owner: bytes = b"") -> subprocess.CompletedProcess:
    """benchmarks/study.py --quick on `out` while this process holds the kernel's lock on the file `lock` (as a
    running study or script does), writing `owner` into it as runs.lock does."""
    import fcntl

    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, owner)
    try:
        return subprocess.run([PYTHON, str(ROOT / "benchmarks" / "study.py"), "--quick", "--methods", "loop_k4",
                               "--jobs", "1", "--out", str(out)], cwd=ROOT, env=OFFLINE, capture_output=True,
                              text=True, timeout=600)
    finally:
        os.close(fd)


def test_class_a_second_study_on_the_same_out_leaves_the_first_ones_runs_alone(tmp_path):
    """A second benchmarks/study.py on the --out of a running one removed the first one's run in progress (its rmtree
    came before the run's own lock refused it) and both failed. Now a study takes --out's lock before anything else:
    the second stops in one line, and nothing in --out changes."""
    out = tmp_path / "study"
    (out / "runs" / "loop_k4__1__0123abcd" / "checkpoints" / "epoch_0001").mkdir(parents=True)
    (out / "runs" / "loop_k4__1__0123abcd" / "events.out").write_text("the first study's run, in progress")
    (out / "evals.csv").write_text("method,seed\n")
    before = files(out)
    proc = quick_study_while_held(out / ".study.lock", out)  # the first study, running
    assert proc.returncode == 1 and proc.stderr.strip() == (
        f"error: another study is running on --out {out}; wait for it to end, or give another --out"), proc.stderr
    assert files(out) == before


def test_class_a_study_never_removes_a_run_folder_a_script_is_running_in(tmp_path):
    """The study removes and redoes an unfinished run folder of its --out (one an earlier study left when stopped).
    Under --out's study lock that folder is the study's, unless a script is running in it (its own lock, runs.lock):
    then the study stops in one line, before any run, and the folder is left as it is."""
    study, out = benchmark("study"), tmp_path / "study"
    args = study.Args(out=str(out), quick=True, methods=("loop_k4",), jobs=1)
    study.shorten(args)
    (run_dir,) = [run.dir for run in study.planned_runs(out, args, args.methods)]
    (run_dir / "checkpoints" / "epoch_0001").mkdir(parents=True)
    (run_dir / "events.out").write_text("a script's run, in progress")
    before = files(out)
    # the script, running
    proc = quick_study_while_held(run_dir.parent / f".{run_dir.name}.lock", out, b"pid 1234 on host since today")
    assert proc.returncode == 1 and proc.stderr.strip() == (
        f"error: {run_dir} is in use by a run that is not this study's (pid 1234 on host since today); wait for it "
        f"to end, or give another --out"), proc.stderr
    assert files(out) == before


# Every benchmark and world tool that computes, with its smallest flags and its DEFAULT output location, in this order
# (evaluate scores the run demo_seeds wrote). Tools that write nothing (train_step, sampling, prompt_pairs, evaluate
# without --out, throughput, whose runs go to a temporary folder) are here too: a default that later writes must write
# under runs/. throughput's default --ref is a commit of this project's history, which the fresh copy lacks: HEAD.
DEFAULT_OUTPUTS = [
    ["benchmarks/train_step.py", "--model", "tiny", "--batch", "2", "--device", "cpu", "--warmup", "0", "--num-steps",
     "2", "--ratio-precisions", "no"],
    ["-m", "world.pretrain", "--threads", "1", "--vae-steps", "2", "--decoder-steps", "1", "--vae-batch", "4",
     "--unet-steps", "2", "--unet-batch", "4", "--num-latents", "16", "--eval-images", "2", "--eval-steps", "2"],
    ["-m", "world.pretrain_flow", "--threads", "1", "--steps", "2", "--batch", "4", "--num-latents", "16",
     "--eval-images", "2", "--eval-steps", "2", "--layers", "2"],
    ["benchmarks/study.py", "--quick", "--methods", "loop_k4", "--jobs", "1"],  # its --out was benchmarks/study
    ["benchmarks/sampling.py", "--num-steps", "2", "--batch", "2", "--repeats", "1"],
    ["benchmarks/demo_seeds.py", "--seeds", "42", "--jobs", "1", "--extra=--num-epochs 1 --num-steps 2 "
     "--sample-batch-size 8 --train-batch-size 8 --image-every 0 --eval-num-steps 2"],  # runs/demo_seeds/seed42
    ["benchmarks/evaluate.py", "runs/demo_seeds/seed42", "--prompts", "shapes_eval", "--images", "2", "--steps", "2",
     "--kl-steps", "2", "--threads", "1"],
    ["benchmarks/prompt_pairs.py", "--images", "2", "--count", "1", "--max-judged", "1", "--min-spread", "0",
     "--threads", "1"],
    ["benchmarks/throughput.py", "--ref", "HEAD", "--settings", "study", "--epochs", "2", "--threads", "1"],
]


def test_class_no_default_command_writes_into_the_repository(tmp_path):
    """A default command rewrote committed results (study.py's default --out was its committed folder). In a copy of
    this checkout committed as a fresh repository, each tool's default run leaves `git status` clean: what it writes
    goes under runs/, which git ignores."""
    clone = tmp_path / "clone"
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, clone / name)
    git = dict(cwd=clone, capture_output=True, text=True, check=True)
    subprocess.run(["git", "init", "-q"], **git)
    subprocess.run(["git", "add", "-A"], **git)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"], **git)
    problems = []
    for argv in DEFAULT_OUTPUTS:
        try:
            proc = subprocess.run([PYTHON, *argv], cwd=clone, env=OFFLINE, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:  # a hang guard: say which command, and go on with the others
            problems.append(f"{' '.join(argv[:2])}: still running after 600 s")
            continue
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], **git).stdout
        if proc.returncode != 0 or status:
            problems.append(f"{' '.join(argv[:2])}: exit {proc.returncode}, git status {status!r}, "
                            f"{proc.stderr[-500:]!r}")
    assert not problems
