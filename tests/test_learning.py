"""Learning that can fail: each method raises the compositional reward of the pretrained shapes model on CPU.

The task is the README's main job, shortened: fine-tune on one two-object prompt the pretrained model often gets
wrong (`--prompts shapes_demo`: "a green triangle and a blue square"), as DPOK fine-tunes on single prompts;
320 images in epochs of 16 at 10 DDIM steps (REINFORCE: epochs of 8), the study's per-method settings
(benchmarks/study.py) with the two changes below. The measure is the eval reward after training minus before:
32 images of the prompt from fixed noise, so before and after are paired and the gain is the model's, not the
noise's.

The reward is the product of the named objects' credits (docs/world.md): 1 for a right binding, 0 for a missing
object or one colour drawn twice, 1/16 for swapped colours. One run of 320 images is not enough to be sure of
learning: at seed 2 Score as Action and at seed 3 REINFORCE end about where they began. So each test runs two
seeds side by side (two processes, one thread each) and asserts their mean gain. Each margin is well inside the
worst mean over the pairs of seeds 1-3, measured with 1 thread and checked with 2; the table is in docs/world.md.
The direction of each script's update is also tested in seconds, on any CPU, by tests/test_direction.py.
"""

import subprocess

import pytest
from helpers import OFFLINE, PYTHON, ROOT, benchmark, scalars

# The runs are the single-prompt study's (benchmarks/study.py --prompts shapes_demo --images 320 --learning-rate
# 3e-3: one prompt, 16 images an epoch at 10 DDIM steps, guidance 5, the per-method flags calibrated there), so its
# table (benchmarks/study_one_prompt) and these tests share one setting, apart from the two changes below.
study = benchmark("study")
CONFIG = {"reinforce": "reinforce_k4", "ppo": "ppo_k4", "loop": "loop_k4", "dpok": "dpok",
          "score_as_action": "score_as_action"}
SEEDS, IMAGES, LEARNING_RATE = (1, 2), 320, 3e-3  # 320 images: 20 epochs of 16
# Two methods are not sure to learn at the study's setting within 320 images (docs/world.md): REINFORCE takes one
# optimiser step per epoch where the clipped methods take two, and DPOK's learning rate is 1e-3. The tests give
# REINFORCE epochs of 8 images (40 steps on the same 320 images) at learning rate 1e-3 (at 3e-3 and 2e-3 its seed 3
# fell by 0.07 and 0.31 on the product reward), and DPOK 3e-3.
IMAGES_PER_EPOCH = {"reinforce": 8}
EXTRA = {"dpok": ["--learning-rate", "3e-3"], "reinforce": ["--learning-rate", "1e-3"]}
# Worst mean gain over the pairs of seeds 1-3 (docs/world.md): loop 0.316, ppo 0.215, reinforce 0.065,
# dpok 0.233, score_as_action 0.106. The margins are at most half of it.
MARGIN = {"reinforce": 0.02, "ppo": 0.05, "loop": 0.05, "dpok": 0.05, "score_as_action": 0.05}


def command(script: str, seed: int, out) -> list:
    """The study's command for this method and seed (with the changes above), evaluated only before and after
    training."""
    images_per_epoch = IMAGES_PER_EPOCH.get(script, 16)
    epochs = IMAGES // images_per_epoch
    name = CONFIG[script]
    script_name, flags = study.CONFIGS[name]
    run = study.Run(name, seed, script_name, flags + EXTRA.get(script, []), dir=out / f"seed{seed}", epochs=epochs,
                    images_per_epoch=images_per_epoch)
    return study.command(run, study.Args(prompts="shapes_demo", images=IMAGES, learning_rate=LEARNING_RATE,
                                         eval_every=epochs))


def eval_gains(name: str, command, tmp_path) -> dict:
    """Run `command(seed, tmp_path)` for every seed of SEEDS side by side; seed -> eval reward after minus before."""
    procs = [subprocess.Popen(command(seed, tmp_path), cwd=ROOT, env=OFFLINE, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for seed in SEEDS]
    errors = [p.communicate(timeout=1200)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), f"{name} failed:\n" + "\n".join(e[-3000:] for e in errors)
    gains = {}
    for seed in SEEDS:
        (_, before), (_, after) = scalars(tmp_path / f"seed{seed}")["eval/reward_mean"]
        gains[seed] = round(after - before, 4)
    return gains


@pytest.mark.parametrize("script", sorted(CONFIG))
def test_reward_rises_on_the_shapes_world(tmp_path, script):
    gains = eval_gains(script, lambda seed, out: command(script, seed, out), tmp_path)
    assert sum(gains.values()) / len(gains) > MARGIN[script], f"{script}: eval reward gain per seed {gains}"


def test_the_commands_carry_the_calibrated_changes(tmp_path):
    """The runs above are the calibrated ones: REINFORCE's epochs of 8 images and the learning rates of EXTRA reach
    the command line (the last value of a repeated flag is the one tyro keeps)."""
    for script in CONFIG:
        argv = command(script, 1, tmp_path)
        lr = [argv[i + 1] for i, a in enumerate(argv) if a == "--learning-rate"][-1]
        assert float(lr) == float(dict(zip(EXTRA.get(script, [])[::2], EXTRA.get(script, [])[1::2])).get(
            "--learning-rate", LEARNING_RATE))
        assert argv[argv.index("--prompts") + 1] == "shapes_demo"
        batch, epochs = (int(argv[argv.index(flag) + 1]) for flag in ("--sample-batch-size", "--num-epochs"))
        assert batch == IMAGES_PER_EPOCH.get(script, 16) and batch * epochs == IMAGES


# LOOP on the flow-matching shapes model (`--model shapes-flow`, world/shapes_flow): the same prompt and
# reward, the flow family's sampling defaults (guidance 4.5, Flow-GRPO's noise level 0.7) at 10 steps, and the
# README demo's shape of epoch (32 images, K = 8, two optimiser steps of 16) for 20 epochs (640 images) at learning
# rate 3e-3 and clip 1e-2. At 16 images an epoch (K = 4) seed 1 did not move in 20 or 40 epochs (docs/world.md).
# Since the flow path follows Flow-GRPO's training and evaluation (detached unconditional velocity, the first 9 of 10
# steps trained, evaluation with the ODE), the gains at seeds 1-3 are +0.366, +0.016 and +0.259 (docs/world.md;
# seed 2's training reward rose to 0.71 by epoch 8 and fell back to 0.25): worst mean over the pairs of seeds 1-3
# 0.137 (seeds 2 and 3). Before that change they were +0.338, +0.326 and +0.396 (worst mean 0.332), with a margin
# of 0.15. The margin is at most half of the worst mean.
FLOW_MARGIN = 0.06


def flow_command(seed: int, out) -> list:
    return [PYTHON, str(ROOT / "loop.py"), "--model", "shapes-flow", "--reward", "shapes", "--prompts", "shapes_demo",
            "--num-steps", "10", "--learning-rate", "3e-3", "--sample-batch-size", "32", "--num-batches-per-epoch", "1",
            "--k", "8", "--train-batch-size", "16", "--gradient-accumulation-steps", "1", "--clip", "1e-2",
            "--num-epochs", "20", "--image-every", "20", "--eval-num-steps", "--save-every", "0", "--seed", str(seed),
            "--output-dir", str(out), "--run-name", f"seed{seed}"]


def test_loop_raises_the_reward_of_the_flow_matching_shapes_model(tmp_path):
    gains = eval_gains("loop on shapes-flow", flow_command, tmp_path)
    assert sum(gains.values()) / len(gains) > FLOW_MARGIN, f"loop on shapes-flow: eval reward gain per seed {gains}"
