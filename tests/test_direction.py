"""Which way each script climbs: one update of the script's own main block on the tiny model, with a reward that
favours a known subset of the samples, must raise the log-probability of the favoured trajectories relative to the
others. Seconds per script, and a sign, not a calibrated margin: it holds on any CPU.

Why a sign suffices. The update starts from the pretrained policy (LoRA B = 0), where every trained minibatch is
on-policy, so the clipped surrogate's gradient is REINFORCE's and the update decreases -sum A log pi over the trained
transitions to first order: afterwards sum A (log pi_new - log pi_old) > 0 over them. AdamW's first step is about the
gradient's sign times the learning rate, a diagonal preconditioning that keeps the descent direction. At the
learning rate here (every LoRA entry moves by about 1e-4) the measured sums are 1e-3 to 1e-2, a thousand times the
float32 noise of a log-prob (1e-6), and they shrink tenfold with the learning rate (linear: the second-order term
is negligible). The old log-probs are computed by the same code path with the adapters disabled, which is exactly
the initial policy, so only the update separates old from new. A script whose advantage had the wrong sign would
make the sum negative (each test was checked against its script with the advantage's sign flipped).

Where a method adds a term, the term is checked the same way: DPOK's KL and Score as Action's KL running reward pull
the policy towards the pretrained model, and Score as Action's V_phi moves towards its regression target.
"""

import contextlib

import pytest
import torch
from conftest import perturb_lora
from helpers import TINY, run_main

import common
import rewards
import score_as_action as saa

# 8 images of the toy task, 3 steps, every step trained; one optimiser step per epoch (so every minibatch is
# on-policy when it is computed), no images or checkpoints. K = 2: consecutive pairs share a prompt.
ONE_UPDATE = [*TINY[:6], "--num-steps", 3, "--sample-batch-size", 8, "--num-batches-per-epoch", 1, "--train-batch-size",
              4,
              "--num-epochs", 1, "--image-every", 0, "--save-every", 0, "--k", 2, "--learning-rate", 1e-4]
SCRIPT_ARGS = {  # what makes one epoch of each script one optimiser step on its samples
    "reinforce": [],  # one optimiser step per epoch by construction
    "ppo": ["--gradient-accumulation-steps", 2],
    "loop": ["--gradient-accumulation-steps", 2],
    "score_as_action": ["--gradient-accumulation-steps", 2, "--value-epochs", 0],  # V_phi as initialised (0)
    # DPOK: one policy step of 2 micro-batches of 4 transitions drawn from the buffer; its grad-norm clip of 0.1
    # would only rescale the step
    "dpok": ["--num-policy-steps", 1, "--train-batch-size", 4, "--gradient-accumulation-steps", 2, "--beta", 0],
}


def favour_even(images, prompts):
    """1 for the images at even positions of a reward call, 0 for the others: in each K = 2 group of a sampling
    batch the first image is the better one."""
    return (torch.arange(images.shape[0]) % 2 == 0).float()


def constant(images, prompts):
    """The same reward for every image: no trajectory is favoured, only an added term can move the policy."""
    return torch.ones(images.shape[0])


def one_update(script, tmp_path, monkeypatch, *extra, reward=favour_even, perturb=False, model="tiny"):
    """One epoch of `script` in process on `model`; with `perturb`, the LoRA B matrices start random (the policy away
    from the pretrained model, so that a KL term has a gradient). Returns the script's globals and the initial
    weights."""
    monkeypatch.setitem(rewards.REWARDS, reward.__name__, rewards.free(reward))
    initial = {}
    load = common.load_pipeline

    def load_and_remember(*args, **kwargs):
        pipe = load(*args, **kwargs)
        if perturb:
            perturb_lora(common.denoiser(pipe), seed=3, scale=0.05)
        initial.update({n: p.detach().clone() for n, p in common.denoiser(pipe).named_parameters() if p.requires_grad})
        return pipe

    monkeypatch.setattr(common, "load_pipeline", load_and_remember)
    g = run_main(script, *ONE_UPDATE, *SCRIPT_ARGS[script], "--reward", reward.__name__, "--output-dir", tmp_path,
                 "--model", model, *extra)
    assert g["global_step"] == 1
    return g, initial


def _embeds(g):
    if "embeds" in g["samples"]:
        return g["samples"]["embeds"]
    return common.encode_prompts(g["pipe"], [g["prompts"][i] for i in g["all_prompt_ids"].tolist()])  # DPOK


@contextlib.contextmanager
def old_policy(pipe, initial=None):
    """The policy before the update: the UNet with its adapters disabled when LoRA B started at 0 (`initial` None),
    else with its trainable weights set back to `initial` for the duration."""
    if initial is None:
        with common.adapters_disabled(common.denoiser(pipe)):
            yield
        return
    params = dict(common.denoiser(pipe).named_parameters())
    now = {n: params[n].detach().clone() for n in initial}
    with torch.no_grad():
        for n, w in initial.items():
            params[n].copy_(w)
    try:
        yield
    finally:
        with torch.no_grad():
            for n, w in now.items():
                params[n].copy_(w)


def log_prob_change(g, initial=None):
    """(N, T): log pi_new - log pi_old of every stored transition, both by the training code path (old_policy)."""
    pipe, samples, steps, embeds = g["pipe"], g["samples"], g["timesteps"], _embeds(g)
    x, n = samples["latents"], len(samples["latents"])
    kw = dict(num_steps=len(steps), guidance=g["args"].guidance, eta=g["args"].eta)

    def log_probs():
        return torch.stack([common.step_log_prob(pipe, x[:, j], x[:, j + 1], steps[j].expand(n), embeds,
                                                 g["neg_embeds"],
                                                 **kw)[0] for j in range(len(steps))], dim=1)

    with torch.no_grad():
        new = log_probs()
        with old_policy(pipe, initial):
            old = log_probs()
    return new - old


@pytest.mark.parametrize("model", ["tiny", "tiny-sd3"])
@pytest.mark.parametrize("script", ["reinforce", "ppo", "loop"])
def test_one_update_raises_the_favoured_trajectories(script, model, tmp_path, monkeypatch):
    """Trajectory-level advantages: the favoured (even) images have A > 0, the others A < 0 (leave-one-out with
    K = 2: +-1/2 of the reward gap; PPO: the batch-standardised reward, +-1). On the DDIM path and on the flow path
    (Flow-GRPO's SDE step), where the same script code climbs another log-probability. The flow step's
    noise is wider than DDIM's, so the same update moves its log-probabilities less: at 1e-4 the sums are 5e-6, near
    the float noise, so the flow run takes a learning rate of 1e-3 (sums of 5e-5, linear in the learning rate)."""
    lr = ["--learning-rate", 1e-3] if model == "tiny-sd3" else []
    g, _ = one_update(script, tmp_path, monkeypatch, *lr, model=model)
    change = log_prob_change(g).sum(1)  # (N,): log pi_new(tau) - log pi_old(tau)
    favoured = torch.arange(len(change)) % 2 == 0
    assert change[favoured].mean() > change[~favoured].mean(), change


def test_dpok_one_update_raises_the_favoured_transitions(tmp_path, monkeypatch):
    """DPOK trains on transitions drawn from its buffer, with A = r - V_phi(x_t, c, t): over the drawn transitions,
    sum A (log pi_new - log pi_old) > 0, and the favoured images' drawn transitions rise relative to the others."""
    g, _ = one_update("dpok", tmp_path, monkeypatch)
    buffer, drawn = g["buffer"], g["micro_batches"].flatten()  # the transitions the policy step was computed on
    b = {key: value[drawn] for key, value in buffer.items()}
    pipe, steps = g["pipe"], b["steps"]
    embeds = common.encode_prompts(pipe, [g["prompts"][i] for i in b["prompt_ids"].tolist()])
    kw = dict(num_steps=len(g["timesteps"]), guidance=g["args"].guidance, eta=g["args"].eta)
    with torch.no_grad():
        new = common.step_log_prob(pipe, b["latents"], b["next_latents"], g["timesteps"][steps], embeds,
                                   g["neg_embeds"], **kw)[0]
        with common.adapters_disabled(pipe.unet):
            old = common.step_log_prob(pipe, b["latents"], b["next_latents"], g["timesteps"][steps], embeds,
                                       g["neg_embeds"],
                                       **kw)[0]
    delta = new - old
    with torch.no_grad():
        advantages = b["rewards"] - g["value_net"](b["latents"], b["text"], steps)
    favoured = b["rewards"] == 1
    assert 0 < favoured.sum() < len(drawn)
    assert (advantages * delta).sum() > 0, (advantages, delta)
    assert delta[favoured].mean() > delta[~favoured].mean(), delta


def test_score_as_action_one_update_follows_its_step_advantages(tmp_path, monkeypatch):
    """Score as Action's advantages are per step, A_k = V(t_{k+1}, x_{k+1}) - V(t_k, x_k) standardised per timestep,
    here recomputed from the script's values and rewards by the module's functions: sum_{i,k} A_ik (log pi_new -
    log pi_old)_ik > 0. The last step's advantage is the favoured reward minus a value that does not see it."""
    g, _ = one_update("score_as_action", tmp_path, monkeypatch)
    samples = g["samples"]
    advantages = saa.standardise_per_timestep(saa.step_advantages(g["values"], samples["rewards"],
                                                                  torch.zeros_like(g["values"])))
    change = log_prob_change(g)
    assert (advantages * change).sum() > 0
    favoured = torch.arange(len(change)) % 2 == 0
    assert (advantages[favoured, -1] > 0).all() and (advantages[~favoured, -1] < 0).all()
    assert change[favoured, -1].mean() > change[~favoured, -1].mean()


def kl_to_pretrained(g):
    """mean over the stored states of ||eps_theta - eps_pre||^2, both CFG-guided: DPOK's KL term."""
    pipe, samples, steps, embeds = g["pipe"], g["samples"], g["timesteps"], _embeds(g)
    x = samples["latents"][:, :-1].flatten(0, 1)
    t, c = steps.repeat(len(samples["latents"])), embeds.repeat_interleave(len(steps), dim=0)
    with torch.no_grad():
        eps = common.guided_eps(pipe, x, t, c, g["neg_embeds"], g["args"].guidance)
        with common.adapters_disabled(pipe.unet):
            eps_pre = common.guided_eps(pipe, x, t, c, g["neg_embeds"], g["args"].guidance)
    return (eps - eps_pre).pow(2).mean()


def test_dpok_kl_term_pulls_towards_the_pretrained_model(tmp_path, monkeypatch):
    """From a policy away from the pretrained model, with a reward that favours nothing and the KL term alone
    (alpha > 0 is required: tiny), one update lowers DPOK's KL term on the epoch's own states."""
    g, initial = one_update("dpok", tmp_path, monkeypatch, "--beta", 1.0, "--alpha", 1e-6, reward=constant,
                            perturb=True)
    after = kl_to_pretrained(g)
    with old_policy(g["pipe"], initial):
        before = kl_to_pretrained(g)
    assert before > 0 and after < before, (before, after)


def test_score_as_action_kl_running_reward_penalises_the_steps_that_diverge(tmp_path, monkeypatch):
    """From a policy away from the pretrained model, with a reward that favours nothing: the advantages are the
    per-timestep standardised KL running rewards -beta kl_k (the value terms are constant per timestep and
    standardise away), recomputed here; one update moves the log-probs their way, down for the steps whose KL is
    above their timestep's mean."""
    g, initial = one_update("score_as_action", tmp_path, monkeypatch, "--beta", 1.0, reward=constant, perturb=True)
    kl = g["samples"]["kl"]
    assert (kl > 0).all()
    advantages = saa.standardise_per_timestep(saa.step_advantages(g["values"], g["samples"]["rewards"], -1.0 * kl))
    assert (advantages * log_prob_change(g, initial)).sum() > 0


def test_score_as_action_value_moves_towards_its_target(tmp_path, monkeypatch):
    """One pass of V_phi over the epoch's states lowers the structured value's squared error to the reward-to-go
    (here the reward: beta = 0), recomputed by the module's functions; V_phi starts as the script's seeded one."""
    g, _ = one_update("score_as_action", tmp_path, monkeypatch, "--value-epochs", 1, "--value-batch-size", 8)
    samples, steps, args = g["samples"], g["timesteps"], g["args"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)  # the script's V_phi initialisation
        initial = saa.ValueNet(samples["latents"].shape[2], g["neg_embeds"].shape[-1])
    n, t = samples["latents"].shape[:2]
    t = t - 1
    x = samples["latents"][:, :-1].flatten(0, 1)
    ts, c = steps.repeat(n), samples["embeds"].repeat_interleave(t, dim=0)
    target = saa.returns_to_go(samples["rewards"], torch.zeros(n, t)).flatten()

    def error(net):
        with torch.no_grad():
            value = saa.structured_value(ts, samples["x0_rewards"].flatten(), net(x, ts, c, g["horizon"]), g["horizon"])
        return (value - target).pow(2).mean()

    assert error(g["value_net"]) < error(initial)
