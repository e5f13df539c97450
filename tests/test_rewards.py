"""Rewards offline: weight-free ones exactly; learned ones built with random weights in their real architecture
classes at small sizes, loaded through the same code as the published weights (nothing is downloaded)."""

import math

import numpy as np
import pytest
import torch
from helpers import NETWORK_RTOL

import common
import offline
import rewards

PROMPTS = ["a red cat and a blue dog", "a green bench", "a yellow image", "a cat", "a dog and a cat", "a red dog",
           "a blue cat", "a green dog"]


def smooth_images(n=8, h=48, w=40, seed=0):
    """Images in [0, 1] that vary smoothly, as generated ones do (PIL's uint8 rounding is then the only difference)."""
    x = torch.rand((n, 3, h // 4, w // 4), generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)


def quantized(images):
    """The images as PIL sees them (uint8), back in [0, 1]."""
    return torch.stack([torch.from_numpy(np.array(p)).permute(2, 0, 1).float() / 255 for p in common.to_uint8(images)])


def check_batched(fn, images, prompts):
    """(B,) float32 on the images' device, finite, and one batch of 8 equals 8 batches of 1: to NETWORK_RTOL of the
    batch's largest |reward| (tests/helpers.py), since a batch of another shape sums in another order."""
    r = fn(images, prompts)
    assert r.shape == (len(prompts),) and r.dtype == torch.float32 and r.device == images.device
    assert torch.isfinite(r).all()
    single = torch.cat([fn(images[i : i + 1], prompts[i : i + 1]) for i in range(len(prompts))])
    torch.testing.assert_close(r, single, rtol=NETWORK_RTOL, atol=NETWORK_RTOL * float(r.abs().max()))
    return r


# ----------------------------------------------------------------------------------------------------
# Weight-free rewards
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["jpeg_compressibility", "jpeg_incompressibility", "color"])
def test_weight_free_rewards_shape_finite_deterministic(name):
    images = torch.rand((4, 3, 32, 32), generator=torch.Generator().manual_seed(8))
    prompts = ["a red image", "a blue image", "a green image", "a yellow image"]
    f = rewards.make(name, "cpu")
    r = check_batched(f, images, prompts)
    assert torch.equal(r, f(images, prompts)) and torch.equal(r, getattr(rewards, name)(images, prompts))


def test_jpeg_rewards_prefer_flat_or_noisy_images():
    flat = torch.full((1, 3, 64, 64), 0.5)
    noisy = torch.rand((1, 3, 64, 64), generator=torch.Generator().manual_seed(0))
    both = torch.cat([flat, noisy])
    comp, incomp = rewards.jpeg_compressibility(both), rewards.jpeg_incompressibility(both)
    assert comp[0] > comp[1] and incomp[1] > incomp[0] and torch.equal(comp, -incomp)


def test_color_reward_is_prompt_dependent():
    red = torch.zeros((1, 3, 16, 16))
    red[:, 0] = 1
    blue = torch.zeros((1, 3, 16, 16))
    blue[:, 2] = 1
    images = torch.cat([red, blue, red, blue])
    r = rewards.color(images, ["a red image", "a red image", "a blue image", "a blue image"])
    torch.testing.assert_close(r,
                               torch.tensor([1.0, 1 - math.sqrt(2) / math.sqrt(3), 1 - math.sqrt(2) / math.sqrt(3),
                                             1.0]))
    with pytest.raises(SystemExit):
        rewards.color(images[:1], ["a dog"])
    for p in common.load_prompts("colors"):
        rewards.prompt_color(p)  # every toy prompt names a colour


# ----------------------------------------------------------------------------------------------------
# The spec, the weights flag and the weighted sum
# ----------------------------------------------------------------------------------------------------


def test_weighted_sum_and_its_terms():
    images = torch.rand((3, 3, 32, 32), generator=torch.Generator().manual_seed(1))
    prompts = ["a red image", "a blue image", "a white image"]
    f = rewards.make("color:2, jpeg_compressibility:-0.5", "cpu")
    total, terms = f(images, prompts, components=True)
    assert f.names == ["color", "jpeg_compressibility"] and terms.shape == (3, 2) and terms.dtype == torch.float32
    torch.testing.assert_close(terms[:, 0], rewards.color(images, prompts))
    torch.testing.assert_close(terms[:, 1], rewards.jpeg_compressibility(images))
    torch.testing.assert_close(total, 2 * terms[:, 0] - 0.5 * terms[:, 1])
    assert torch.equal(total, f(images, prompts))
    assert rewards.parse_spec("color") == [("color", 1.0)]  # a bare name weighs 1


@pytest.mark.parametrize("spec,message", [
    ("beauty", "unknown reward 'beauty'"), ("color:abc", "not a finite number"), ("color:nan", "not a finite number"),
    ("color:inf", "not a finite number"), ("color,color:2", "appears twice"), ("color,", "unknown reward ''"),
])
def test_bad_reward_spec_fails_in_one_line(spec, message):
    with pytest.raises(SystemExit) as e:
        rewards.make(spec, "cpu")
    assert message in str(e.value) and "\n" not in str(e.value) and str(e.value).startswith("error: ")


@pytest.mark.parametrize("weights,message", [
    ("aesthetic=/nonexistent/mlp.pth", "no such file"), ("pickscore=x.pt", "which --reward does not use"),
    ("color=x.pt", "has no weights"), ("aesthetic", "NAME=PATH"),
])
def test_bad_reward_weights_fail_before_loading(weights, message):
    with pytest.raises(SystemExit) as e:
        rewards.make("color,aesthetic", "cpu", weights)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["aesthetic", "pickscore", "hpsv2", "imagereward", "clipscore", "blip_vqa"])
def test_missing_weights_name_the_flag(name):
    """Offline with nothing cached, each learned reward stops in one line that says which flag to pass."""
    with pytest.raises(SystemExit) as e:
        rewards.make(name, "cpu")
    assert f"--reward-weights {name}=PATH" in str(e.value) and "\n" not in str(e.value)


def test_one_line_registers_a_weight_free_reward(monkeypatch):
    """A weight-free reward is one registry entry: a function, or "module:function" imported when it is used."""
    images = torch.rand((2, 3, 8, 8))
    monkeypatch.setitem(rewards.REWARDS, "brightness", rewards.free(lambda images, prompts: images.mean(dim=(1, 2, 3))))
    torch.testing.assert_close(rewards.make("brightness:2", "cpu")(images, None), 2 * images.mean(dim=(1, 2, 3)))
    monkeypatch.setitem(rewards.REWARDS, "jpeg_by_name", rewards.free("rewards:jpeg_incompressibility"))
    assert torch.equal(rewards.make("jpeg_by_name", "cpu")(images, None), rewards.jpeg_size_kb(images))


# ----------------------------------------------------------------------------------------------------
# Preprocessing against the libraries' own transforms
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 3, 48, 40), (2, 3, 32, 32), (1, 3, 256, 256)])
def test_clip_preprocessing_matches_the_processor(shape):
    """CLIP's (and ImageReward's) Resize + CenterCrop + normalise on the device vs transformers' CLIPImageProcessor
    on PIL images: equal up to PIL's uint8 rounding (mean 0.004, max 0.02 on smooth images, normalised units)."""
    from transformers import CLIPImageProcessor

    images = quantized(smooth_images(shape[0], *shape[2:]))
    ours = rewards.normalize(rewards.resize_center_crop(images, 224))
    theirs = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})(
        images=common.to_uint8(images), return_tensors="pt").pixel_values
    assert ours.shape == theirs.shape == (shape[0], 3, 224, 224)
    assert (ours - theirs).abs().mean() < 0.01 and (ours - theirs).abs().max() < 0.05


@pytest.mark.parametrize("shape", [(2, 3, 48, 40), (1, 3, 30, 50), (1, 3, 224, 224)])
def test_hps_preprocessing_matches_its_transform(shape):
    """HPS v2's evaluation transform (ToTensor, ResizeMaxSize on the tensor, pad, Normalize) in torchvision's own
    ops: the same numbers."""
    import torchvision.transforms.functional as TF

    images = quantized(smooth_images(shape[0], *shape[2:]))
    h, w = shape[2:]
    scale = 224 / max(h, w)
    nh, nw = round(h * scale), round(w * scale)
    x = TF.resize(images, [nh, nw], interpolation=TF.InterpolationMode.BICUBIC,
                  antialias=True) if scale != 1 else images
    x = TF.pad(x, [(224 - nw) // 2, (224 - nh) // 2, 224 - nw - (224 - nw) // 2, 224 - nh - (224 - nh) // 2], fill=0)
    theirs = TF.normalize(x, rewards.CLIP_MEAN, rewards.CLIP_STD)
    torch.testing.assert_close(rewards.normalize(rewards.resize_longest_pad(images, 224)), theirs, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------
# PickScore and CLIPScore: transformers' CLIPModel
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2,
                                         vocab_size=49408, max_position_embeddings=77, projection_dim=16),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2,
                                           image_size=32, patch_size=8, projection_dim=16),
                        projection_dim=16, logit_scale_init_value=math.log(100.0))
    model = CLIPModel(config)
    # a shared direction in both towers, so that cosines are mostly positive (CLIPScore floors at 0)
    with torch.no_grad():
        model.text_projection.weight.copy_(model.visual_projection.weight)
        model.vision_model.post_layernorm.bias.fill_(1.0)
        model.text_model.final_layer_norm.bias.fill_(1.0)
    folder = tmp_path_factory.mktemp("clip")
    model.save_pretrained(folder)  # safetensors, as the hub's copies
    return folder


def test_pickscore_and_clipscore(clip_folder):
    from transformers import CLIPImageProcessor, CLIPModel

    images = smooth_images()
    pick, clips = rewards.load("pickscore", "cpu", str(clip_folder)), rewards.load("clipscore", "cpu", str(clip_folder))
    r_pick, r_clip = check_batched(pick, images, PROMPTS), check_batched(clips, images, PROMPTS)
    assert not torch.allclose(r_pick, r_pick[:1].expand(8))
    # PickScore's own inference (yuvalkirstain/PickScore): logit_scale.exp() * cos of the model's embeddings;
    # CLIPScore (jmhessel/clipscore): 2.5 * max(cos, 0) with "A photo depicts " before the caption
    model, tok = CLIPModel.from_pretrained(clip_folder).eval(), offline.clip_tokenizer()

    def cos(pixels, prefix):
        ids = tok([prefix + p for p in PROMPTS], padding=True, return_tensors="pt")
        with torch.no_grad():
            out = model(input_ids=ids.input_ids, attention_mask=ids.attention_mask, pixel_values=pixels)
        return torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds)

    ours = rewards.normalize(rewards.resize_center_crop(images, 32))
    torch.testing.assert_close(r_pick, 100.0 * cos(ours, ""), atol=1e-4, rtol=1e-4)
    prefixed = cos(ours, "A photo depicts ")
    torch.testing.assert_close(r_clip, 2.5 * prefixed.clamp(min=0), atol=1e-4, rtol=1e-4)
    assert (r_clip > 0).any() and (prefixed - cos(ours, "")).abs().max() > 1e-3  # the prefix matters
    with torch.no_grad():  # opposite embeddings: CLIPScore floors at 0, PickScore goes negative
        flipped = CLIPModel.from_pretrained(clip_folder)
        flipped.text_projection.weight.neg_()
    assert (rewards.CLIPSimilarity(flipped, tok, scale=2.5, clamp=True)(images, PROMPTS) == 0).all()
    assert (rewards.CLIPSimilarity(flipped, tok)(images, PROMPTS) < 0).all()
    # the same score from the library's processor pixels, up to PIL's uint8 rounding
    pixels = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})(
        images=common.to_uint8(images), return_tensors="pt").pixel_values
    torch.testing.assert_close(r_pick, 100.0 * cos(pixels, ""), atol=0.1 * float(r_pick.std()), rtol=0)


# ----------------------------------------------------------------------------------------------------
# HPS v2.1: open_clip's ViT-H-14 classes, small
# ----------------------------------------------------------------------------------------------------

HPS_SMALL = dict(embed_dim=16, vision_cfg=dict(image_size=32, layers=2, width=32, head_width=16, patch_size=8),
                 text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2))


def test_hpsv2_checkpoint_loads_and_scores(tmp_path):
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-H-14", pretrained=None, **HPS_SMALL).eval()
    torch.save({"state_dict": model.state_dict()}, tmp_path / "HPS_v2.1_compressed.pt")  # the published layout
    hps = rewards.hpsv2("cpu", str(tmp_path / "HPS_v2.1_compressed.pt"), **HPS_SMALL)
    images = smooth_images()
    r = check_batched(hps, images, PROMPTS)
    # tgxs002/HPSv2 `score`: diag(image_features @ text_features.T) of the model's forward (normalised features)
    with torch.no_grad():
        out = model(rewards.normalize(rewards.resize_longest_pad(images, 32)),
                    open_clip.get_tokenizer("ViT-H-14")(PROMPTS))
        torch.testing.assert_close(r, torch.diagonal(out[0] @ out[1].T), atol=1e-5, rtol=1e-5)
    assert (r.abs() <= 1 + 1e-5).all()


# ----------------------------------------------------------------------------------------------------
# BLIP: the original checkpoints' layout (timm's ViT + BLIP's BERT) mapped into transformers' classes
# ----------------------------------------------------------------------------------------------------

WORDS = ["a", "red", "blue", "green", "yellow", "cat", "dog", "bench", "image", "and", "yes", "no", "?", "photo"]


def bert_vocab(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    return len(WORDS) + 5 + 2  # + [DEC] + [ENC]


def original_vit(prefix, width=128, image_size=32, seed=0):
    """BLIP's ViT has timm's layout (cls_token, pos_embed, blocks.N.attn.qkv, ...): build one with timm, as its
    checkpoints would hold it. Width 128 = 2 heads of 64, as BLIP's ViTs have."""
    import timm

    torch.manual_seed(seed)
    vit = timm.models.vision_transformer.VisionTransformer(img_size=image_size, patch_size=16, embed_dim=width, depth=2,
                                                           num_heads=width // 64, qkv_bias=True, num_classes=0,
                                                           global_pool="")
    for p in vit.parameters():
        p.data.normal_(0, 0.1)
    return vit.eval(), {prefix + k: v for k, v in vit.state_dict().items()}


def original_bert(prefix, vocab, encoder_width, decoder=False, seed=1, width=64):
    """BLIP's med BERT names its weights as transformers' BlipText* classes do (embeddings.word_embeddings,
    encoder.layer.N.attention.self.query, encoder.layer.N.crossattention.self.key, ...; no token types, no pooler),
    and saves its `embeddings.position_ids` buffer."""
    from transformers import BlipTextConfig, BlipTextLMHeadModel, BlipTextModel

    torch.manual_seed(seed)
    config = BlipTextConfig(vocab_size=vocab, hidden_size=width, encoder_hidden_size=encoder_width,
                            intermediate_size=2 * width,
                            num_hidden_layers=2, num_attention_heads=width // 64, max_position_embeddings=64)
    model = BlipTextLMHeadModel(config) if decoder else BlipTextModel(config, add_pooling_layer=False)
    state = {prefix + k: v for k, v in model.state_dict().items()}
    state[prefix + ("bert." if decoder else "") + "embeddings.position_ids"] = torch.arange(64)[None]
    return state


def test_blip_vision_key_map_is_exact():
    """timm's ViT (BLIP's layout) and transformers' BlipVisionModel loaded through the key map: the same output."""
    from transformers import BlipVisionModel

    vit, state = original_vit("visual_encoder.")
    model = BlipVisionModel(rewards.blip_vision_config(state, "visual_encoder.")).eval()
    model.load_state_dict(rewards.map_blip_state(state, ("visual_encoder.", ""), {}))  # strict: every weight found
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x).last_hidden_state, vit.forward_features(x), atol=1e-5,
                                   rtol=1e-5)
    for key in ("embeddings.word_embeddings.weight", "encoder.layer.0.attention.self.query.weight",
                "encoder.layer.0.attention.output.LayerNorm.weight", "encoder.layer.0.crossattention.self.key.weight",
                "encoder.layer.0.intermediate.dense.weight", "encoder.layer.0.output.dense.weight"):
        assert key in original_bert("", 30, 128), key  # BLIP's med.py names, unchanged in transformers


def test_imagereward_checkpoint_loads_and_scores(tmp_path):
    vocab = bert_vocab(tmp_path / "ImageReward")
    vit, state = original_vit("blip.visual_encoder.")
    state.update(original_bert("blip.text_encoder.", vocab, 128))
    mlp = rewards.ScoreMLP(64).eval()  # eval: no dropout
    state.update({"mlp." + k: torch.randn_like(v) * 0.1 for k, v in mlp.state_dict().items()})
    # unused heads
    state.update({"blip.vision_proj.weight": torch.zeros(4, 128), "blip.text_proj.bias": torch.zeros(4)})
    torch.save(state, tmp_path / "ImageReward" / "ImageReward.pt")
    reward = rewards.load("imagereward", "cpu", str(tmp_path / "ImageReward"))
    images = smooth_images()
    r = check_batched(reward, images, PROMPTS)
    assert not torch.allclose(r, r[:1].expand(8))
    # the score by hand: [CLS] state of the text encoder over the 35-token prompt, MLP, standardised
    model = reward.model
    tok = reward.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert tok.input_ids.shape == (8, 35) and (tok.input_ids[:, 0] == reward.tokenizer.cls_token_id).all()
    with torch.no_grad():
        x = rewards.normalize(rewards.resize_center_crop(images, 32))
        image = vit.forward_features(x)
        state0 = model.text(input_ids=tok.input_ids, attention_mask=tok.attention_mask, encoder_hidden_states=image,
                            encoder_attention_mask=torch.ones(image.shape[:2],
                                                              dtype=torch.long)).last_hidden_state[:, 0]
        mlp.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("mlp.")})
        expected = (mlp(state0).squeeze(-1) - 0.16717362830052426) / 1.0333394966054072
    torch.testing.assert_close(r, expected, atol=1e-5, rtol=1e-5)


def test_noun_phrases_and_questions():
    assert rewards.noun_phrases("a green bench and a blue bowl") == ["a green bench", "a blue bowl"]
    assert rewards.noun_phrases("A brown purse is sitting on a green bench.") == ["A brown purse", "a green bench"]
    assert rewards.noun_phrases("rubber sole shoes and fluffy clouds") == ["rubber sole shoes", "fluffy clouds"]
    assert rewards.noun_phrases("A white kitchen with a grey counter top.") == ["A white kitchen", "a grey counter"]
    # T2I-CompBench's filter (these chunk texts exactly) and its cap of 8 phrases
    assert rewards.noun_phrases("a cat on the left and a dog on the right") == ["a cat", "a dog"]
    colours = ("red", "blue", "green", "pink", "black", "white", "grey", "brown", "gold")
    many = " and ".join(f"a {c} cube" for c in colours)
    assert rewards.noun_phrases(many) == [f"a {c} cube" for c in colours[:8]]
    assert rewards.vqa_question("A Red (bright) cat.") == "a red bright cat?"


@pytest.fixture(scope="module")
def blip_vqa_files(tmp_path_factory):
    """The original BLIP VQA checkpoint's layout ({"model": ...}) at 32 px, and the same weights as a transformers
    folder (as the hub's port), both with a tokenizer vocabulary beside them. Text and image widths are equal, as in
    BLIP's ViT-B VQA model (transformers' BlipForQuestionAnswering gives encoder and decoder one text config)."""
    folder = tmp_path_factory.mktemp("blip_vqa")
    vocab = bert_vocab(folder)
    _, state = original_vit("visual_encoder.")
    state.update(original_bert("text_encoder.", vocab, 128, width=128))
    state.update(original_bert("text_decoder.", vocab, 128, decoder=True, seed=2, width=128))
    torch.save({"model": state}, folder / "model_base_vqa.pth")
    hf = folder / "hf"
    rewards.blip_vqa_from_state({"model": state}).save_pretrained(hf)
    bert_vocab(hf)
    return folder / "model_base_vqa.pth", hf


def test_blip_vqa_combines_noun_phrases_as_t2i_compbench(blip_vqa_files):
    pth, hf = blip_vqa_files
    if rewards._spacy() is None:  # the rule-based splitter is in use: said at load, naming the extra
        with pytest.warns(UserWarning, match=r"rule-based splitter.*\.\[t2i\]"):
            reward = rewards.blip_vqa("cpu", str(pth), image_size=32)
    else:
        reward = rewards.blip_vqa("cpu", str(pth), image_size=32)
    images = smooth_images()
    r = check_batched(reward, images, PROMPTS)
    assert ((r > 0) & (r <= 1)).all()
    # a prompt's score is the product of its noun phrases' P(yes)
    both = reward(images[:1], ["a red cat and a blue dog"])
    parts = reward(images[:1].expand(2, -1, -1, -1), ["a red cat", "a blue dog"])
    assert (parts < 1).all()
    torch.testing.assert_close(both, parts.prod().view(1), atol=1e-6, rtol=1e-5)
    assert torch.equal(reward(images[:1], ["and"]), torch.ones(1))  # no noun phrase: nothing to ask, 1
    # the transformers folder (the hub's format) holds the same model: the same scores
    torch.testing.assert_close(rewards.blip_vqa("cpu", str(hf), image_size=32)(images, PROMPTS), r)
    # at another resolution the position embeddings are interpolated (T2I-CompBench runs at 480)
    assert torch.isfinite(rewards.blip_vqa("cpu", str(hf), image_size=64)(images[:2], PROMPTS[:2])).all()


# ----------------------------------------------------------------------------------------------------
# The LAION aesthetic predictor
# ----------------------------------------------------------------------------------------------------

L14_SMALL = dict(embed_dim=768, vision_cfg=dict(layers=2, width=64, patch_size=32, image_size=224),
                 text_cfg=dict(layers=1, width=32, heads=2))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_aesthetic_weights_load_from_a_local_file(tmp_path, suffix):
    """The LAION predictor's MLP file (its published layout) through the loader, on an open_clip ViT-L-14 of the same
    classes with a small config and random weights."""
    from safetensors.torch import save_file

    mlp = rewards.ScoreMLP()
    assert [k for k in mlp.state_dict() if k.endswith("weight")] == [f"layers.{i}.weight" for i in (0, 2, 4, 6, 7)]
    (torch.save(mlp.state_dict(), tmp_path / f"mlp{suffix}") if suffix == ".pth"
     else save_file(mlp.state_dict(), str(tmp_path / f"mlp{suffix}")))
    torch.manual_seed(0)
    reward = rewards.aesthetic("cpu", str(tmp_path / f"mlp{suffix}"), pretrained=None, **L14_SMALL)
    r = check_batched(reward, smooth_images(4, 40, 32), PROMPTS[:4])
    assert not torch.allclose(r, r[:1].expand(4))
    torch.testing.assert_close(reward.mlp.layers[0].weight, mlp.layers[0].weight)


def test_aesthetic_clip_runs_quickgelu_as_openai_trained_it(tmp_path):
    """Every MLP of the image tower applies QuickGELU, x * sigmoid(1.702 x), the activation of OpenAI's CLIP and of
    DDPO's scorer, not open_clip's ViT-L-14 default GELU; checked on the modules and on their output."""
    import open_clip

    torch.save(rewards.ScoreMLP().state_dict(), tmp_path / "mlp.pth")
    reward = rewards.aesthetic("cpu", str(tmp_path / "mlp.pth"), pretrained=None, **L14_SMALL)
    blocks = reward.clip.visual.transformer.resblocks
    assert len(blocks) == 2 and all(isinstance(b.mlp.gelu, open_clip.transformer.QuickGELU) for b in blocks)
    x = torch.linspace(-3, 3, 7)
    torch.testing.assert_close(blocks[0].mlp.gelu(x), x * torch.sigmoid(1.702 * x))
