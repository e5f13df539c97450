"""dpok.py: the KL term, the plain clamp, the value network, the replay buffer, beta's pull towards the
pretrained model; then end to end (outputs, resume, torchrun, bad input) and learning on the toy task."""

import pytest
import torch
from conftest import perturb_lora
from helpers import TINY, error_line, lora_weights, run, run_main, scalars, training_state

import common
import rewards
import dpok

KW = dict(num_steps=2, guidance=7.5, eta=1.0)


def _step(tiny, emb, neg, latents, next_latents, t):
    """The script's training forward for one batch of transitions: log pi_theta, eps_theta and eps_pre."""
    log_prob, eps = common.step_log_prob(tiny, latents, next_latents, t, emb, neg, **KW)
    with torch.no_grad(), common.adapters_disabled(tiny.unet):
        eps_pre = common.guided_eps(tiny, latents, t, emb, neg, KW["guidance"])
    return log_prob, eps, eps_pre


def test_kl_term_is_zero_at_init_and_positive_after_one_update(tiny, embeds):
    _, emb, neg = embeds
    traj = common.sample(tiny, emb, neg, **KW, generator=torch.Generator().manual_seed(0))
    params = common.trainable_parameters(tiny.unet)
    saved = [p.detach().clone() for p in params]
    for p in params:
        p.grad = None  # the session-wide tiny model may carry gradients from other tests
    try:
        log_prob, eps, eps_pre = _step(tiny, emb, neg, traj.latents[:, 0], traj.latents[:, 1], traj.timesteps[0])
        assert torch.equal(eps, eps_pre)  # zero-initialised LoRA B: the policy is the pretrained model exactly
        kl = dpok.kl_to_pretrained(eps, eps_pre)
        assert kl.shape == (3,) and torch.equal(kl, torch.zeros(3))
        loss, _, _ = dpok.policy_loss(log_prob, traj.log_probs[:, 0], torch.tensor([1.0, -0.5, 0.25]), 1e-4)
        (10.0 * loss).backward()
        torch.optim.AdamW(params, lr=1e-3).step()
        _, eps, eps_pre = _step(tiny, emb, neg, traj.latents[:, 0], traj.latents[:, 1], traj.timesteps[0])
        kl = dpok.kl_to_pretrained(eps, eps_pre)
        assert (kl > 0).all()
        torch.testing.assert_close(kl, ((eps - eps_pre) ** 2).flatten(1).mean(1))
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
                p.grad = None


def test_plain_clamp_gives_no_policy_gradient_outside_the_range():
    """Unlike PPO's pessimistic min/max, the reference's plain clamp zeroes the gradient of every transition
    whose ratio left [1 - eps, 1 + eps], whatever the sign of its advantage."""
    eps = 0.1
    ratio = torch.tensor([1.05, 1.2, 0.8, 1.2, 0.8, 0.95, 1.0999, 0.9001])
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0, 1.0, -1.0])
    lp = ratio.log().requires_grad_(True)
    loss, approx_kl, clipfrac = dpok.policy_loss(lp, torch.zeros(8), adv, eps)
    loss.backward()
    outside = (ratio - 1).abs() > eps
    assert torch.equal(lp.grad == 0, outside)
    torch.testing.assert_close(lp.grad[~outside], (-adv * ratio / 8)[~outside])
    torch.testing.assert_close(clipfrac, outside.float().mean())
    torch.testing.assert_close(approx_kl, 0.5 * (ratio.log() ** 2).mean())
    # at ratio 1 the loss is -mean(A) and its gradient is REINFORCE's -A / N
    lp = torch.zeros(8, requires_grad=True)
    loss, _, _ = dpok.policy_loss(lp, torch.zeros(8), adv, eps)
    loss.backward()
    torch.testing.assert_close(loss, -adv.mean())
    torch.testing.assert_close(lp.grad, -adv / 8)


def test_transition_outside_the_clamp_gives_no_gradient_to_the_unet(tiny, embeds):
    _, emb, neg = embeds
    params = common.trainable_parameters(tiny.unet)
    perturb_lora(tiny.unet)  # non-zero B: every LoRA matrix has a gradient
    try:
        traj = common.sample(tiny, emb, neg, **KW, generator=torch.Generator().manual_seed(1))
        adv = torch.tensor([0.0, 1.0, 0.0])  # only the second transition carries a policy gradient
        grads = []
        for shift in (0.0, 1e-3):  # its behaviour log-prob as sampled, then moved so that |rho - 1| ~ 1e-3 > eps
            old = traj.log_probs[:, 0] - torch.tensor([0.0, shift, 0.0])
            for p in params:
                p.grad = None
            log_prob, _, _ = _step(tiny, emb, neg, traj.latents[:, 0], traj.latents[:, 1], traj.timesteps[0])
            loss, _, clipfrac = dpok.policy_loss(log_prob, old, adv, 1e-4)
            loss.backward()
            grads.append(torch.cat([p.grad.flatten() for p in params]))
        assert grads[0].abs().max() > 0 and torch.equal(grads[1], torch.zeros_like(grads[1]))
        assert clipfrac == pytest.approx(1 / 3)
    finally:
        perturb_lora(tiny.unet, scale=0.0)
        for p in params:
            p.grad = None


def test_loss_is_alpha_times_policy_term_plus_beta_times_kl():
    """dpok_loss as the script uses it, against a hand computation of value and gradients: inside the clamp the
    policy gradient is -alpha * A * rho / N, and the KL term pulls eps_theta towards eps_pre with
    beta * 2 (eps_theta - eps_pre) / (N * D)."""
    g = torch.Generator().manual_seed(0)
    log_ratio = torch.tensor([3e-5, -2e-5, 5e-5, -6e-5])  # inside [1 - 1e-4, 1 + 1e-4]
    lp = log_ratio.clone().requires_grad_(True)
    eps = torch.randn((4, 2, 3, 3), generator=g).requires_grad_(True)
    eps_pre = torch.randn((4, 2, 3, 3), generator=g)
    adv = torch.tensor([1.0, -2.0, 0.5, 3.0])
    loss, policy, kl, approx_kl, clipfrac = dpok.dpok_loss(lp, torch.zeros(4), adv, eps, eps_pre, alpha=10.0, beta=0.3,
                                                           clip=1e-4)
    loss.backward()
    ratio, sq = log_ratio.exp(), (eps.detach() - eps_pre) ** 2
    torch.testing.assert_close(policy, -(adv * ratio).mean())
    torch.testing.assert_close(kl, sq.mean())
    torch.testing.assert_close(loss.detach(), -10.0 * (adv * ratio).mean() + 0.3 * sq.mean())
    torch.testing.assert_close(lp.grad, -10.0 * adv * ratio / 4)
    torch.testing.assert_close(eps.grad, 0.3 * 2 * (eps.detach() - eps_pre) / eps.numel())
    assert clipfrac == 0 and approx_kl == pytest.approx(0.5 * (log_ratio**2).mean().item())


def test_buffer_draws_are_uniform_over_old_and_new_transitions():
    """Each micro-batch is a draw without replacement in which every buffered transition, from this epoch or an
    earlier one, is equally likely (the reference's np.random.choice(n, b, replace=False))."""
    draws = dpok.draw_indices(6000, 12, torch.Generator().manual_seed(0))[:, :3]
    assert draws.shape == (6000, 3) and (draws.sort(dim=1).values.diff(dim=1) > 0).all()  # no repeats in a draw
    frequency = torch.bincount(draws.flatten(), minlength=12).float() / draws.numel()
    assert (frequency - 1 / 12).abs().max() < 0.01, frequency  # standard error ~0.002 per position
    assert not torch.equal(draws[0], draws[1])


def test_value_network_fits_a_synthetic_target():
    """V_phi regresses a target that depends on the prompt, the step and x_t; its MSE falls by 10x."""
    g = torch.Generator().manual_seed(0)
    n, num_steps = 512, 5
    text_table = torch.randn(3, 32, generator=g)
    prompt = torch.randint(3, (n,), generator=g)
    batch = dict(latents=torch.randn(n, 4, 8, 8, generator=g), text=text_table[prompt],
                 steps=torch.randint(num_steps, (n,), generator=g))
    batch["rewards"] = 0.2 * prompt - 0.05 * batch["steps"] + 0.1 * batch["latents"][:, 0, 0, 0]
    torch.manual_seed(0)
    value_net = dpok.ValueNet(4 * 8 * 8, 32, num_steps)
    assert value_net(batch["latents"][:7], batch["text"][:7], batch["steps"][:7]).shape == (7,)
    optimizer = torch.optim.AdamW(value_net.parameters(), lr=1e-3)
    first = dpok.value_loss(value_net, batch).item()
    for i in range(300):
        idx = torch.randperm(n, generator=g)[:64]
        loss = dpok.value_loss(value_net, {k: v[idx] for k, v in batch.items()})
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    last = dpok.value_loss(value_net, batch).item()
    assert last < first / 10 and last < 0.01, (first, last)


def test_transitions_are_step_major_and_the_buffer_keeps_exactly_the_most_recent():
    n, num_steps = 3, 4
    latents = torch.randn(n, num_steps + 1, 4, 2, 2)
    log_probs, rewards, text = torch.randn(n, num_steps), torch.tensor([10.0, 20.0, 30.0]), torch.randn(n, 5)
    tr = dpok.to_transitions(latents, log_probs, rewards, text, torch.tensor([2, 0, 1]))
    assert len(tr["steps"]) == n * num_steps
    for j in range(num_steps):
        for i in range(n):
            k = j * n + i  # all samples at step 0, then step 1, ... (the reference's order)
            assert torch.equal(tr["latents"][k], latents[i, j]) and torch.equal(tr["next_latents"][k],
                                                                                latents[i, j + 1])
            assert tr["steps"][k] == j and tr["log_probs"][k] == log_probs[i, j] and tr["rewards"][k] == rewards[i]
            assert torch.equal(tr["text"][k], text[i]) and tr["prompt_ids"][k] == [2, 0, 1][i]
    buffer, added = {}, []
    for r in range(5):
        new = torch.arange(r * 12, (r + 1) * 12)
        added += new.tolist()
        buffer = dpok.buffer_add(buffer, {"id": new, "x": new.float()[:, None].expand(12, 3)}, 30)
        assert buffer["id"].tolist() == added[-30:] and torch.equal(buffer["x"][:, 0], buffer["id"].float())
    assert dpok.buffer_add({}, {"id": torch.arange(5)}, 30)["id"].tolist() == [0, 1, 2, 3, 4]


def _drift_from_pretrained(tiny, prompts, emb, neg, beta: float, updates: int = 3) -> float:
    """A short DPOK run in process (fresh samples, A = r - mean r, both loss terms), then the mean squared
    difference of eps_theta and eps_pre on fixed inputs. The LoRA weights are restored afterwards."""
    params = common.trainable_parameters(tiny.unet)
    saved = [p.detach().clone() for p in params]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    try:
        for u in range(updates):
            traj = common.sample(tiny, emb, neg, **KW, generator=torch.Generator().manual_seed(100 + u))
            scores = rewards.color(traj.images, prompts)
            for j in range(KW["num_steps"]):
                log_prob, eps, eps_pre = _step(tiny, emb, neg, traj.latents[:, j], traj.latents[:, j + 1],
                                               traj.timesteps[j])
                loss, _, _ = dpok.policy_loss(log_prob, traj.log_probs[:, j], scores - scores.mean(), 1e-4)
                ((10.0 * loss + beta * dpok.kl_to_pretrained(eps, eps_pre).mean()) / KW["num_steps"]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        x = torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            drift = [dpok.kl_to_pretrained(*_step(tiny, emb, neg, x, x, t)[1:]).mean() for t in (901, 501, 101)]
        return torch.stack(drift).mean().item()
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
                p.grad = None


def test_large_beta_keeps_the_model_closer_to_the_pretrained_one(tiny, embeds):
    prompts, emb, neg = embeds
    free, held = _drift_from_pretrained(tiny, prompts, emb, neg, beta=0.0), _drift_from_pretrained(tiny, prompts, emb,
                                                                                                   neg, beta=100.0)
    assert free > 0 and held < free / 5, (free, held)  # measured: 0.037 vs 0.0018


# ----------------------------------------------------------------------------------------------------
# The script end to end (subprocess, tiny model, CPU)
# ----------------------------------------------------------------------------------------------------

# 4 images x 2 steps = 8 transitions per epoch into a buffer of 12 (trimmed at epoch 1, when it holds 4 transitions of
# epoch 0 and 8 new ones), 2 policy steps of 2 x 2.
SMALL = [*TINY, "--gradient-accumulation-steps", 2, "--num-policy-steps", 2, "--buffer-size", 12, "--value-batch-size",
         4,
         "--num-value-batches", 2]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """2 epochs in one go (a checkpoint every epoch), and a second run resumed from its epoch-1 checkpoint."""
    out = tmp_path_factory.mktemp("dpok")
    run("dpok", *SMALL, "--num-epochs", 2, "--output-dir", out, "--run-name", "whole")
    run("dpok", *SMALL, "--num-epochs", 2, "--output-dir", out, "--run-name", "split",
        "--resume", out / "whole" / "checkpoints" / "epoch_0001")
    return out


def test_end_to_end_outputs(runs):
    run_dir = runs / "whole"
    assert (run_dir / "images" / "before.png").exists() and (run_dir / "images" / "after.png").exists()
    assert (run_dir / "reward_curve.png").exists()
    logged = scalars(run_dir)
    for tag in ("charts/reward_mean", "charts/reward_std", "charts/images_per_sec", "charts/learning_rate",
                "losses/policy_loss", "losses/kl_to_ref", "losses/value_loss", "losses/approx_kl", "losses/clipfrac",
                "debug/ratio_dev_at_start", "losses/explained_variance", "debug/fresh_fraction", "eval/reward_mean",
                "eval/reward_gain_3steps"):
        assert tag in logged, tag
    # the policy trains on the whole buffer: at epoch 0 all of it is fresh, at epoch 1 old transitions are drawn too
    (_, fresh0), (_, fresh1) = logged["debug/fresh_fraction"]
    assert fresh0 == 1 and 0 < fresh1 < 1, (fresh0, fresh1)
    assert logged["debug/ratio_dev_at_start"][0][1] < 1e-5  # epoch 0: the buffer holds only on-policy transitions
    assert logged["losses/kl_to_ref"][0][1] > 0  # the second policy step already sees a moved model
    assert len(logged["charts/reward_mean"]) == 2 and len(logged["eval/reward_mean"]) == 3
    state = training_state(run_dir / "checkpoints" / "epoch_0002")  # loads with weights_only=True
    assert state["epoch"] == 2 and state["global_step"] == 4 and state["world_size"] == 1
    assert state["buffer"]["latents"].shape == (12, 4, 8, 8)
    assert state["buffer"]["steps"].tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1]  # epoch 0's step 1, then epoch 1
    assert set(state["value_net"]) and state["value_optimizer"]["state"] and state["optimizer"]["state"]
    weights = lora_weights(run_dir / "checkpoints" / "epoch_0002")
    assert any(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k or "lora.up" in k)
    common.offline_pipeline("tiny").load_lora_weights(str(run_dir / "checkpoints" / "epoch_0002"))


def _equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_resume_is_bit_identical(runs):
    """Exact on any CPU: the same operations in the same order, shapes and thread count on one machine."""
    whole, split = runs / "whole" / "checkpoints" / "epoch_0002", runs / "split" / "checkpoints" / "epoch_0002"
    assert _equal(lora_weights(whole), lora_weights(split))
    sa, sb = training_state(whole), training_state(split)
    for key in ("value_net", "buffer", "optimizer", "value_optimizer", "reward_curve", "global_step"):
        assert _equal(sa[key], sb[key]), key


def test_torchrun_two_processes(tmp_path):
    run("dpok", *SMALL, "--num-epochs", 1, "--image-every", 0, "--output-dir", tmp_path, "--run-name", "two",
        torchrun=2)
    state = training_state(tmp_path / "two" / "checkpoints" / "epoch_0001")
    assert state["world_size"] == 2 and state["buffer"]["rewards"].shape == (16,)  # both processes' buffers
    assert len(state["reward_curve"]) == 1 and state["global_step"] == 2


@pytest.mark.parametrize("order", ["first", "last"])
def test_value_fit_order_and_the_baseline_in_the_advantages(tmp_path, order):
    """One epoch in process. With --value-fit first (the reference) the advantages are r - V_phi with V_phi as fitted
    on this epoch's buffer; with last, r - V_phi as it was before (here: its initialisation), and V_phi is fitted
    after the policy steps. Either way V_phi is trained and it is the baseline."""
    g = run_main("dpok", *SMALL, "--num-epochs", 1, "--image-every", 0, "--save-every", 0, "--value-fit", order,
                 "--output-dir", tmp_path)
    buffer = g["buffer"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(42)  # the script's seed: V_phi's initialisation
        initial = dpok.ValueNet(4 * 8 * 8, 32, 2)
    with torch.no_grad():
        before = buffer["rewards"] - initial(buffer["latents"], buffer["text"], buffer["steps"])
        after = buffer["rewards"] - g["value_net"](buffer["latents"], buffer["text"], buffer["steps"])
    assert (after - before).abs().max() > 1e-4  # V_phi was trained
    torch.testing.assert_close(g["advantages"], after if order == "first" else before, rtol=0, atol=1e-6)


def test_lora_rank_0_fails_in_one_line(tmp_path):
    proc = run("dpok", *SMALL, "--lora-rank", 0, "--output-dir", tmp_path, check=False)
    assert proc.returncode != 0 and error_line(proc).startswith("error: ") and "--lora-rank" in error_line(proc)
    assert "Traceback" not in proc.stderr


# Learning: tests/test_learning.py (the pretrained shapes world, calibrated over seeds and thread counts). The toy
# task's learning test that stood here failed deterministically on another CPU.
