"""The methods' own functions: advantages, losses and their gradients, against hand computations."""

import pytest
import torch

import common
import loop
import ppo
import reinforce
import score_as_action

CLIPPED = [ppo, loop, score_as_action]  # the scripts with PPO's clipped surrogate (each defines its own policy_loss)


def test_leave_one_out_advantages_by_hand():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 0.0, 4.0])
    expected = torch.tensor([1 - 11 / 3, 2 - 10 / 3, 3 - 9 / 3, 6 - 6 / 3, 0 - 4 / 3, 0 - 4 / 3, 0 - 4 / 3, 4 - 0.0])
    for a in (reinforce.leave_one_out_advantages(r, 4), loop.leave_one_out_advantages(r, 4)):
        torch.testing.assert_close(a, expected)
        torch.testing.assert_close(a.view(2, 4).sum(1), torch.zeros(2), atol=1e-6, rtol=0)
    # invariant to adding a constant to one group's rewards
    shifted = r.clone()
    shifted[:4] += 100.0
    torch.testing.assert_close(loop.leave_one_out_advantages(shifted, 4), expected, atol=1e-5, rtol=0)
    # K = 1 (REINFORCE only): the batch-mean baseline
    torch.testing.assert_close(reinforce.leave_one_out_advantages(r, 1), r - r.mean())
    # K/(K-1) times the group-mean baseline: the known identity of the leave-one-out baseline
    g = r.view(2, 4)
    torch.testing.assert_close(loop.leave_one_out_advantages(r, 4).view(2, 4), (g - g.mean(1, keepdim=True)) * 4 / 3)


def test_loop_normalized_advantages_divide_by_group_std():
    r = torch.tensor([1.0, 3.0, 10.0, 30.0])
    a = loop.leave_one_out_advantages(r, 2, normalize=True)
    torch.testing.assert_close(a, torch.tensor([-2 / (1 + 1e-6), 2 / (1 + 1e-6), -20 / (10 + 1e-6), 20 / (10 + 1e-6)]))


def test_per_prompt_statistics_by_hand():
    stats = {}
    ids = ["a", "a", "b", "b"]
    r1 = torch.tensor([1.0, 3.0, 5.0, 9.0])
    a1 = ppo.per_prompt_advantages(stats, ids, r1, buffer_size=3, min_count=3)
    batch_mean, batch_std = 4.5, torch.tensor([1.0, 3.0, 5.0, 9.0]).std(unbiased=False).item()
    torch.testing.assert_close(a1, (r1 - batch_mean) / (batch_std + 1e-6))  # too few per prompt: batch stats
    assert stats == {"a": [1.0, 3.0], "b": [5.0, 9.0]}
    r2 = torch.tensor([2.0, 4.0, 7.0, 7.0])
    a2 = ppo.per_prompt_advantages(stats, ids, r2, buffer_size=3, min_count=3)
    assert stats == {"a": [3.0, 2.0, 4.0], "b": [9.0, 7.0, 7.0]}  # the last 3 of each prompt
    m0, s0 = 3.0, torch.tensor([3.0, 2.0, 4.0]).std(unbiased=False).item()
    m1, s1 = 23 / 3, torch.tensor([9.0, 7.0, 7.0]).std(unbiased=False).item()
    torch.testing.assert_close(a2, torch.tensor([(2 - m0) / (s0 + 1e-6), (4 - m0) / (s0 + 1e-6), (7 - m1) / (s1 + 1e-6),
                                                 (7 - m1) / (s1 + 1e-6)]))


@pytest.mark.parametrize("module", CLIPPED, ids=lambda m: m.__name__)
def test_ppo_loss_at_ratio_one_is_minus_mean_advantage(module):
    lp = torch.randn(6)
    adv = torch.randn(6)
    loss, kl, clipfrac = module.policy_loss(lp, lp, adv, 1e-4)
    torch.testing.assert_close(loss, -adv.mean())
    assert kl == 0 and clipfrac == 0


@pytest.mark.parametrize("module", CLIPPED, ids=lambda m: m.__name__)
def test_ppo_clipping_engages_exactly_outside_the_range(module):
    """clipfrac counts |rho - 1| > eps. The gradient of a sample vanishes exactly when its ratio left the
    range in the direction its advantage favours (rho > 1 + eps with A > 0, rho < 1 - eps with A < 0): PPO's
    pessimistic bound keeps the unclipped gradient when the ratio moved the other way."""
    eps = 0.1
    log_ratio = torch.log(torch.tensor([1.05, 1.2, 0.8, 1.2, 0.8, 0.95, 1.0999, 0.9001]))
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0, 1.0, -1.0])
    lp = log_ratio.clone().requires_grad_(True)
    loss, approx_kl, clipfrac = module.policy_loss(lp, torch.zeros(8), adv, eps)
    loss.backward()
    torch.testing.assert_close(approx_kl, 0.5 * (log_ratio**2).mean())
    outside = (log_ratio.exp() - 1).abs() > eps
    torch.testing.assert_close(clipfrac, outside.float().mean())
    zero_grad = torch.tensor([False, True, False, False, True, False, False, False])
    assert torch.equal(lp.grad == 0, zero_grad)
    # where the gradient survives it is -A * rho / N
    torch.testing.assert_close(lp.grad[~zero_grad], (-adv * log_ratio.exp() / 8)[~zero_grad])


def test_reinforce_gradient_equals_ppo_gradient_on_first_minibatch(tiny, embeds):
    """With the same samples and advantages, before any update (rho = 1), PPO's clipped loss and
    REINFORCE's -A log pi have the same gradient."""
    from conftest import perturb_lora

    _, emb, neg = embeds
    perturb_lora(tiny.unet)  # non-zero B so that every LoRA matrix gets a gradient
    traj = common.sample(tiny, emb, neg, num_steps=3, guidance=5.0, eta=1.0, generator=torch.Generator().manual_seed(0))
    adv = torch.tensor([1.0, -0.5, 0.25])
    params = common.trainable_parameters(tiny.unet)
    grads = []
    try:
        for loss_fn in (lambda lp, old: reinforce.policy_loss(lp, old, adv)[0], lambda lp, old: ppo.policy_loss(lp, old,
                                                                                                                adv,
                                                                                                                1e-4)[0]):
            for p in params:
                p.grad = None
            for j in range(3):
                lp, _ = common.step_log_prob(tiny, traj.latents[:, j], traj.latents[:, j + 1], traj.timesteps[j], emb,
                                             neg,
                                             num_steps=3, guidance=5.0, eta=1.0)
                (loss_fn(lp, traj.log_probs[:, j]) / 3).backward()
            grads.append(torch.cat([p.grad.flatten() for p in params]))
    finally:
        perturb_lora(tiny.unet, scale=0.0)
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def _loop_gradient_step(tiny, emb, neg, rewards, lr=1e-3):
    traj = common.sample(tiny, emb, neg, num_steps=2, guidance=5.0, eta=1.0, generator=torch.Generator().manual_seed(1))
    adv = loop.leave_one_out_advantages(rewards, 2)
    params = common.trainable_parameters(tiny.unet)

    def log_probs():
        return sum(common.step_log_prob(tiny, traj.latents[:, j], traj.latents[:, j + 1], traj.timesteps[j], emb, neg,
                                        num_steps=2, guidance=5.0, eta=1.0)[0] for j in range(2))

    for p in params:
        p.grad = None
    before = log_probs()
    for j in range(2):
        lp, _ = common.step_log_prob(tiny, traj.latents[:, j], traj.latents[:, j + 1], traj.timesteps[j], emb, neg,
                                     num_steps=2, guidance=5.0, eta=1.0)
        (loop.policy_loss(lp, traj.log_probs[:, j], adv, 1e-4)[0] / 2).backward()
    grad = torch.cat([p.grad.flatten() for p in params])
    with torch.no_grad():
        for p in params:
            p -= lr * p.grad
        after = log_probs()
        for p in params:
            p += lr * p.grad
    return grad, before.detach(), after


def test_loop_gradient_is_zero_for_equal_rewards_and_favours_the_better_image(tiny, embeds):
    from conftest import perturb_lora

    _, emb, neg = embeds
    emb2 = emb[:1].expand(2, -1, -1)  # one prompt, K = 2
    perturb_lora(tiny.unet)
    try:
        grad, _, _ = _loop_gradient_step(tiny, emb2, neg, torch.tensor([0.7, 0.7]))
        assert grad.abs().max() == 0
        grad, before, after = _loop_gradient_step(tiny, emb2, neg, torch.tensor([1.0, 0.0]))
        assert grad.abs().max() > 0
        assert after[0] > before[0]  # the better image's log-probability is pushed up
        assert after[0] - after[1] > before[0] - before[1]  # and up relative to the worse one
    finally:
        perturb_lora(tiny.unet, scale=0.0)
