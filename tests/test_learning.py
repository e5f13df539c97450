"""Learning that can fail: each method raises the compositional reward of the pretrained shapes model on CPU.

The task is the README's main job, shortened: fine-tune on one two-object prompt the pretrained model often gets
wrong (`--prompts shapes_demo`: "a green triangle and a blue square"), as DPOK fine-tunes on single prompts;
16 images an epoch at 10 DDIM steps, learning rate 3e-3, EPOCHS epochs. The measure is the eval reward after
training minus before: 32 images of the prompt from fixed noise, so before and after are paired and the gain is
the model's, not the noise's. Each margin sits well inside the worst gain measured over seeds 1-3 with 1 and 2
threads (a thread count changes the order of reductions, as another CPU does): the table is in docs/world.md,
"Learning on the shapes world". With the advantage's sign flipped the same run lowers the reward (loop.py,
measured there) and these tests fail.
"""

import pytest
from helpers import run, scalars

EPOCHS = 20
TASK = ["--model", "shapes", "--reward", "shapes", "--prompts", "shapes_demo", "--num-steps", 10, "--guidance", 5,
        "--sample-batch-size", 16, "--num-batches-per-epoch", 1, "--learning-rate", 3e-3, "--num-epochs", EPOCHS,
        "--image-every", EPOCHS, "--eval-num-steps", "--save-every", 0]
CLIPPED = ["--train-batch-size", 8, "--gradient-accumulation-steps", 1, "--clip", 1e-2]
# DPOK: a 5-epoch buffer, so that V_phi (fitted first, on the buffer) cannot memorise this epoch's rewards, and
# 2 policy steps of 64 transitions (docs/world.md).
DPOK = ["--buffer-size", 800, "--num-value-steps", 5, "--num-policy-steps", 2, "--train-batch-size", 16,
        "--gradient-accumulation-steps", 4, "--num-value-batches", 1, "--value-learning-rate", 1e-3, "--clip", 1e-2,
        "--learning-rate", 1e-3]
FLAGS = {"reinforce": ["--train-batch-size", 8], "ppo": CLIPPED, "loop": CLIPPED, "dpok": DPOK, "score_as_action": CLIPPED}
MARGIN = {"reinforce": 0.05, "ppo": 0.05, "loop": 0.05, "dpok": 0.05, "score_as_action": 0.05}


@pytest.mark.parametrize("script", sorted(FLAGS))
def test_reward_rises_on_the_shapes_world(tmp_path, script):
    run(script, *TASK, *FLAGS[script], "--seed", 1, "--output-dir", tmp_path, "--run-name", "learn")
    (_, before), (_, after) = scalars(tmp_path / "learn")["eval/reward_mean"]
    assert after - before > MARGIN[script], f"{script}: eval reward {before:.4f} -> {after:.4f}"
