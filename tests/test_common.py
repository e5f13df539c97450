"""The shared substrate: sampler, DDIM step and log-prob, loading, LoRA, tokenizer, rewards, prompts, checkpoints."""

import math

import pytest
import torch
from conftest import perturb_lora
from helpers import NETWORK_RTOL, assert_close_normwise

import common
import runs


def test_sampler_equals_diffusers_pipeline_at_eta_0(tiny, embeds):
    from diffusers import StableDiffusionPipeline

    _, emb, neg = embeds
    x_T = torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    ours = common.sample(tiny, emb, neg, num_steps=6, guidance=5.0, eta=0.0, latents=x_T, decode=False)
    pipe = StableDiffusionPipeline(**tiny.components)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        theirs = pipe(prompt_embeds=emb, negative_prompt_embeds=neg.expand(3, -1, -1), latents=x_T,
                      num_inference_steps=6,
                      guidance_scale=5.0, eta=0.0, output_type="latent").images
    assert ours.latents.shape == (3, 7, 4, 8, 8) and ours.log_probs.shape == (3, 6)
    assert torch.equal(ours.timesteps, pipe.scheduler.timesteps.to(ours.timesteps.device))
    torch.testing.assert_close(ours.latents[:, -1], theirs, rtol=1e-5, atol=1e-5)


def test_ddim_step_eta_1_equals_scheduler_step(tiny, embeds):
    _, emb, neg = embeds
    sched = common.ddim_scheduler(tiny.scheduler.config)
    sched.set_timesteps(10)
    x = torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(2))
    z = torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    for t in (sched.timesteps[0], sched.timesteps[5], sched.timesteps[-1]):  # incl. the final_alpha_cumprod step
        with torch.no_grad():
            eps = common.guided_noise(tiny.unet, x, t, emb, neg, 5.0)
        ours, log_prob, x0 = common.ddim_step(tiny.scheduler, eps, t, x, num_steps=10, eta=1.0, noise=z)
        ref = sched.step(eps, t, x, eta=1.0, variance_noise=z)
        torch.testing.assert_close(ours, ref.prev_sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x0, ref.pred_original_sample, rtol=1e-5, atol=1e-5)


def test_ddim_step_v_prediction_equals_scheduler_step(tiny, embeds):
    """A v-prediction model (SD 2.x at 768 px): x0_hat, eps_hat and the step as diffusers' DDIMScheduler computes
    them, and the log-probability of the drawn step is that of its own noise z under N(mu, sigma^2)."""
    config = dict(tiny.scheduler.config, prediction_type="v_prediction")
    ours_sched, ref = common.ddim_scheduler(config), common.ddim_scheduler(config)
    ref.set_timesteps(10)
    g = torch.Generator().manual_seed(11)
    x, v, z = (torch.randn((3, 4, 8, 8), generator=g) for _ in range(3))
    for t in (ref.timesteps[0], ref.timesteps[5], ref.timesteps[-1]):  # incl. the final_alpha_cumprod step
        ours, log_prob, x0 = common.ddim_step(ours_sched, v, t, x, num_steps=10, eta=1.0, noise=z)
        out = ref.step(v, t, x, eta=1.0, variance_noise=z)
        torch.testing.assert_close(x0, out.pred_original_sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours, out.prev_sample, rtol=1e-5, atol=1e-5)
        a_t = ref.alphas_cumprod[t]
        torch.testing.assert_close(common.predicted_eps(ours_sched, v, t, x), a_t.sqrt() * v + (1 - a_t).sqrt() * x)
        prev_t = t - 100
        a_prev = ref.alphas_cumprod[prev_t] if prev_t >= 0 else ref.final_alpha_cumprod
        sigma = torch.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        expected = (-z**2 / 2 - torch.log(sigma) - 0.5 * math.log(2 * math.pi)).mean(dim=(1, 2, 3))
        torch.testing.assert_close(log_prob, expected, rtol=1e-4, atol=1e-4)
    # the training path hands methods eps_hat, not v_hat (DPOK's KL term and Score as Action's score use it)
    from types import SimpleNamespace

    _, emb, neg = embeds
    v_pipe = SimpleNamespace(unet=tiny.unet, scheduler=ours_sched)
    t = ref.timesteps[3]
    with torch.no_grad():
        v_hat = common.guided_noise(tiny.unet, x, t, emb, neg, 5.0)
        _, eps = common.step_log_prob(v_pipe, x, z, t, emb, neg, num_steps=10, guidance=5.0, eta=1.0)
    a_t = ref.alphas_cumprod[t]
    torch.testing.assert_close(eps, a_t.sqrt() * v_hat + (1 - a_t).sqrt() * x)
    torch.testing.assert_close(common.guided_eps(v_pipe, x, t, emb, neg, 5.0), eps)
    with pytest.raises(SystemExit) as e:  # any other parametrisation is refused, not silently treated as eps
        common.ddim_step(common.ddim_scheduler(dict(config, prediction_type="sample")), v, 1, x, num_steps=10, eta=1.0,
                         noise=z)
    assert str(e.value).startswith("error: ") and "sample" in str(e.value)


def test_loading_a_folder_full_unet_float32_and_prediction_types(tmp_path):
    """A local model folder: with --lora-rank 0 under bf16 the trained UNet holds the saved float32 weights exactly
    (not bf16-rounded) while the frozen VAE is bf16; a v-prediction model loads; an x0-prediction one is refused."""
    import json

    base = common.offline_pipeline("tiny")
    base.save_pretrained(tmp_path / "eps")
    pipe = common.load_pipeline(str(tmp_path / "eps"), mixed_precision="bf16", lora_rank=0)
    assert pipe.vae.dtype == torch.bfloat16 and pipe.unet.dtype == torch.float32
    saved = base.unet.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in pipe.unet.state_dict().items())
    with_lora = common.load_pipeline(str(tmp_path / "eps"), mixed_precision="bf16", lora_rank=4)
    assert with_lora.unet.conv_in.weight.dtype == torch.bfloat16  # frozen: cast to the mixed-precision dtype
    config_file = tmp_path / "eps" / "scheduler" / "scheduler_config.json"
    for kind in ("v_prediction", "sample"):
        config_file.write_text(json.dumps(dict(json.loads(config_file.read_text()), prediction_type=kind)))
        if kind == "v_prediction":
            assert common.load_pipeline(str(tmp_path / "eps"), lora_rank=0).scheduler.config.prediction_type == kind
        else:
            with pytest.raises(SystemExit) as e:
                common.load_pipeline(str(tmp_path / "eps"), lora_rank=0)
            assert str(e.value).startswith("error: ") and "'sample'" in str(e.value) and "\n" not in str(e.value)


def test_log_prob_is_mean_gaussian_log_density(tiny):
    g = torch.Generator().manual_seed(4)
    x, eps, z = (torch.randn((2, 4, 8, 8), generator=g) for _ in range(3))
    for t, eta in ((981, 1.0), (1, 1.0), (501, 0.5)):
        prev, log_prob, x0 = common.ddim_step(tiny.scheduler, eps, t, x, num_steps=50, eta=eta, noise=z)
        ac = tiny.scheduler.alphas_cumprod
        a_t, a_prev = ac[t], (ac[t - 20] if t - 20 >= 0 else tiny.scheduler.final_alpha_cumprod)
        sigma = eta * torch.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        mu = a_prev.sqrt() * x0 + torch.sqrt(1 - a_prev - sigma**2) * eps
        expected = torch.distributions.Normal(mu, sigma).log_prob(prev).mean(dim=(1, 2, 3))
        torch.testing.assert_close(log_prob, expected, rtol=1e-5, atol=1e-5)
        assert sigma > 0  # set_alpha_to_one=False keeps the last step stochastic


def test_on_policy_ratio_is_exactly_one(tiny, embeds):
    """Re-evaluating stored transitions with unchanged weights reproduces the sampled log-probs.

    Evaluated in a different batch layout than sampling (each sample at its own shuffled timestep, as
    training does). Holds to 1e-5 in float32 on CPU; the ratio exp(new - old) is then 1 within 1e-5.
    """
    _, emb, neg = embeds
    perturb_lora(tiny.unet)
    try:
        traj = common.sample(tiny, emb, neg, num_steps=5, guidance=5.0, eta=1.0,
                             generator=torch.Generator().manual_seed(5))
        perm = torch.stack([torch.randperm(5, generator=torch.Generator().manual_seed(i)) for i in range(3)])
        rows = torch.arange(3)[:, None]
        lat, nxt = traj.latents[:, :-1][rows, perm], traj.latents[:, 1:][rows, perm]
        ts, old = traj.timesteps[perm], traj.log_probs[rows, perm]
        with torch.no_grad():
            new = torch.stack([common.step_log_prob(tiny, lat[:, j], nxt[:, j], ts[:, j], emb, neg, num_steps=5,
                                                    guidance=5.0,
                                                    eta=1.0)[0] for j in range(5)], dim=1)
        assert (new - old).abs().max() < 1e-5
        assert (torch.exp(new - old) - 1).abs().max() < 1e-5
    finally:
        perturb_lora(tiny.unet, scale=0.0)


def test_sampling_is_reproducible_and_split_invariant(tiny, embeds):
    _, emb, neg = embeds
    kw = dict(num_steps=3, guidance=5.0, eta=1.0)
    whole = common.sample(tiny, emb, neg, generator=common.sample_generators(7, 2, range(3), "cpu"), **kw)
    first = common.sample(tiny, emb[:1], neg, generator=common.sample_generators(7, 2, [0], "cpu"), **kw)
    rest = common.sample(tiny, emb[1:], neg, generator=common.sample_generators(7, 2, [1, 2], "cpu"), **kw)
    # equal up to float32 kernel differences between batch sizes: each of the 3 steps evaluates the UNet to
    # NETWORK_RTOL (tests/helpers.py) and the DDIM update's coefficients are at most 1, so the errors add up
    assert_close_normwise(torch.cat([first.latents, rest.latents]), whole.latents, rtol=3 * NETWORK_RTOL)
    again = common.sample(tiny, emb, neg, generator=common.sample_generators(7, 2, range(3), "cpu"), **kw)
    assert torch.equal(again.latents, whole.latents) and torch.equal(again.images, whole.images)
    other = common.sample(tiny, emb, neg, generator=common.sample_generators(7, 3, range(3), "cpu"), **kw)
    assert not torch.equal(other.latents, whole.latents)


def test_tiny_model_is_deterministic_and_save_load_round_trips(tmp_path):
    from diffusers import StableDiffusionPipeline

    a = common.offline_pipeline("tiny", seed=0)
    b = common.offline_pipeline("tiny", seed=0)
    c = common.offline_pipeline("tiny", seed=4)
    sa, sb = a.unet.state_dict(), b.unet.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], v) for k, v in c.unet.state_dict().items())
    a.save_pretrained(tmp_path / "tiny")
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "tiny", local_files_only=True)
    for name in ("unet", "vae", "text_encoder"):
        sd, ld = getattr(a, name).state_dict(), getattr(loaded, name).state_dict()
        assert sd.keys() == ld.keys() and all(torch.equal(sd[k], ld[k]) for k in sd), name
    assert loaded.tokenizer("a red cat").input_ids == a.tokenizer("a red cat").input_ids
    # our loader takes the folder too, and gives the same samples as the in-memory tiny model
    p1 = common.load_pipeline(str(tmp_path / "tiny"), lora_rank=0)
    p2 = common.load_pipeline("tiny", lora_rank=0, seed=3)  # the tiny weights do not depend on the run seed
    e1, e2 = common.encode_prompts(p1, ["a cat"]), common.encode_prompts(p2, ["a cat"])
    n1, n2 = common.encode_prompts(p1, [""]), common.encode_prompts(p2, [""])
    t1 = common.sample(p1, e1, n1, num_steps=3, guidance=5.0, eta=1.0, generator=torch.Generator().manual_seed(0))
    t2 = common.sample(p2, e2, n2, num_steps=3, guidance=5.0, eta=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t1.images, t2.images)


def test_missing_model_fails_in_one_line(tmp_path):
    with pytest.raises(SystemExit) as e:
        common.load_pipeline(str(tmp_path / "no-such-model"))
    msg = str(e.value)
    assert "\n" not in msg and "no-such-model" in msg and "--model tiny" in msg


def test_disabled_adapters_give_the_base_model_exactly(embeds):
    _, emb, neg = embeds
    base = common.load_pipeline("tiny", lora_rank=0, seed=0)
    lora = common.load_pipeline("tiny", lora_rank=4, seed=0)
    x = torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = common.guided_noise(base.unet, x, 501, emb, neg, 5.0)
        assert torch.equal(common.guided_noise(lora.unet, x, 501, emb, neg, 5.0), ref)  # B = 0 at init
        perturb_lora(lora.unet)
        assert not torch.allclose(common.guided_noise(lora.unet, x, 501, emb, neg, 5.0), ref)
        with common.adapters_disabled(lora.unet):
            assert torch.equal(common.guided_noise(lora.unet, x, 501, emb, neg, 5.0), ref)
        assert not torch.allclose(common.guided_noise(lora.unet, x, 501, emb, neg, 5.0), ref)  # re-enabled


def test_channels_last_is_the_same_model_in_another_memory_layout(tiny, embeds):
    _, emb, neg = embeds
    fast = common.load_pipeline("tiny", lora_rank=4, seed=0, channels_last=True)
    conv = fast.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    x = torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = common.guided_noise(tiny.unet, x, 501, emb, neg, 5.0)
        assert torch.allclose(common.guided_noise(fast.unet, x, 501, emb, neg, 5.0), ref, atol=1e-5, rtol=1e-4)


def test_saved_lora_loads_in_diffusers_and_reproduces_outputs(tmp_path, embeds):
    _, emb, neg = embeds
    ours = common.load_pipeline("tiny", lora_rank=4, lora_alpha=8, seed=0)
    perturb_lora(ours.unet, seed=1)
    runs.save_checkpoint(tmp_path / "ckpt", ours.unet, {"epoch": 3})
    fresh = common.offline_pipeline("tiny", seed=0)
    fresh.load_lora_weights(str(tmp_path / "ckpt"))
    x = torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(common.guided_noise(fresh.unet, x, 301, emb, neg, 5.0),
                                   common.guided_noise(ours.unet, x, 301, emb, neg, 5.0), rtol=1e-5, atol=1e-6)
    # and our own loader restores the weights bit-identically into a fresh model
    back = common.load_pipeline("tiny", lora_rank=4, lora_alpha=8, seed=0)
    perturb_lora(back.unet, seed=2)
    state = runs.load_checkpoint(tmp_path / "ckpt", back.unet)
    assert state == {"epoch": 3}
    for (n1, p1), (n2, p2) in zip(ours.unet.named_parameters(), back.unet.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_full_unet_checkpoint_round_trips(tmp_path):
    a = common.load_pipeline("tiny", lora_rank=0, seed=0)
    with torch.no_grad():
        next(a.unet.parameters()).add_(1.0)
    runs.save_checkpoint(tmp_path / "ckpt", a.unet, {"epoch": 1})
    b = common.load_pipeline("tiny", lora_rank=0, seed=0)
    runs.load_checkpoint(tmp_path / "ckpt", b.unet)
    assert all(torch.equal(x, y) for x, y in zip(a.unet.parameters(), b.unet.parameters()))


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, tiny, monkeypatch):
    runs.save_checkpoint(tmp_path / "ckpt", tiny.unet, {"epoch": 1})

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(SystemExit, match="could not write checkpoint .* disk full"):
        runs.save_checkpoint(tmp_path / "ckpt", tiny.unet, {"epoch": 2})
    monkeypatch.undo()
    assert runs.load_checkpoint(tmp_path / "ckpt", tiny.unet) == {"epoch": 1}
    assert runs.find_checkpoint(tmp_path / "ckpt") == (tmp_path / "ckpt", {"epoch": 1})


def test_damaged_checkpoint_fails_in_one_line(tmp_path, tiny):
    runs.save_checkpoint(tmp_path / "ckpt", tiny.unet, {"epoch": 1})
    path = tmp_path / "ckpt" / runs.LORA_FILE
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(SystemExit) as e:
        runs.load_checkpoint(tmp_path / "ckpt", tiny.unet)
    assert "\n" not in str(e.value) and "cannot resume" in str(e.value)
    with pytest.raises(SystemExit):
        runs.find_checkpoint(tmp_path / "nothing-here")


def test_offline_tokenizer_matches_open_clip(tiny):
    import open_clip

    reference = open_clip.get_tokenizer("ViT-L-14")
    for text in ["a photo of a cat", "Hello, World! 123", "a red image", "an astronaut riding a horse on mars",
                 "don't panic: it's 3.14"]:
        ours = tiny.tokenizer(text).input_ids
        theirs = reference([text])[0].tolist()
        assert ours == theirs[: len(ours)] and set(theirs[len(ours):]) == {0}, text
    assert tiny.tokenizer.model_max_length == 77


def test_prompt_sets_and_files(tmp_path):
    assert {"simple_animals", "animals_activities", "dpok_single", "colors"} <= set(common.prompt_sets())
    for name in common.prompt_sets():
        prompts = common.load_prompts(name)
        assert prompts and all(isinstance(p, str) and p == p.strip() for p in prompts)
    assert len(common.load_prompts("simple_animals")) == 45 and common.load_prompts("colors")[0] == "a red image"
    f = tmp_path / "prompts.txt"
    f.write_text("a cat\n\n  a dog  \n")
    assert common.load_prompts("colors", str(f)) == ["a cat", "a dog"]
    for bad, text in ((tmp_path / "missing.txt", None), (tmp_path / "empty.txt", " \n\n"),
                      (tmp_path / "bin.txt", b"\xff\xfe\x00")):
        if isinstance(text, str):
            bad.write_text(text)
        elif text is not None:
            bad.write_bytes(text)
        with pytest.raises(SystemExit) as e:
            common.load_prompts("colors", str(bad))
        assert "\n" not in str(e.value) and "prompt file" in str(e.value)
    with pytest.raises(SystemExit):
        common.load_prompts("no_such_set")


def test_image_grid_layout():
    images = torch.rand((5, 3, 32, 32))
    grid = runs.image_grid(images, [f"r={i}" for i in range(5)], ncols=3, size=64)
    assert grid.size == (3 * 64, 2 * (64 + 14))


def test_auto_precision_is_the_references_fp16_on_gpu():
    """docs/performance.md: on an H200, bf16 moved the on-policy ratio 9x further than fp16 before any update (3.8e-5
    against 4.2e-6, clip/10 = 1e-5), so `auto` is fp16 on a GPU; float32 on CPU; an explicit choice is kept."""
    assert common.resolve_precision("auto", "cuda") == "fp16"
    assert common.resolve_precision("auto", "cpu") == "no"
    assert common.resolve_precision("bf16", "cuda") == "bf16"
