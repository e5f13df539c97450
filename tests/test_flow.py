"""The flow-matching path (SD 3.x, docs/flow.md): Flow-GRPO's SDE step and sampler against diffusers and analytic
values, the training path's log-probabilities, LoRA in diffusers' SD3 format, and the scripts on the tiny SD3-class
model (all five scripts train on it; DPOK and Score as Action with the exact per-step KL of the flow step)."""

import math

import pytest
import torch

import common
import offline
import runs
from helpers import TINY, assert_close_normwise, lora_weights, run, scalars


@pytest.fixture(scope="module")
def sd3():
    pipe = common.offline_pipeline(common.TINY_SD3)
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.vae):
        module.requires_grad_(False)
    return pipe


@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_the_sampler_at_noise_level_0_is_diffusers_sd3_pipeline(sd3, guidance):
    """With the noise level at 0 the SDE step is the Euler step: the sampler's x_0 equals StableDiffusion3Pipeline's
    from the same x_1, embeddings and guidance (its own CFG, shift and sigmas), and the log-probabilities are 0."""
    prompts = ["a red circle", "a blue square and a green triangle", "a red circle"]
    embeds, neg = common.encode_flow_prompts(sd3, prompts), common.encode_flow_prompts(sd3, [""])
    hidden, pooled = common.unpack_flow_embeds(sd3.transformer, embeds)
    ref_hidden, _, ref_pooled, _ = sd3.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None,
                                                     do_classifier_free_guidance=False, max_sequence_length=77)
    assert torch.equal(hidden, ref_hidden) and torch.equal(pooled, ref_pooled)  # the packing loses nothing
    assert hidden.shape[1] == 77 + 77  # the CLIP tokens, then as many zero rows in T5's place (common.t5_tokens)
    x_1 = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    traj = common.flow_sample(sd3, embeds, neg, num_steps=4, guidance=guidance, noise_level=0.0, latents=x_1,
                              decode=False)
    neg_hidden, neg_pooled = common.unpack_flow_embeds(sd3.transformer, neg.expand(3, -1, -1))
    expected = sd3(prompt_embeds=hidden, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg_hidden,
                   negative_pooled_prompt_embeds=neg_pooled, latents=x_1, num_inference_steps=4,
                   guidance_scale=guidance, output_type="latent").images
    assert traj.latents.shape == (3, 5, 16, 8, 8) and torch.equal(traj.latents[:, 0], x_1)
    assert_close_normwise(traj.latents[:, -1], expected)
    assert torch.equal(traj.log_probs, torch.zeros(3, 4))
    torch.testing.assert_close(traj.timesteps, sd3.scheduler.timesteps.float())


def test_the_step_log_prob_is_the_gaussian_by_hand_and_its_ratio_is_1_on_its_own_samples():
    """log pi(x' | x) of a sampled step is the mean over dimensions of log N(x'; mean, std^2 (-dt)) with Flow-GRPO's
    mean and std written out here; re-evaluating the stored transition gives the same value (ratio 1); at sigma = 1
    the std divides by 1 - sigma_1, the reference's guard."""
    g = torch.Generator().manual_seed(1)
    x, v, z = (torch.randn(4, 16, 8, 8, generator=g) for _ in range(3))
    a, sigma_1 = 0.7, 0.9
    for sigma, sigma_next in ((1.0, 0.9), (0.6, 0.45)):
        x_next, log_prob, x0 = common.flow_step(v, x, sigma, sigma_next, sigma_1, noise_level=a, noise=z)
        dt = sigma_next - sigma
        std_t = a * math.sqrt(sigma / (1 - (sigma_1 if sigma == 1 else sigma)))
        mean = x * (1 + std_t**2 / (2 * sigma) * dt) + v * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
        std = std_t * math.sqrt(-dt)
        torch.testing.assert_close(x_next, mean + std * z)
        expected = torch.distributions.Normal(mean, std).log_prob(x_next).mean(dim=(1, 2, 3))
        torch.testing.assert_close(log_prob, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x0, x - sigma * v)
        _, again, _ = common.flow_step(v, x, torch.full((4,), sigma), torch.full((4,), sigma_next), sigma_1,
                                       noise_level=a, prev_sample=x_next)
        assert torch.equal(again, log_prob)


def test_the_sde_keeps_the_flows_marginals():
    """Flow-GRPO's SDE has the ODE's marginals: driven by the exact velocity of Gaussian data x0 ~ N(m, s^2)
    (x_t = (1 - t) x0 + t eps, v = E[eps - x0 | x_t]), it ends at N(m, s^2) for any noise level. A sign error in
    the drift's correction ends far off (measured: std 2.1 to 12 instead of 0.5). Tolerances: 320,000 values give a
    standard error of 0.001 on the mean and 0.1% on the std; the discretisation at 100 steps moves the std by 0.0% to
    1.6% in these three cases (measured; the deterministic Euler step, a = 0, by 2.8% at shift 3, and is compared with
    diffusers above instead); 0.01 and 4% sit above both."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    m, s = 1.5, 0.5

    def velocity(x, t):
        var = (1 - t) ** 2 * s**2 + t**2
        return (t - (1 - t) * s**2) / var * (x - (1 - t) * m) - m

    for shift, a in ((1.0, 0.7), (3.0, 0.7), (3.0, 1.0)):
        sigmas = common.flow_sigmas(FlowMatchEulerDiscreteScheduler(shift=shift), 100, "cpu")
        g = torch.Generator().manual_seed(0)
        x = torch.randn(20000, 1, 4, 4, generator=g)
        for i in range(100):
            x, _, _ = common.flow_step(velocity(x, sigmas[i]), x, sigmas[i], sigmas[i + 1], sigmas[1], noise_level=a,
                                       noise=torch.randn(x.shape, generator=g))
        assert abs(x.mean().item() - m) < 0.01 and abs(x.std().item() / s - 1) < 0.04, (shift, a, x.mean(), x.std())


@pytest.mark.parametrize("alpha", [None, 8.0])
def test_sd3_lora_checkpoints_load_in_diffusers_and_resume_exactly(tmp_path, alpha):
    """LoRA on the transformer's attention projections (Flow-GRPO's targets): a checkpoint that runs.save_checkpoint
    writes loads with StableDiffusion3Pipeline.load_lora_weights into a fresh model and gives the same velocity, and
    runs.load_checkpoint restores every adapter weight exactly; with alpha = rank (scale 1) and alpha = 8 (scale 2,
    which diffusers must read from the saved adapter metadata)."""
    import runs

    def fresh(lora: bool):
        pipe = common.offline_pipeline(common.TINY_SD3)
        pipe.transformer.requires_grad_(False)
        if lora:
            common.add_lora(pipe.transformer, 4, alpha, common.FLOW_LORA_TARGETS, seed=0)  # alpha 8: scale 2
        return pipe

    pipe = fresh(True)
    names = [n for n, p in pipe.transformer.named_parameters() if p.requires_grad]
    adapted = {t for t in common.FLOW_LORA_TARGETS if any(f".{t}.lora_A." in n for n in names)}
    assert adapted == set(common.FLOW_LORA_TARGETS)
    assert all(".lora_" in n for n in names) and all(p.dtype == torch.float32 for p in
                                                     common.trainable_parameters(pipe.transformer))
    with torch.no_grad():
        for i, p in enumerate(common.trainable_parameters(pipe.transformer)):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.1)
    runs.save_checkpoint(tmp_path / "ckpt", pipe.transformer, {"epoch": 1})
    embeds, neg = common.encode_flow_prompts(pipe, ["a red circle", "a blue square"]), common.encode_flow_prompts(pipe,
                                                                                                                  [""])
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = common.guided_velocity(pipe.transformer, x, 700.0, embeds, neg, 5.0)
        with common.adapters_disabled(pipe.transformer):
            base = common.guided_velocity(pipe.transformer, x, 700.0, embeds, neg, 5.0)
    assert (expected - base).norm() > 1e-3 * base.norm()  # the perturbed adapters change the velocity

    other = fresh(False)
    other.load_lora_weights(str(tmp_path / "ckpt"))
    with torch.no_grad():
        assert_close_normwise(common.guided_velocity(other.transformer, x, 700.0, embeds, neg, 5.0), expected)

    resumed = fresh(True)
    state = runs.load_checkpoint(tmp_path / "ckpt", resumed.transformer)
    assert state["epoch"] == 1
    mine = dict(pipe.transformer.named_parameters())
    assert all(torch.equal(p, mine[n]) for n, p in resumed.transformer.named_parameters() if p.requires_grad)


def test_the_training_path_gives_the_samplers_log_probs_on_a_flow_model():
    """common.step_log_prob on stored flow transitions (t = sigma x 1000, each step's sigmas found on the schedule)
    gives the sampler's log-probabilities with perturbed adapters: exactly per step (the same computation), and
    with a trajectory's steps in one call of B x T rows up to float rounding (other batch shapes: 1.2e-7 measured),
    bounded by 1e-5, where the scripts warn that a ratio is no longer 1 on-policy (clip / 10 at SD's clip 1e-4)."""
    pipe = common.load_pipeline(common.TINY_SD3, lora_rank=4)
    embeds, neg = common.encode_prompts(pipe,
                                        ["a red image", "a blue image", "a red image"]), common.encode_prompts(pipe,
                                                                                                               [""])
    with torch.no_grad():
        for i, p in enumerate(common.trainable_parameters(pipe.transformer)):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.05)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    traj = common.sample(pipe, embeds, neg, num_steps=4, guidance=5.0, eta=0.7, generator=gens, decode=False)
    assert traj.log_probs.shape == (3, 4) and torch.isfinite(traj.log_probs).all()
    kw = dict(num_steps=4, guidance=5.0, eta=0.7)
    with torch.no_grad():
        per_step = torch.stack([common.step_log_prob(pipe, traj.latents[:, i], traj.latents[:, i + 1],
                                                     traj.timesteps[i],
                                                     embeds, neg, **kw)[0] for i in range(4)], dim=1)
        together, _ = common.step_log_prob(pipe, traj.latents[:, :-1], traj.latents[:, 1:], traj.timesteps.expand(3, 4),
                                           embeds, neg, **kw)
    assert torch.equal(per_step, traj.log_probs)
    assert (together - traj.log_probs).abs().max() < 1e-5


@pytest.mark.parametrize("script", ["reinforce", "ppo", "loop", "dpok", "score_as_action"])
def test_the_scripts_train_on_a_flow_model(script, tmp_path):
    """An epoch of each on the tiny SD3-class model, unchanged: the ratio is 1 before the first update, the LoRA on the
    transformer moves, and the checkpoint holds diffusers' SD3 LoRA keys (loading it is tested above)."""
    flags = [f if f != "tiny" else common.TINY_SD3 for f in TINY]
    run(script, *flags, "--num-epochs", "1", "--output-dir", tmp_path, "--run-name", "r")
    logged = scalars(tmp_path / "r")
    assert logged["debug/ratio_dev_at_start"][0][1] < 1e-5
    weights = lora_weights(tmp_path / "r" / "checkpoints" / "epoch_0001")
    assert weights and all(k.startswith("transformer.transformer_blocks.") for k in weights)
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert max(v.abs().max().item() for k, v in weights.items() if "lora_B" in k) > 0  # B starts at 0
    if script == "loop":  # the evaluation before training is Flow-GRPO's: the deterministic sampler (noise level 0)
        import rewards

        pipe = common.load_pipeline(common.TINY_SD3, lora_rank=4)
        prompts, neg = common.load_eval_prompts("colors"), common.encode_prompts(pipe, [""])
        reward = rewards.make("color", "cpu", None, prompts)
        means = [common.evaluate(pipe, prompts, reward, neg, num_steps=steps, guidance=4.5, eta=eta, seed=42)[1].mean()
                 for steps in (2, 3) for eta in (0.0, 0.7)]
        logged = [logged[f"eval/reward_mean_{steps}steps"][0][1] for steps in (2, 3)]
        assert logged == pytest.approx([means[0].item(), means[2].item()], rel=1e-5), (logged, means)
        # not the training sampler's (a = 0.7): 3e-4 and 5e-4 apart, relative, on this random model (measured)
        assert logged != pytest.approx([means[1].item(), means[3].item()], rel=1e-5)


@pytest.mark.parametrize("script", ["ppo", "dpok", "score_as_action"])
def test_unset_sampling_flags_take_the_model_familys_defaults_and_set_ones_are_kept(script):
    """Steps, guidance and noise level left unset are the script's own SD_DEFAULTS on an SD 1.x model and Flow-GRPO's
    SD 3.5 values (10, 4.5, 0.7) on an SD 3.x model, the family read without loading weights (the committed shapes
    models by folder, too); a flag the user sets is never replaced."""
    import importlib

    import tyro

    module = importlib.import_module(script)
    for model, expected in [("tiny", module.SD_DEFAULTS), (str(common.SHAPES_DIR), module.SD_DEFAULTS),
                            ("tiny-sd3", dict(num_steps=10, guidance=4.5, eta=0.7)),
                            (str(common.SHAPES_FLOW_DIR), dict(num_steps=10, guidance=4.5, eta=0.7))]:
        args = tyro.cli(module.Args, args=["--model", model])
        runs.validate_args(args, module.SD_DEFAULTS)
        assert {k: getattr(args, k) for k in expected} == expected, model
        args = tyro.cli(module.Args, args=["--model", model, "--num-steps", "7", "--guidance", "1", "--eta", "0.5"])
        runs.validate_args(args, module.SD_DEFAULTS)
        assert (args.num_steps, args.guidance, args.eta) == (7, 1.0, 0.5)
    assert module.SD_DEFAULTS["num_steps"] == 50 and module.SD_DEFAULTS["eta"] == 1.0
    assert module.SD_DEFAULTS["guidance"] == {"ppo": 5.0, "dpok": 7.5, "score_as_action": 7.0}[script]


def test_sd35m_random_has_sd35_mediums_shapes():
    """`sd35m-random` is SD 3.5 Medium's architecture (built here on the meta device, no memory): 2.24B transformer
    parameters (MMDiT-X: dual attention in the first 13 of 24 blocks, RMS q/k norm), 1024 px through a 16-channel
    latent 8x smaller, CLIP-L and bigG whose pooled outputs fill the 2048-wide pooled projection."""
    with torch.device("meta"):
        pipe = common.offline_pipeline(common.SD35M_RANDOM)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(pipe.transformer) == 2_243_171_520
    assert (pipe.vae_scale_factor, pipe.transformer.config.sample_size, pipe.vae.config.latent_channels) == (8, 128, 16)
    widths = [e.config.projection_dim for e in (pipe.text_encoder, pipe.text_encoder_2)]
    assert widths == [768, 1280] and sum(widths) == pipe.transformer.config.pooled_projection_dim
    assert sum(type(b.attn2).__name__ == "Attention" for b in pipe.transformer.transformer_blocks if b.attn2) == 13
    assert pipe.text_encoder_3 is None and common.t5_tokens(pipe) == 77


def test_score_as_actions_flow_kl_is_the_exact_step_kl_summed_over_dimensions_and_x0_hat_is_tweedies():
    """Score as Action's KL running reward on a flow model: each step's Gaussian KL summed over the latent's
    dimensions (the DDPM path's kl_terms are sums too), against |mu_theta - mu_pre|^2 / (2 s^2) from the two models'
    deterministic steps and the step's variance written out; and the
    sampler's x0_hat (its denoised-reward input) is x_t - sigma v_hat at every step."""
    import score_as_action as saa

    pipe = _perturbed_tiny_sd3()
    embeds, neg = common.encode_prompts(pipe, ["a red image", "a blue image"]), common.encode_prompts(pipe, [""])
    traj = common.sample(pipe, embeds, neg, num_steps=3, guidance=5.0, eta=0.7, return_pred_x0=True, decode=False,
                         generator=[torch.Generator().manual_seed(i) for i in range(2)])
    kl = saa.sampled_kl(pipe, traj.latents, traj.timesteps, embeds, neg, num_steps=3, guidance=5.0, eta=0.7, per_call=6)
    assert kl.shape == (2, 3) and (kl > 0).all()
    x, t = traj.latents[:, :-1].flatten(0, 1), traj.timesteps.repeat(2)  # the same 6 rows in one call, as sampled_kl
    c = embeds.repeat_interleave(3, dim=0)
    with torch.no_grad():
        v = common.guided_output(pipe, x, t, c, neg, 5.0)
        with common.adapters_disabled(pipe.transformer):
            v_pre = common.guided_output(pipe, x, t, c, neg, 5.0)
        sigma, sigma_next, sigma_1 = common.flow_step_sigmas(pipe, t, 6, 3, "cpu")
        zeros = torch.zeros_like(x)
        mu, _, x0 = common.flow_step(v, x, sigma, sigma_next, sigma_1, noise_level=0.7, noise=zeros)
        mu_pre, _, _ = common.flow_step(v_pre, x, sigma, sigma_next, sigma_1, noise_level=0.7, noise=zeros)
    s2 = 0.7**2 * sigma / (1 - torch.where(sigma == 1, sigma_1, sigma)) * (sigma - sigma_next)  # the step's variance
    expected = ((mu - mu_pre) ** 2).flatten(1).sum(1) / (2 * s2)
    # float32: the means' difference loses ~1e-6 of |mu| ~ 1 against |dmu| ~ 1e-2, so ~1e-4 relative in the KL
    torch.testing.assert_close(kl.flatten(), expected, rtol=1e-3, atol=0)
    assert_close_normwise(traj.pred_x0.flatten(0, 1), x0)  # the sampler's x0_hat (per step, batches of 2)


def _perturbed_tiny_sd3(scale=0.05):
    pipe = common.load_pipeline(common.TINY_SD3, lora_rank=4)
    with torch.no_grad():
        for i, p in enumerate(common.trainable_parameters(pipe.transformer)):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * scale)
    return pipe


def test_dpoks_flow_kl_is_the_exact_gaussian_kl_of_the_two_steps_and_pulls_towards_the_pretrained_model():
    """On a flow model DPOK's KL term is flow_kl_weight x mean((v_theta - v_pre)^2); it equals, per transition, the KL
    of the two Gaussian steps computed another way (mean |mu_theta - mu_pre|^2 / (2 s^2), both means from flow_step's
    deterministic step, the variance written out); and gradient steps on it alone lower it (its sign)."""
    import dpok

    pipe = _perturbed_tiny_sd3()
    embeds, neg = common.encode_prompts(pipe, ["a red image", "a blue image"]), common.encode_prompts(pipe, [""])
    traj = common.sample(pipe, embeds, neg, num_steps=4, guidance=5.0, eta=0.7,
                         generator=[torch.Generator().manual_seed(i) for i in range(2)], decode=False)
    x, t = traj.latents[:, :-1].flatten(0, 1), traj.timesteps.repeat(2)  # 8 transitions, all 4 steps of each
    c = embeds.repeat_interleave(4, dim=0)

    def kl_term():
        v = common.guided_output(pipe, x, t, c, neg, 5.0)
        with torch.no_grad(), common.adapters_disabled(pipe.transformer):
            v_pre = common.guided_output(pipe, x, t, c, neg, 5.0)
        return dpok.kl_to_pretrained(v, v_pre, common.flow_kl_weight(pipe, t, num_steps=4, eta=0.7)), v, v_pre

    kl, v, v_pre = kl_term()
    sigma, sigma_next, sigma_1 = common.flow_step_sigmas(pipe, t, len(t), 4, "cpu")
    zeros = torch.zeros_like(x)
    mu, _, _ = common.flow_step(v.detach(), x, sigma, sigma_next, sigma_1, noise_level=0.7, noise=zeros)
    mu_pre, _, _ = common.flow_step(v_pre, x, sigma, sigma_next, sigma_1, noise_level=0.7, noise=zeros)
    s2 = 0.7**2 * sigma / (1 - torch.where(sigma == 1, sigma_1, sigma)) * (sigma - sigma_next)  # the step's variance
    expected = ((mu - mu_pre) ** 2).mean(dim=(1, 2, 3)) / (2 * s2)
    assert (kl > 0).all()
    # float32: the means' difference loses ~1e-6 of |mu| ~ 1 against |dmu| ~ 1e-2, ~1e-4 relative in the KL
    torch.testing.assert_close(kl.detach(), expected, rtol=1e-3, atol=0)

    params = common.trainable_parameters(pipe.transformer)
    optimizer = torch.optim.Adam(params, lr=1e-3)  # normalised steps: the KL is O(1e-4), its gradient small
    before = kl.mean().item()
    for _ in range(3):
        loss = kl_term()[0].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert kl_term()[0].mean().item() < 0.8 * before  # 0.52 measured after 3 steps


# ----------------------------------------------------------------------------------------------------
# SD 3.x as Flow-GRPO runs it: resolution, the guidance gradient, the evaluation, the trained steps, the noise level
# ----------------------------------------------------------------------------------------------------


def test_the_default_resolution_is_flow_grpos_512_on_sd35_medium_and_the_native_size_on_sd():
    """The latent side from the configs alone (no weights): SD 3.5 Medium (1024 px native) samples at Flow-GRPO's
    512 px, a 64 x 64 latent, unless told otherwise; SD 1.5 and SD 2.1-768 at their native 512 and 768 px; the small
    flow models, whose native size is below 512, at their own. A size that is not a multiple of the VAE's scale
    times the patch size, or beyond the position embeddings, stops in one line."""
    from types import SimpleNamespace

    sd35m = SimpleNamespace(**offline.SD35M_TRANSFORMER)
    assert common.latent_size(sd35m, 8, True) == 64 and common.latent_size(sd35m, 8, True, 1024) == 128
    assert common.latent_size(SimpleNamespace(sample_size=64), 8, False) == 64  # SD 1.5: 512 px
    assert common.latent_size(SimpleNamespace(sample_size=96), 8, False) == 96  # SD 2.1-768: 768 px
    assert common.latent_size(SimpleNamespace(sample_size=96), 8, False, 512) == 64
    tiny = SimpleNamespace(sample_size=8, patch_size=2, pos_embed_max_size=8)  # tiny-sd3: 16 px native
    assert common.latent_size(tiny, 2, True) == 8 and common.latent_size(tiny, 2, True, 32) == 16
    for bad, message in [(520, "a multiple of 16 pixels"), (6160, "reach 6144 pixels at most")]:
        with pytest.raises(SystemExit) as e:
            common.latent_size(sd35m, 8, True, bad)
        assert str(e.value).startswith(f"error: --resolution {bad}: ") and message in str(e.value), str(e.value)
    with torch.device("meta"):  # the model itself, built without memory: the sampler's latent side
        pipe = common.offline_pipeline(common.SD35M_RANDOM)
    assert common.latent_side(pipe) == 64


def test_the_sampler_and_the_evaluation_draw_latents_at_the_resolution(sd3):
    """--resolution reaches the sampler and the fixed-prompt evaluation through load_pipeline: tiny-sd3 at 32 px
    draws 16 x 16 latents and decodes 32 x 32 images; by default its native 8 x 8 (16 px)."""
    embeds, neg = common.encode_flow_prompts(sd3, ["a red circle"] * 2), common.encode_flow_prompts(sd3, [""])
    assert common.sample(sd3, embeds, neg, num_steps=2, guidance=4.5, eta=0.7, decode=False).latents.shape[-1] == 8
    pipe = common.load_pipeline(common.TINY_SD3, lora_rank=4, resolution=32)
    traj = common.sample(pipe, embeds, neg, num_steps=2, guidance=4.5, eta=0.7)
    assert traj.latents.shape[-2:] == (16, 16) and traj.images.shape[-2:] == (32, 32)
    images, _ = common.evaluate(pipe, ["a red circle"], lambda im, p: im.mean(dim=(1, 2, 3)), neg, num_steps=2,
                                guidance=4.5, eta=0.0, seed=0)
    assert images.shape[-2:] == (32, 32)


def _grads(pipe, loss_fn):
    params = common.trainable_parameters(common.denoiser(pipe))
    for p in params:
        p.grad = None
    loss_fn().backward()
    return torch.cat([p.grad.flatten() for p in params])


@pytest.mark.parametrize("model", [common.TINY_SD3, common.TINY])
def test_the_training_gradient_detaches_the_unconditional_velocity_on_sd3_only(model):
    """step_log_prob's gradient on SD 3.x is that of sg(v_u) + w (v_c - sg(v_u)), computed here by hand from two
    separate transformer calls (Flow-GRPO's training step), and not that of v_u + w (v_c - v_u), though the values
    are the same; on SD 1.x it is the latter (ddpo-pytorch's). Tolerance: NETWORK_RTOL, the same gradient in other
    batch shapes (measured: 2e-6 on tiny-sd3, 4e-5 on tiny); the two forms' gradients differ by several times their
    norm (measured: 5.2 on tiny-sd3, whose gradient through both halves is 0.17 times the detached one's, cosine 0.81;
    3.0 on tiny)."""
    flow, w = model == common.TINY_SD3, 5.0
    pipe = common.load_pipeline(model, lora_rank=4)
    with torch.no_grad():
        for i, p in enumerate(common.trainable_parameters(common.denoiser(pipe))):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.05)
    embeds, neg = common.encode_prompts(pipe, ["a red image", "a blue image"]), common.encode_prompts(pipe, [""])
    traj = common.sample(pipe, embeds, neg, num_steps=3, guidance=w, eta=0.7, decode=False,
                         generator=[torch.Generator().manual_seed(i) for i in range(2)])
    x, x_next, t = traj.latents[:, 1], traj.latents[:, 2], traj.timesteps[1]
    kw = dict(num_steps=3, guidance=w, eta=0.7)

    def by_hand(detach: bool):
        def loss():
            if flow:
                v_c, v_u = (common.guided_velocity(pipe.transformer, x, t, e, neg, 1.0)
                            for e in (embeds, neg.expand(2, -1, -1)))
            else:
                v_c, v_u = (common.guided_noise(pipe.unet, x, t, e, neg, 1.0) for e in (embeds, neg.expand(2, -1, -1)))
            v_u = v_u.detach() if detach else v_u
            guided = v_u + w * (v_c - v_u)
            if flow:
                sigma, sigma_next, sigma_1 = common.flow_step_sigmas(pipe, t, 2, 3, "cpu")
                return common.flow_step(guided, x, sigma, sigma_next, sigma_1, noise_level=0.7,
                                        prev_sample=x_next)[1].sum()
            return common.ddim_step(pipe.scheduler, guided, t, x, num_steps=3, eta=0.7, prev_sample=x_next)[1].sum()
        return _grads(pipe, loss)

    ours = _grads(pipe, lambda: common.step_log_prob(pipe, x, x_next, t, embeds, neg, **kw)[0].sum())
    detached, through_both = by_hand(True), by_hand(False)
    assert_close_normwise(ours, detached if flow else through_both)
    assert (detached - through_both).norm() > 0.5 * through_both.norm()  # the two forms do differ here


@pytest.mark.parametrize("script", ["ppo", "dpok", "score_as_action"])
def test_flow_grpos_evaluation_and_trained_steps_are_the_flow_defaults_and_sd_keeps_its_own(script):
    """Unset, SD 3.x evaluates with the deterministic sampler (--eval-eta 0) at the training count and Flow-GRPO's 40
    steps, and trains the first int(0.99 T) steps; SD 1.x evaluates its training sampler (--eval-eta = --eta) at 25
    and 100 steps (--eval-eta unset: the scripts pass --eta) and trains all T in a random order, as before; a value
    given is kept."""
    import importlib

    import tyro

    module = importlib.import_module(script)
    for model, expected in [("tiny", dict(eval_eta=None, eval_num_steps=(25, 100))),
                            ("tiny-sd3", dict(eval_eta=0.0, eval_num_steps=(40,)))]:
        args = tyro.cli(module.Args, args=["--model", model])
        runs.validate_args(args, module.SD_DEFAULTS)
        assert {k: getattr(args, k) for k in expected} == expected, model
        if hasattr(args, "timestep_fraction"):
            assert args.timestep_fraction == (0.99 if model == "tiny-sd3" else 1.0)
        args = tyro.cli(module.Args, args=["--model", model, "--eta", "0.5", "--eval-num-steps", "--eval-eta", "0.3"])
        runs.validate_args(args, module.SD_DEFAULTS)
        assert (args.eval_eta, args.eval_num_steps) == (0.3, ())
        args = tyro.cli(module.Args, args=["--model", model, "--eta", "0.5"])
        runs.validate_args(args, module.SD_DEFAULTS)
        assert args.eval_eta == (0.0 if model == "tiny-sd3" else None)  # None: the scripts evaluate with --eta


def test_the_trained_steps_are_flow_grpos_first_ones_on_sd3_and_ddpos_random_subset_on_sd(sd3):
    """SD 3.x trains the first int(fraction x T) steps of every trajectory in order (Flow-GRPO: with 0.99 of 10
    steps, steps 0-8, never the last); SD 1.x a random subset in a random order per trajectory, the same draw as
    before from the same generator."""
    g = torch.Generator().manual_seed(3)
    assert torch.equal(common.trained_steps(sd3, 5, 10, int(10 * 0.99), g, "cpu"), torch.arange(9).expand(5, -1))
    sd = common.offline_pipeline(common.TINY)
    steps = common.trained_steps(sd, 5, 10, 6, torch.Generator().manual_seed(3), "cpu")
    expected = torch.argsort(torch.rand(5, 10, generator=torch.Generator().manual_seed(3)), dim=1)[:, :6]
    assert torch.equal(steps, expected) and len({tuple(r) for r in steps.tolist()}) > 1


@pytest.mark.parametrize("model,argv,message", [
    ("tiny", ["--eta", "1.5"], "--eta 1.5: must be in (0, 1]"),
    ("tiny", ["--eval-eta", "1.5"], "--eval-eta 1.5: must be in [0, 1] on an SD 1.x/2.x model"),
    ("tiny-sd3", ["--eta", "0"], "--eta 0.0: must be a finite number > 0 on an SD 3.x model"),
    ("tiny-sd3", ["--eta", "inf"], "--eta inf: must be a finite number > 0 on an SD 3.x model"),
    ("tiny-sd3", ["--eval-eta", "-0.1"], "--eval-eta -0.1: must be a finite number >= 0 on an SD 3.x model"),
    ("tiny-sd3", ["--resolution", "100"], "--resolution 100: must be a positive multiple of 8"),
    ("tiny", ["--resolution", "0"], "--resolution 0: must be a positive multiple of 8"),
])
def test_each_family_has_its_own_noise_level_rule_and_a_bad_resolution_stops_before_loading(model, argv, message):
    """DDIM's eta is refused above 1 (its variance exceeds DDPM's) on SD 1.x; Flow-GRPO's noise level is any finite
    a > 0 on SD 3.x, and 0 only for the evaluation; each in one line, before any weights load."""
    import tyro

    import loop

    args = tyro.cli(loop.Args, args=["--model", model, *argv])
    with pytest.raises(SystemExit) as e:
        runs.validate_args(args, loop.SD_DEFAULTS)
    assert str(e.value).startswith(f"error: {message}") and "\n" not in str(e.value), str(e.value)
    args = tyro.cli(loop.Args, args=["--model", "tiny-sd3", "--eta", "1.5"])  # above DDIM's 1: finite, allowed
    runs.validate_args(args, loop.SD_DEFAULTS)
    assert args.eta == 1.5


def test_t5_is_given_flow_grpos_128_tokens():
    """With a T5 encoder the T5 slot holds 128 tokens (Flow-GRPO's max_sequence_length), without one as many zero
    rows as the CLIP tokens."""
    from types import SimpleNamespace

    assert common.t5_tokens(SimpleNamespace(text_encoder_3=torch.nn.Identity(), tokenizer_max_length=77)) == 128
    assert common.t5_tokens(SimpleNamespace(text_encoder_3=None, tokenizer_max_length=77)) == 77
