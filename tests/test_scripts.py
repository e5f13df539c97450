"""reinforce.py, ppo.py and loop.py end to end: outputs, the on-policy check, resume, torchrun, bad input."""

import sys

import pytest
import torch
from helpers import (ACCUMULATE, NETWORK_RTOL, TINY, assert_close_normwise, error_line, lora_weights, run, run_here,
                     run_main, scalars, training_state)

import common
import rewards

SCRIPTS = ["reinforce", "ppo", "loop"]


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    """Each script run for 2 epochs in one go (checkpoint every epoch): shared by several tests."""
    out = tmp_path_factory.mktemp("runs")
    for script in SCRIPTS:
        # a sum with a logged-only term
        weighted = ["--reward", "color,jpeg_compressibility:0"] if script == "ppo" else []
        run(script, *TINY, *ACCUMULATE[script], *weighted, "--num-epochs", 2, "--output-dir", out, "--run-name", script)
    return out


@pytest.mark.parametrize("script", SCRIPTS)
def test_end_to_end_outputs_and_on_policy_check(two_epochs, script):
    run_dir = two_epochs / script
    assert (run_dir / "images" / "before.png").exists() and (run_dir / "images" / "after.png").exists()
    assert (run_dir / "reward_curve.png").exists()
    for epoch in (1, 2):
        ckpt = run_dir / "checkpoints" / f"epoch_{epoch:04d}"
        assert set(lora_weights(ckpt)) and training_state(ckpt)["epoch"] == epoch
    logged = scalars(run_dir)
    for tag in ("charts/reward_mean", "charts/reward_std", "charts/images_per_sec", "charts/learning_rate",
                "losses/policy_loss", "losses/approx_kl", "losses/clipfrac", "debug/ratio_dev_at_start",
                "eval/reward_mean"):
        assert tag in logged, tag
    # each reward term is logged unweighted; a term of weight 0 is logged and leaves the reward as it was
    assert [v for _, v in logged["rewards/color"]] == [v for _, v in logged["charts/reward_mean"]]
    assert ("rewards/jpeg_compressibility" in logged) == (script == "ppo")
    # before each epoch's first update the recomputed log-probs equal the sampled ones (float32, CPU)
    assert all(v < 1e-5 for _, v in logged["debug/ratio_dev_at_start"])
    assert len(logged["charts/reward_mean"]) == 2 and len(logged["eval/reward_mean"]) == 3  # before, epoch 1, after
    # the LoRA weights moved, and diffusers loads them
    weights = lora_weights(run_dir / "checkpoints" / "epoch_0002")
    assert any(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k or "lora.up" in k)
    pipe = common.offline_pipeline("tiny")
    pipe.load_lora_weights(str(run_dir / "checkpoints" / "epoch_0002"))


def test_loop_canonical_call(tmp_path):
    run("loop", *TINY, "--k", 4, "--clip", "1e-4", "--num-epochs", 1, "--output-dir", tmp_path, "--run-name", "canon",
        "--gradient-accumulation-steps", 1)
    assert (tmp_path / "canon" / "checkpoints" / "epoch_0001").exists()


# One epoch in process: 4 images x 4 steps, --timestep-fraction 0.5 (2 trained steps per trajectory), 2 minibatches
# of 2 accumulated into one optimiser step per pass, --num-inner-epochs 2; the advantage options of each script.
PASSES = [*TINY[:6], "--num-steps", 4, "--timestep-fraction", 0.5, "--sample-batch-size", 4, "--num-batches-per-epoch",
          1,
          "--train-batch-size", 2, "--gradient-accumulation-steps", 2, "--num-inner-epochs", 2, "--num-epochs", 1,
          "--image-every", 0, "--save-every", 0, "--learning-rate", 1e-2]
ADVANTAGE_OPTIONS = {"ppo": ["--adv-clip-max", 1], "loop": ["--k", 2, "--normalize-advantages"],
                     "score_as_action": ["--adv-clip-max", 1]}


@pytest.mark.parametrize("script", list(ADVANTAGE_OPTIONS))
def test_inner_epochs_timestep_fraction_and_advantage_options(tmp_path, script):
    """What the script computed, read from its globals: 2 passes x 2 minibatches x 2 of the 4 steps = 8 loss terms
    and one optimiser step per pass; the first pass is on-policy (every ratio 1) and, for a trajectory-level
    advantage, its mean loss is -mean(A) of the stored advantages; the second pass sees the updated policy
    (clipfrac > 0). ppo.py and score_as_action.py store advantages clipped to --adv-clip-max (here 1, so that it
    binds: 4 standardised values always have one |A| >= 1); loop.py with K = 2 and --normalize-advantages gives
    |A| = 2 whatever the two rewards."""
    g = run_main(script, *PASSES, "--output-dir", tmp_path, *ADVANTAGE_OPTIONS[script])
    info, stored = g["info"], g["samples"]["advantages"]
    # one UNet call per minibatch (both trained steps in it, the CPU default), its means counted once per step
    assert len(info["policy_loss"]) == 4 and g["global_step"] == 2
    losses, clipfrac = torch.cat(info["policy_loss"]), torch.cat(info["clipfrac"])
    assert len(losses) == 8 and clipfrac[:4].max() == 0 and clipfrac[4:].mean() > 0
    if script != "score_as_action":  # per-step advantages: the first pass's mean is over its own random steps
        torch.testing.assert_close(losses[:4].mean(), -stored.mean(), rtol=0, atol=1e-6)
    if script == "loop":
        assert (stored.abs() - 2).abs().max() < 0.01, stored
    else:
        raw = g["advantages"]  # before the clip (ppo: per-prompt standardised; score_as_action: per timestep)
        assert raw.abs().max() > 1 and stored.abs().max() <= 1
        torch.testing.assert_close(stored, raw.clamp(-1, 1))


@pytest.mark.parametrize("script", SCRIPTS)
def test_resume_is_bit_identical(two_epochs, tmp_path, script):
    """Exact, and on any CPU: the resumed run repeats the uninterrupted one's operations in the same order, shapes
    and thread count on the same machine (only the weights and optimiser state pass through a file, losslessly)."""
    args = [*TINY, *ACCUMULATE[script], "--output-dir", tmp_path, "--run-name", "split"]
    run(script, *args, "--num-epochs", 1)
    run(script, *args, "--num-epochs", 2, "--resume", tmp_path / "split")
    whole, split = two_epochs / script / "checkpoints" / "epoch_0002", tmp_path / "split" / "checkpoints" / "epoch_0002"
    a, b = lora_weights(whole), lora_weights(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = training_state(whole), training_state(split)
    assert sa["reward_curve"] == sb["reward_curve"] and sa["global_step"] == sb["global_step"]
    if script == "ppo":
        assert sa["stats"] == sb["stats"]


@pytest.mark.parametrize("script,model", [("ppo", "tiny"), ("loop", "tiny"), ("loop", common.TINY_SD3)])
def test_torchrun_two_processes_equal_one_process_with_twice_the_batch(tmp_path, script, model):
    """One update: 2 processes x 2 images equals 1 process x 4 images (same prompts, noise and advantages;
    gradients averaged across processes). For LOOP (K = 2) each process holds one whole group; LOOP again on the
    tiny SD3-class model (the flow path).

    What the claim is about is the averaged gradient, so that is what is compared: after one AdamW step from zero
    moments, exp_avg = (1 - beta1) g exactly, g the clipped, averaged gradient. The two runs sum the same terms in
    another order and batch shape, so g agrees to NETWORK_RTOL in norm (tests/helpers.py says why). The weights
    after the Adam step are not compared: Adam divides each element by its own magnitude, so a near-zero gradient
    element's last-bit difference becomes a visible step (an Intel AVX-512 CPU failed such a comparison)."""
    common_args = [*[model if f == "tiny" else f for f in TINY], "--k", 2, "--num-epochs", 1,
                   "--gradient-accumulation-steps", 1, "--output-dir", tmp_path, "--image-every", 0]
    run(script, *common_args, "--sample-batch-size", 2, "--train-batch-size", 2, "--run-name", "two", torchrun=2)
    run(script, *common_args, "--sample-batch-size", 4, "--train-batch-size", 4, "--run-name", "one")
    two, one = (training_state(tmp_path / name / "checkpoints" / "epoch_0001") for name in ("two", "one"))
    # the mean reward of the same 4 images, sampled in batches of 2 and of 4: a smooth function of the network's output
    assert two["reward_curve"] == pytest.approx(one["reward_curve"], rel=NETWORK_RTOL)
    assert two["global_step"] == one["global_step"] == 1

    def gradient(state):
        beta1 = state["optimizer"]["param_groups"][0]["betas"][0]
        moments = [s["exp_avg"].flatten() for _, s in sorted(state["optimizer"]["state"].items())]
        return torch.cat(moments) / (1 - beta1)

    g_two, g_one = gradient(two), gradient(one)
    weights = lora_weights(tmp_path / "one" / "checkpoints" / "epoch_0001")
    assert g_one.numel() == sum(v.numel() for v in weights.values())
    assert g_one.norm() > 0
    assert_close_normwise(g_two, g_one)


BAD_INPUT = [
    ("ppo", ["--k", "0"], "--k 0"),
    ("reinforce", ["--k", "0"], "--k 0"),
    ("loop", ["--k", "1"], "at least two images per prompt"),
    ("loop", ["--k", "3"], "whole groups"),
    ("ppo", ["--train-batch-size", "3"], "must divide"),
    ("reinforce", ["--train-batch-size", "3"], "must divide"),
    ("ppo", ["--reward", "beauty"], "unknown reward"),
    ("reinforce", ["--reward", "color:nan"], "not a finite number"),
    ("loop", ["--reward", "color,aesthetic", "--reward-weights", "aesthetic=/nonexistent/mlp.pth"], "no such file"),
    ("loop", ["--prompts", "nonsense"], "unknown prompt set"),
    ("loop", ["--prompt-file", "/nonexistent/prompts.txt"], "cannot read prompt file"),
    ("reinforce", ["--model", "/nonexistent/model"], "--model tiny"),
    ("ppo", ["--resume", "/nonexistent/run"], "no checkpoint found"),
    ("loop", ["--eta", "0"], "--eta"),
]


@pytest.mark.parametrize("script,args,message", BAD_INPUT, ids=[f"{s}:{' '.join(a)}" for s, a, _ in BAD_INPUT])
def test_bad_input_fails_in_one_line(tmp_path, script, args, message):
    proc = run(script, *TINY, "--num-epochs", 1, "--output-dir", tmp_path, *args, check=False)
    assert proc.returncode != 0
    line = error_line(proc)
    assert line.startswith("error: ") and message in line, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_damaged_resume_and_nan_reward_leave_the_checkpoint_intact(tmp_path, monkeypatch):
    run("loop", *TINY, "--num-epochs", 1, "--output-dir", tmp_path, "--run-name", "good",
        "--gradient-accumulation-steps", 1)
    ckpt = tmp_path / "good" / "checkpoints" / "epoch_0001"
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    # a non-finite reward stops the run before any update or save (in-process, with a patched reward)
    monkeypatch.setitem(rewards.REWARDS, "color",
                        rewards.free(lambda images, prompts: torch.full((images.shape[0],), float("nan"))))
    argv = [*TINY, "--num-epochs", 3, "--output-dir", tmp_path, "--resume", tmp_path / "good",
            "--gradient-accumulation-steps", 1]
    monkeypatch.setattr(sys, "argv", ["loop.py", *map(str, argv)])
    with pytest.raises(SystemExit) as e:
        run_here("loop")
    assert "non-finite" in str(e.value) and "\n" not in str(e.value)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before
    assert not (tmp_path / "good" / "checkpoints" / "epoch_0002").exists()
    # a damaged checkpoint is refused in one line, and stays as it was
    (ckpt / "training_state.pt").write_bytes(b"not a checkpoint")
    proc = run("loop", *TINY, "--num-epochs", 2, "--output-dir", tmp_path, "--resume", ckpt, check=False)
    assert proc.returncode != 0 and "cannot resume" in error_line(proc)
    assert (ckpt / "training_state.pt").read_bytes() == b"not a checkpoint"
