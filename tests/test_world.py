"""The shapes world: renderer, prompt sets, the compositional reward on rendered ground truth, the pretrained model."""

import numpy as np
import pytest
import torch
from helpers import as_a_process

import common
import rewards
import world
from world import Obj


def rendered(seed: int, n: int, p_two: float = 0.5):
    images, captions = world.render(np.random.default_rng(seed), n, p_two)
    return torch.from_numpy(images), captions


def swapped(prompt: str) -> str:
    """'a blue square and a yellow triangle' -> 'a blue triangle and a yellow square' (colours swapped between
    shapes)."""
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
    assert r_swap.mean() < 0.1 and r_swap.max() < 0.2  # each object only the colour credit: 0.25^2 = 0.0625
    assert not world.judge(images[two], [swapped(c) for c in np.array(captions)[two.numpy()]]).any()


def one(*scene):
    """One rendered image of (Obj, cx, cy, side) objects: (1, 3, 32, 32)."""
    return torch.from_numpy(world.draw([list(scene)]))


BLUE_SQUARE, YELLOW_TRIANGLE = Obj("blue", "square"), Obj("yellow", "triangle")
PROMPT = ["a blue square and a yellow triangle"]


def test_reward_is_the_product_of_the_objects_credits_and_penalises_extra_objects():
    """T2I-CompBench's product: every named object must be there, in its colour, for any reward."""
    both = world.reward(one((BLUE_SQUARE, 9, 9, 12), (YELLOW_TRIANGLE, 23, 22, 12)), PROMPT).item()
    only_square = world.reward(one((BLUE_SQUARE, 9, 9, 12)), PROMPT).item()
    wrong_shape = world.reward(one((BLUE_SQUARE, 9, 9, 12), (Obj("yellow", "circle"), 23, 22, 12)), PROMPT).item()
    one_colour = world.reward(one((BLUE_SQUARE, 9, 9, 12), (Obj("blue", "triangle"), 23, 22, 12)), PROMPT).item()
    swap = world.reward(one((Obj("blue", "triangle"), 9, 9, 12), (Obj("yellow", "square"), 23, 22, 12)), PROMPT).item()
    extra = world.reward(one((BLUE_SQUARE, 8, 8, 10), (YELLOW_TRIANGLE, 23, 22, 10), (Obj("red", "circle"), 8, 24, 10)),
                         PROMPT).item()
    nothing = world.reward(torch.full((1, 3, 32, 32), 0.5), PROMPT).item()
    assert both > 0.95 and nothing == 0.0
    assert only_square == 0.0 and one_colour == 0.0  # a named colour missing: nothing, however right the rest
    assert wrong_shape == pytest.approx(world.COLOR_CREDIT * both, abs=0.02)  # that object's colour credit only
    assert swap == pytest.approx(world.COLOR_CREDIT**2, abs=0.02) and swap < both / 10
    assert extra == pytest.approx(both / (1 + world.EXTRA_PENALTY), abs=0.02)
    judged = world.judge(torch.cat([one((BLUE_SQUARE, 9, 9, 12), (YELLOW_TRIANGLE, 23, 22, 12)),
                                    one((BLUE_SQUARE, 9, 9, 12), (Obj("blue", "triangle"), 23, 22, 12))]), PROMPT * 2)
    assert judged.tolist() == [True, False]


def test_a_bar_is_no_square_circle_or_triangle():
    """Every named shape is equal-sided: a 4 x 20 bar of the right colour is 'none', for the reward and the judge,
    while the same colour as a 12 px square is a confident square."""
    def bar(image, y0, x0, h, w, color):
        image[0, :, y0 : y0 + h, x0 : x0 + w] = torch.tensor(world.COLORS[color]).view(3, 1, 1)
        return image

    prompt = ["a blue square"]
    square = bar(torch.full((1, 3, 32, 32), 0.5), 10, 10, 12, 12, "blue")
    flat = bar(torch.full((1, 3, 32, 32), 0.5), 14, 6, 4, 20, "blue")
    tall = bar(torch.full((1, 3, 32, 32), 0.5), 6, 14, 20, 4, "blue")
    assert world.reward(square, prompt).item() > 0.95 and world.judge(square, prompt).item()
    for image in (flat, tall):
        (region,) = world.regions(image[0])
        assert max(region.shape_probs, key=region.shape_probs.get) == "none"
        assert world.reward(image, prompt).item() < world.COLOR_CREDIT + 0.05 and not world.judge(image, prompt).item()
        for prompt_shape in world.SHAPES:
            assert region.shape_probs[prompt_shape] < 0.05


def test_an_off_palette_object_counts_as_an_extra_object():
    """A region of non-background pixels far from every palette colour (an orange blob) is an extra object, while
    the anti-aliased edges of palette objects (mixes of a colour with the grey background) are not."""
    clean = one((BLUE_SQUARE, 9, 9, 12), (YELLOW_TRIANGLE, 23, 22, 12))
    blob = clean.clone()
    blob[0, :, 22:28, 3:9] = torch.tensor([1.0, 0.5, 0.0]).view(3, 1, 1)  # orange, 36 px
    assert [r.color for r in world.regions(clean[0])].count(world.OTHER) == 0
    assert [r.color for r in world.regions(blob[0])].count(world.OTHER) == 1
    both = world.reward(clean, PROMPT).item()
    assert world.reward(blob, PROMPT).item() == pytest.approx(both / (1 + world.EXTRA_PENALTY), abs=1e-6)
    assert world.judge(clean, PROMPT).item() and not world.judge(blob, PROMPT).item()
    images, captions = rendered(5, 200)  # no rendered image has an off-palette region: edges are blends
    assert not any(r.color == world.OTHER for found in world.analyse(images) for r in found)


def test_reward_is_batched_and_on_the_images_device():
    images, captions = rendered(3, 8)
    whole = world.reward(images, captions)
    singles = torch.cat([world.reward(images[i : i + 1], captions[i : i + 1]) for i in range(8)])
    assert torch.equal(whole, singles)
    assert rewards.make("shapes", "cpu")(images, captions).device == images.device


def test_the_committed_vae_keeps_what_the_reward_reads():
    """Rendered images through the committed model's VAE (encode, decode) keep their reward: measured 0.996 for
    single objects and 0.849 / 90.7% judged right for two (docs/world.md); the bounds catch a worse VAE (the
    300-step decoder: 77% judged right)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(world.MODEL_DIR, subfolder="vae").eval()
    images, captions = rendered(99, 400)
    with torch.no_grad():
        decoded = (vae.decode(vae.encode(images * 2 - 1).latent_dist.mode()).sample / 2 + 0.5).clamp(0, 1)
    two = torch.tensor([" and " in c for c in captions])
    r, right = world.reward(decoded, captions), world.judge(decoded, captions).float()
    assert r[~two].mean() > 0.97 and right[~two].mean() > 0.97
    assert r[two].mean() > 0.78 and right[two].mean() > 0.84
    assert not any(r.color == world.OTHER for found in world.analyse(decoded) for r in found)


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
    (["--resume-vae", "/nonexistent"], "--resume-vae"),
    (["--resume-vae", "{empty}"], "no complete vae/ folder there"),  # a folder with an empty vae/
    (["--eval-steps", "5000"], "--eval-steps 5000: must be at most 1000"),
    (["--out", str(world.MODEL_DIR)], "already holds files (the committed model); add --overwrite"),
    (["--out", str(world.MODEL_DIR / "model_index.json")], "is a file"),
    *([] if torch.cuda.is_available() else [(["--device", "cuda"], "no CUDA GPU")])])
def test_pretraining_refuses_bad_flags_in_one_line(flags, words, tmp_path):
    import subprocess
    import sys

    from helpers import OFFLINE, ROOT

    (tmp_path / "vae").mkdir()
    flags = [flag.format(empty=tmp_path) for flag in flags]
    proc = subprocess.run([sys.executable, "-m", "world.pretrain", "--out", "/nonexistent/out", *flags], cwd=ROOT,
                          env=OFFLINE, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and words in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


TINY_PRETRAIN = dict(threads=1, vae_steps=4, decoder_steps=2, vae_batch=8, unet_steps=4, unet_batch=8, num_latents=600,
                     eval_images=2, eval_steps=2)


def test_a_stopped_pretraining_run_leaves_its_output_as_it_was(tmp_path, monkeypatch):
    """Every stage writes into a temporary folder beside --out: a run stopped in its last stage (here by a
    KeyboardInterrupt in the final judgement, after the VAE and the UNet were trained and would have been saved)
    leaves --out byte for byte as it was, even with --overwrite; the next run clears the leftovers and publishes."""
    from world import pretrain

    out = tmp_path / "m"
    out.mkdir()
    (out / "model_index.json").write_text("the earlier model")

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    threads = torch.get_num_threads()  # main() sets the thread count and the global seed: both are put back
    try:
        with torch.random.fork_rng(devices=[]):
            monkeypatch.setattr(pretrain, "judge_model", stop)
            with pytest.raises(KeyboardInterrupt), as_a_process():
                pretrain.main(pretrain.Args(out=str(out), overwrite=True, **TINY_PRETRAIN))
            assert [p.name for p in out.iterdir()] == ["model_index.json"]
            assert (out / "model_index.json").read_text() == "the earlier model"
            assert (tmp_path / ".m.partial" / "vae").is_dir()  # the stopped run's work, beside --out, not in it
            monkeypatch.undo()
            with as_a_process():
                pretrain.main(pretrain.Args(out=str(out), overwrite=True, vae_only=True, **TINY_PRETRAIN))
    finally:
        torch.set_num_threads(threads)
    assert (out / "vae").is_dir() and not (out / "model_index.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


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
