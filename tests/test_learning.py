"""Learning that can fail: each method raises the toy reward of the tiny model on CPU.

The eval reward uses fixed prompts and fixed noise before and after training, so the comparison is paired
and the margin measures the policy, not sampling luck. Margins were calibrated over seeds (docs/*.md,
"Measured"); with the advantage's sign flipped the same runs lower the reward and these tests fail.
"""

import pytest
from helpers import ACCUMULATE, LEARN, run, scalars

EPOCHS = 25
MARGIN = 0.005


@pytest.mark.parametrize("script", ["reinforce", "ppo", "loop"])
def test_reward_rises_on_the_toy_task(tmp_path, script):
    run(script, *LEARN, *ACCUMULATE[script], "--num-epochs", EPOCHS, "--image-every", EPOCHS, "--seed", 1,
        "--output-dir", tmp_path, "--run-name", "learn")
    evals = dict(scalars(tmp_path / "learn")["eval/reward_mean"])
    before, after = evals[0], evals[EPOCHS]
    assert after - before > MARGIN, f"{script}: eval reward {before:.4f} -> {after:.4f}"
