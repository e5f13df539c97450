"""The shapes world: renderer, prompt sets, the compositional reward on rendered ground truth, the pretrained model."""

import numpy as np
import pytest
import torch

import common
import world
from world import Obj


def rendered(seed: int, n: int, p_two: float = 0.5):
    images, captions = world.render(np.random.default_rng(seed), n, p_two)
    return torch.from_numpy(images), captions


def swapped(prompt: str) -> str:
    """'a blue square and a yellow triangle' -> 'a blue triangle and a yellow square' (colours swapped between shapes)."""
    a, b = world.parse(prompt)
    return world.caption([Obj(a.color, b.shape), Obj(b.color, a.shape)])


def test_render_is_deterministic_and_captions_name_what_is_drawn():
    a, caps_a = rendered(0, 16)
    b, caps_b = rendered(0, 16)
    assert torch.equal(a, b) and caps_a == caps_b
    assert a.shape == (16, 3, 32, 32) and a.dtype == torch.float32 and 0 <= a.min() and a.max() <= 1
    assert not torch.equal(a, rendered(1, 16)[0])
    for image, cap in zip(a, caps_a):
        named = sorted(o.color for o in world.parse(cap))
        assert sorted(r.color for r in world.regions(image)) == named, cap


def test_prompt_sets_split_the_pairs_into_disjoint_train_and_eval():
    train, evaluation = common.load_prompts("shapes"), common.load_prompts("shapes_eval")
    assert (train, evaluation) == (world.PAIRS_TRAIN, world.PAIRS_EVAL)  # the files in prompts/ are the world's split
    assert len(train) == 60 and len(evaluation) == 30 and not set(train) & set(evaluation)
    as_sets = lambda prompts: {frozenset(world.parse(p)) for p in prompts}  # noqa: E731 - order-free comparison
    assert not as_sets(train) & as_sets(evaluation) and len(as_sets(train) | as_sets(evaluation)) == 90
    for prompts in (train, evaluation):  # every colour and every shape appears in both sets
        objs = [o for p in prompts for o in world.parse(p)]
        assert {o.color for o in objs} == set(world.COLORS) and {o.shape for o in objs} == set(world.SHAPES)
    assert common.load_eval_prompts("shapes") == (evaluation * 2)[: common.EVAL_IMAGES]
    assert common.load_eval_prompts("colors") == (common.load_prompts("colors") * 8)[: common.EVAL_IMAGES]


def test_parse_reads_noun_phrases():
    assert world.parse("a blue square and a yellow triangle") == [Obj("blue", "square"), Obj("yellow", "triangle")]
    assert world.parse("A Red Circle") == [Obj("red", "circle")]
    assert world.parse("a cat") == []


def test_connected_components_count_regions():
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0, 0:2, 0:2] = masks[0, 5:8, 5:8] = True  # two blocks
    masks[1, 0, 0] = masks[1, 1, 1] = masks[1, 2, 2] = True  # a diagonal line: one region with 8-connectivity
    labels = world._components(masks)
    assert labels[0].unique().numel() == 3 and labels[1].unique().numel() == 2
    assert (labels[0, 0:2, 0:2] == labels[0, 0, 0]).all() and labels[0, 0, 0] != labels[0, 6, 6]


def test_reward_is_near_one_on_ground_truth_and_low_when_colours_swap():
    """The accuracy figures quoted in docs/world.md (400 rendered images, half with two objects)."""
    images, captions = rendered(7, 400)
    two = torch.tensor([" and " in c for c in captions])
    r = world.reward(images, captions)
    assert r.shape == (400,) and r.dtype == torch.float32
    assert r[~two].mean() > 0.97 and r[two].mean() > 0.97
    assert world.judge(images, captions).float().mean() > 0.98
    r_swap = world.reward(images[two], [swapped(c) for c in np.array(captions)[two.numpy()]])
    assert r_swap.mean() < 0.35 and r_swap.max() < 0.6
    assert not world.judge(images[two], [swapped(c) for c in np.array(captions)[two.numpy()]]).any()


def test_reward_gives_partial_credit_and_penalises_extra_objects():
    def one(*scene):
        return torch.from_numpy(world.draw([list(scene)]))

    blue_square, yellow_triangle = Obj("blue", "square"), Obj("yellow", "triangle")
    prompt = ["a blue square and a yellow triangle"]
    both = world.reward(one((blue_square, 9, 9, 12), (yellow_triangle, 23, 22, 12)), prompt).item()
    only_square = world.reward(one((blue_square, 9, 9, 12)), prompt).item()
    wrong_shape = world.reward(one((blue_square, 9, 9, 12), (Obj("yellow", "circle"), 23, 22, 12)), prompt).item()
    extra = world.reward(one((blue_square, 8, 8, 10), (yellow_triangle, 23, 22, 10), (Obj("red", "circle"), 8, 24, 10)), prompt).item()
    nothing = world.reward(torch.full((1, 3, 32, 32), 0.5), prompt).item()
    assert both > 0.95 and nothing == 0.0
    assert only_square == pytest.approx(both / 2, abs=0.02)  # one of two objects: half the credit
    assert 0.5 < wrong_shape < 0.7  # right colours, one wrong shape: that object earns the colour credit only
    assert extra == pytest.approx(both / (1 + world.EXTRA_PENALTY), abs=0.02)


def test_reward_is_batched_and_on_the_images_device():
    images, captions = rendered(3, 8)
    whole = world.reward(images, captions)
    singles = torch.cat([world.reward(images[i : i + 1], captions[i : i + 1]) for i in range(8)])
    assert torch.equal(whole, singles)
    assert common.make_reward("shapes", "cpu")(images, captions).device == images.device


def test_the_committed_vae_keeps_what_the_reward_reads():
    """Rendered images through the committed model's VAE (encode, decode) keep their reward: measured 0.996 for
    single objects and 0.922 / 90.7% judged right for two (docs/world.md); the bounds catch a worse VAE."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(world.MODEL_DIR, subfolder="vae").eval()
    images, captions = rendered(99, 400)
    with torch.no_grad():
        decoded = (vae.decode(vae.encode(images * 2 - 1).latent_dist.mode()).sample / 2 + 0.5).clamp(0, 1)
    two = torch.tensor([" and " in c for c in captions])
    r, right = world.reward(decoded, captions), world.judge(decoded, captions).float()
    assert r[~two].mean() > 0.97 and right[~two].mean() > 0.97
    assert r[two].mean() > 0.88 and right[two].mean() > 0.8


def test_reward_refuses_prompts_without_objects():
    with pytest.raises(SystemExit, match="names none"):
        world.reward(torch.zeros(1, 3, 32, 32), ["a cat"])


def test_pretraining_learning_rate_warms_up_holds_then_decays_to_a_tenth():
    from world.pretrain import Args, unet_lr

    args = Args(unet_steps=3000, unet_lr=2e-3, unet_decay=0.3)
    lrs = [unet_lr(step, args) for step in range(args.unet_steps)]
    assert lrs[0] == 2e-3 / 200 and lrs[199] == lrs[2099] == 2e-3  # warm-up, then constant until 70% of the steps
    assert all(a >= b for a, b in zip(lrs[2100:], lrs[2101:])) and abs(lrs[-1] - 2e-4) < 1e-7  # cosine down to 10%
    assert abs(lrs[2550] - 1.1e-3) < 1e-6  # halfway down the cosine: the mean of the two ends
    assert {unet_lr(s, Args(unet_steps=3000, unet_decay=0.0)) for s in range(200, 3000)} == {Args().unet_lr}


@pytest.mark.parametrize("flags, words", [
    (["--unet-decay", "1.5"], "--unet-decay"), (["--ema", "1"], "--ema"), (["--unet-lr", "nan"], "--unet-lr"),
    (["--vae-steps", "0"], "--vae-steps"), (["--device", "tpu0"], "--device"),
    (["--resume-vae", "/nonexistent"], "--resume-vae")])
def test_pretraining_refuses_bad_flags_in_one_line(flags, words):
    import subprocess
    import sys

    from helpers import OFFLINE, ROOT

    proc = subprocess.run([sys.executable, "-m", "world.pretrain", "--out", "/nonexistent/out", *flags], cwd=ROOT,
                          env=OFFLINE, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and words in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_pretraining_script_writes_a_diffusers_folder_every_script_loads(tmp_path):
    """A few steps of each stage of `python -m world.pretrain` (the real run takes ~30 minutes): the folder it
    writes loads in diffusers and through `--model PATH`, with the VAE's scaling factor fitted to its latents."""
    import subprocess
    import sys

    from diffusers import StableDiffusionPipeline
    from helpers import OFFLINE, ROOT

    proc = subprocess.run([sys.executable, "-m", "world.pretrain", "--out", str(tmp_path / "m"), "--threads", "1",
                           "--vae-steps", "4", "--decoder-steps", "2", "--vae-batch", "8", "--unet-steps", "4",
                           "--unet-batch", "8", "--num-latents", "600", "--eval-every", "2", "--eval-images", "2",
                           "--eval-steps", "2"], cwd=ROOT, env=OFFLINE, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "m")
    assert pipe.vae.config.scaling_factor != 0.18215 and pipe.unet.config.sample_size == 8
    assert (tmp_path / "m" / "snapshots" / "unet_00002").exists() and (tmp_path / "m" / "pretrain_log.json").exists()
    loaded = common.load_pipeline(str(tmp_path / "m"), lora_rank=4)
    assert loaded.scheduler.config.clip_sample is False and loaded.scheduler.config.set_alpha_to_one is False
