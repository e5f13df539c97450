"""The trained timesteps of a minibatch in fewer UNet calls: --timesteps-per-call changes how the training
pass is evaluated, never what it computes.

`common.step_log_prob` on (B, n) transitions is n per-row calls in one; each script's gradient is the same for one
timestep per call (the reference's loop), for uneven chunks and for all of a trajectory's timesteps in one call."""

import pytest
import torch
from helpers import NETWORK_RTOL, TINY, assert_close_normwise, run_main

import common

KW = dict(num_steps=4, guidance=5.0, eta=1.0)


def test_step_log_prob_on_b_by_n_transitions_equals_one_call_per_transition(tiny):
    """Two trajectories with different prompts, three transitions each, each its own timestep: every (i, j) of the
    batched call is the single-row call of trajectory i's prompt at transition j (a row matched to another
    trajectory's prompt or timestep would differ by the whole effect of the prompt)."""
    g = torch.Generator().manual_seed(0)
    c, s = tiny.unet.config.in_channels, tiny.unet.config.sample_size
    latents, next_latents = torch.randn(2, 3, c, s, s, generator=g), torch.randn(2, 3, c, s, s, generator=g)
    t = torch.tensor([[999, 749, 499], [249, 999, 749]])
    embeds, neg = common.encode_prompts(tiny, ["a red cat", "a green dog"]), common.encode_prompts(tiny, [""])
    with torch.no_grad():
        log_prob, eps = common.step_log_prob(tiny, latents, next_latents, t, embeds, neg, **KW)
        assert log_prob.shape == (2, 3) and eps.shape == (2, 3, c, s, s)
        for i in range(2):
            for j in range(3):
                one, one_eps = common.step_log_prob(tiny, latents[i, j][None], next_latents[i, j][None], t[i, j][None],
                                                    embeds[i][None], neg, **KW)
                assert_close_normwise(eps[i, j], one_eps[0])
                # a log-density sums c s s terms of size ~1 and is itself ~c s s: its error is that of a sum
                torch.testing.assert_close(log_prob[i, j], one[0], rtol=NETWORK_RTOL, atol=0)
        other, _ = common.step_log_prob(tiny, latents[0, 0][None], next_latents[0, 0][None], t[0, 0][None],
                                        embeds[1][None], neg, **KW)
        # the prompt matters (~100x)
        assert (other[0] - log_prob[0, 0]).abs() > 10 * NETWORK_RTOL * log_prob[0, 0].abs()


def test_each_distinct_prompt_is_encoded_once(tiny, monkeypatch):
    calls = []
    encoder = tiny.text_encoder.forward
    monkeypatch.setattr(tiny.text_encoder, "forward",
                        lambda ids, *a, **k: calls.append(len(ids)) or encoder(ids, *a, **k))
    prompts = ["a red cat", "a green dog", "a red cat", "a red cat"]
    embeds, pooled = common.encode_prompts(tiny, prompts, pooled=True)
    assert calls == [2] and embeds.shape[0] == pooled.shape[0] == 4
    assert torch.equal(embeds[0], embeds[2]) and torch.equal(embeds[0], embeds[3]) and torch.equal(pooled[0], pooled[3])
    alone = common.encode_prompts(tiny, ["a green dog"])
    assert_close_normwise(embeds[1], alone[0])
    assert not torch.allclose(embeds[0], embeds[1])


# Two minibatches of 2 trajectories, 4 timesteps, one optimiser step: the gradient is recovered exactly from AdamW's
# first moment, exp_avg = (1 - beta1) g (tests/test_scripts.py's torchrun test does the same). Different prompts
# within a minibatch where the method allows (K = 1, or K = 2 for the leave-one-out methods).
SETTINGS = {"reinforce": ["--k", 2], "ppo": ["--k", 1, "--gradient-accumulation-steps", 2],
            "loop": ["--k", 2, "--gradient-accumulation-steps", 2],
            "score_as_action": ["--k", 1, "--gradient-accumulation-steps", 2]}


@pytest.mark.parametrize("script", list(SETTINGS))
def test_every_chunking_of_the_trained_timesteps_gives_the_same_gradient(script, tmp_path):
    argv = [*TINY, "--num-steps", 4, "--num-epochs", 1, "--image-every", 0, "--max-grad-norm", 1e9, *SETTINGS[script]]
    grads, metrics = {}, {}
    for per_call in (1, 3, None):  # the reference's loop; uneven chunks (3 + 1); the CPU default, all 4 in one call
        flag = ["--timesteps-per-call", per_call] if per_call else []
        g = run_main(script, *argv, *flag, "--output-dir", tmp_path, "--run-name", str(per_call))
        assert g["steps_per_call"] == (per_call or 4) and g["global_step"] == 1
        beta1 = g["optimizer"].param_groups[0]["betas"][0]
        grads[per_call] = torch.cat([g["optimizer"].state[p]["exp_avg"].flatten() for p in g["params"]]) / (1 - beta1)
        metrics[per_call] = g["metrics"]
    assert grads[1].norm() > 0
    for per_call in (3, None):
        assert_close_normwise(grads[per_call], grads[1])
        # the logged means: each is a mean of per-row terms of order 1 or less (A rho, with advantages standardised
        # or of rewards in [0, 1]; (log rho)^2 / 2 and |rho - 1|, ~0 on-policy) that may cancel to ~0, so their
        # rounding is bounded relative to the terms, not to the mean
        for name in ("losses/policy_loss", "losses/approx_kl", "debug/ratio_dev_at_start"):
            a, b = float(metrics[per_call][name]), float(metrics[1][name])
            assert abs(a - b) <= NETWORK_RTOL * max(abs(b), 1.0), (name, a, b)
