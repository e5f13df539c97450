"""Learning that can fail: each method raises the toy reward of the tiny model on CPU.

The measure is the mean training reward of the last 5 epochs minus that of the first 5 (16 images an
epoch, 80 on each side), which averages over the noise of single updates. Margins were calibrated over
seeds (docs/*.md, "Measured"); with the advantage's sign flipped the same runs lower the reward and these
tests fail.
"""

import pytest
from helpers import ACCUMULATE, LEARN, run, training_state

EPOCHS = 25
MARGIN = 0.01


@pytest.mark.parametrize("script", ["reinforce", "ppo", "loop"])
def test_reward_rises_on_the_toy_task(tmp_path, script):
    run(script, *LEARN, *ACCUMULATE[script], "--num-epochs", EPOCHS, "--image-every", 0, "--seed", 1,
        "--output-dir", tmp_path, "--run-name", "learn")
    curve = training_state(tmp_path / "learn" / "checkpoints" / f"epoch_{EPOCHS:04d}")["reward_curve"]
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    assert last - first > MARGIN, f"{script}: mean reward of the first 5 epochs {first:.4f}, of the last 5 {last:.4f}"
