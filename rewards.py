"""The rewards r(x_0, c): f(images (B, 3, H, W) floats in [0, 1], prompts) -> (B,) float32 on the images' device.

Weight-free: JPEG (in)compressibility (DDPO) and the toy colour reward. Learned, each loaded from its published
weights (a hub id by default, a local file or folder with `--reward-weights NAME=PATH`) with the preprocessing its
authors use, run batched on the device without gradients:

    aesthetic     LAION aesthetic predictor on CLIP ViT-L/14 (DDPO)                      about 1 to 10
    pickscore     PickScore (Kirstain et al. 2023): CLIP-H, logit_scale * cos(image, prompt)  about 18 to 24
    hpsv2         HPS v2.1 (Wu et al. 2023): open_clip ViT-H-14, cos(image, prompt)      about 0.2 to 0.35
    imagereward   ImageReward (Xu et al. 2023): BLIP + MLP, standardised by its published mean and std  about -2 to 2
    clipscore     CLIPScore (Hessel et al. 2021): 2.5 * max(cos, 0), CLIP ViT-L/14       about 0.5 to 1
    blip_vqa      T2I-CompBench's BLIP-VQA (Huang et al. 2023): product over the prompt's noun phrases of
                  P(yes | image, "<noun phrase>?")                                      0 to 1

`make("pickscore:1,aesthetic:0.1", device)` returns the weighted sum as one callable; with `components=True` it
also returns each term, unweighted, for logging. This module is separate from common.py (the sampler, loading,
checkpoints) because the reward models and their preprocessing are as long as the environment itself. Imports go
one way: this module uses common's helpers (`fail`, `to_uint8`, `clip_tokenizer`) and common never imports it; each
script imports it beside common and wraps `rewards.make(...)` in `runs.CheckedReward`.
"""

import importlib
import io
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

import cli
import common
import offline

# ----------------------------------------------------------------------------------------------------
# Weight-free rewards
# ----------------------------------------------------------------------------------------------------


def jpeg_size_kb(images, prompts=None) -> torch.Tensor:
    """JPEG file size in kB at quality 95 (DDPO's compressibility measure)."""
    sizes = []
    for im in common.to_uint8(images):
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=95)
        sizes.append(buf.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


def jpeg_compressibility(images, prompts=None):
    """DDPO: r = -(JPEG size in kB). Smaller files score higher."""
    return -jpeg_size_kb(images)


def jpeg_incompressibility(images, prompts=None):
    """DDPO: r = +(JPEG size in kB). Larger files score higher."""
    return jpeg_size_kb(images)


# The toy reward's palette: the prompt names a colour; the image should have that mean colour.
COLORS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0), "yellow": (1.0, 1.0, 0.0),
          "cyan": (0.0, 1.0, 1.0), "magenta": (1.0, 0.0, 1.0), "white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0)}


def prompt_color(prompt: str) -> tuple:
    for word in prompt.lower().replace(",", " ").split():
        if word in COLORS:
            return COLORS[word]
    cli.fail(f"the color reward needs prompts that name one of {sorted(COLORS)}; {prompt!r} names none "
                f"(use --prompts colors or a prompt file with colour names)")


def color(images, prompts):
    """Toy, weight-free, prompt-dependent reward for CPU demos and learning tests.

    r = 1 - ||mean RGB of the image - RGB of the colour named in the prompt|| / sqrt(3), in [0, 1].
    """
    target = torch.tensor([prompt_color(p) for p in prompts], dtype=torch.float32, device=images.device)
    return 1 - (images.float().mean(dim=(2, 3)) - target).norm(dim=1) / math.sqrt(3)


# ----------------------------------------------------------------------------------------------------
# Preprocessing on the device, as the authors' PIL/torchvision transforms do it
# ----------------------------------------------------------------------------------------------------

# OpenAI CLIP's normalisation; CLIP, LAION's CLIP-H (PickScore, HPS), BLIP and ImageReward all use it.
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _resize(x, size, clamp: bool = True):
    # PIL's bicubic filter (torch's antialiased bicubic is PIL's), clamped to [0, 1] as PIL's uint8 images are
    x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
    return x.clamp(0, 1) if clamp else x


def normalize(x, mean=CLIP_MEAN, std=CLIP_STD):
    return (x - x.new_tensor(mean).view(1, 3, 1, 1)) / x.new_tensor(std).view(1, 3, 1, 1)


def resize_center_crop(images, size: int):
    """torchvision's Resize(size) (short side to `size`, bicubic) then CenterCrop(size), as CLIP does."""
    h, w = images.shape[-2:]
    short, long = min(h, w), max(h, w)
    new_long = int(size * long / short)  # torchvision truncates
    x = _resize(images.float(), (size, new_long) if h <= w else (new_long, size))
    top, left = int(round((x.shape[-2] - size) / 2.0)), int(round((x.shape[-1] - size) / 2.0))
    return x[..., top : top + size, left : left + size]


def resize_longest_pad(images, size: int):
    """HPS v2's evaluation transform (ToTensor, then ResizeMaxSize on the float tensor, so no clamping): the
    longest side to `size` (bicubic, antialiased), padded with black to a square."""
    h, w = images.shape[-2:]
    nh, nw = round(h * size / max(h, w)), round(w * size / max(h, w))
    x = _resize(images.float(), (nh, nw), clamp=False)
    ph, pw = size - nh, size - nw
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)


def resize_square(images, size: int):
    """torchvision's Resize((size, size)) (bicubic, aspect ratio not kept), as BLIP's VQA evaluation does."""
    return _resize(images.float(), (size, size))


def _on(model):
    p = next(model.parameters())
    return p.device, p.dtype


# ----------------------------------------------------------------------------------------------------
# LAION aesthetic predictor (DDPO's aesthetic reward)
# ----------------------------------------------------------------------------------------------------


class ScoreMLP(torch.nn.Module):
    """The head of the LAION aesthetic predictor (`sac+logos+ava1-l14-linearMSE`) and of ImageReward:
    in -> 1024 -> 128 -> 64 -> 16 -> 1, linear layers only. The layer indices match both published state dicts
    (dropouts sit between the linear layers)."""

    def __init__(self, in_features: int = 768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(in_features, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))

    def forward(self, embed):
        return self.layers(embed)


class AestheticReward:
    """r = MLP(CLIP image embedding / ||.||), about 1-10 for real images."""

    def __init__(self, clip_model, mlp: ScoreMLP, image_size: int = 224):
        self.clip, self.mlp = clip_model.eval().requires_grad_(False), mlp.eval().requires_grad_(False)
        self.size = image_size

    @torch.no_grad()
    def __call__(self, images, prompts=None):
        device, dtype = _on(self.clip)
        x = normalize(resize_center_crop(images.to(device), self.size)).to(dtype)
        embed = self.clip.encode_image(x).float()
        return self.mlp.float()(embed / embed.norm(dim=-1, keepdim=True)).squeeze(-1).to(images.device)


def load_state(path: Union[str, Path]) -> dict:
    """A state dict from .safetensors, or from a torch file read with `weights_only=True` (no pickle code)."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def hub_file(repo: str, filename: str) -> str:
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo, filename)


def aesthetic(device, weights: Optional[str] = None, pretrained: Optional[str] = "openai", **arch):
    """open_clip ViT-L/14 (OpenAI weights) + the MLP head; `weights`: the MLP file (default: TRL's hub copy).
    `arch` overrides open_clip's ViT-L-14 config (tests build the same classes small, with `pretrained=None`).

    With QuickGELU, the activation OpenAI trained CLIP with and the one DDPO's scorer runs (transformers' CLIPModel):
    open_clip's `ViT-L-14` config has plain GELU since 2.29 and only warns when OpenAI weights load into it, which
    moves the score (a published measurement of this predictor on one image: 5.049 with QuickGELU, 4.443 without)."""
    # first: fail fast
    state = load_state(weights or hub_file("trl-lib/ddpo-aesthetic-predictor", "aesthetic-model.pth"))
    import open_clip

    clip_model = open_clip.create_model("ViT-L-14", pretrained=pretrained, device=device, force_quick_gelu=True, **arch)
    mlp = ScoreMLP()
    mlp.load_state_dict(state)
    return AestheticReward(clip_model, mlp.to(device))


# ----------------------------------------------------------------------------------------------------
# CLIP similarities: PickScore and CLIPScore (transformers' CLIPModel)
# ----------------------------------------------------------------------------------------------------


class CLIPSimilarity:
    """r = scale * cos(CLIP image embedding, CLIP text embedding of prefix + prompt), floored at 0 with `clamp`.

    PickScore: scale = the model's own exp(logit_scale), no floor (yuvalkirstain/PickScore's inference code).
    CLIPScore: scale 2.5, floored at 0, prefix "A photo depicts " (jmhessel/clipscore).
    Text: CLIP's BPE (offline.clip_tokenizer, the vocabulary every CLIP checkpoint here shares), 77 tokens.
    """

    def __init__(self, model, tokenizer, scale: Optional[float] = None, clamp: bool = False, prefix: str = ""):
        self.model, self.tokenizer = model.eval().requires_grad_(False), tokenizer
        self.clamp, self.prefix = clamp, prefix
        self.scale = float(model.logit_scale.exp()) if scale is None else scale
        self.size = model.config.vision_config.image_size

    @torch.no_grad()
    def __call__(self, images, prompts):
        device, dtype = _on(self.model)
        x = normalize(resize_center_crop(images.to(device), self.size)).to(dtype)
        tok = self.tokenizer([self.prefix + p for p in prompts], padding=True, truncation=True, max_length=77,
                             return_tensors="pt").to(device)
        image = self.model.visual_projection(self.model.vision_model(pixel_values=x).pooler_output).float()
        text = self.model.text_model(input_ids=tok.input_ids, attention_mask=tok.attention_mask).pooler_output
        text = self.model.text_projection(text).float()
        cos = F.cosine_similarity(image, text, dim=-1)
        return (self.scale * (cos.clamp(min=0) if self.clamp else cos)).to(images.device)


def _clip_model(device, source: str):
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(source).to(device, torch.float32)


def pickscore(device, weights: Optional[str] = None):
    return CLIPSimilarity(_clip_model(device, weights or "yuvalkirstain/PickScore_v1"), offline.clip_tokenizer())


def clipscore(device, weights: Optional[str] = None):
    """Hessel et al. used ViT-B/32 (`--reward-weights clipscore=openai/clip-vit-base-patch32`); ViT-L/14 is the
    backbone most text-to-image papers report."""
    return CLIPSimilarity(_clip_model(device, weights or "openai/clip-vit-large-patch14"), offline.clip_tokenizer(),
                          scale=2.5, clamp=True, prefix="A photo depicts ")


# ----------------------------------------------------------------------------------------------------
# HPS v2.1 (open_clip ViT-H-14 fine-tuned on human preferences)
# ----------------------------------------------------------------------------------------------------


class HPSReward:
    """r = cos(image embedding, text embedding) of the HPS-tuned CLIP (tgxs002/HPSv2 `score`: no logit scale)."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model.eval().requires_grad_(False), tokenizer
        size = model.visual.image_size
        self.size = size[0] if isinstance(size, (tuple, list)) else size

    @torch.no_grad()
    def __call__(self, images, prompts):
        device, dtype = _on(self.model)
        x = normalize(resize_longest_pad(images.to(device), self.size)).to(dtype)
        image = self.model.encode_image(x, normalize=True).float()
        text = self.model.encode_text(self.tokenizer(list(prompts)).to(device), normalize=True).float()
        return (image * text).sum(-1).to(images.device)


def hpsv2(device, weights: Optional[str] = None, **arch):
    """open_clip's ViT-H-14 architecture, every weight from the HPS v2.1 checkpoint (`state_dict` inside).
    `arch` overrides open_clip's ViT-H-14 config (tests build the same classes small)."""
    state = load_state(weights or hub_file("xswu/HPSv2", "HPS_v2.1_compressed.pt"))
    import open_clip

    model = open_clip.create_model("ViT-H-14", pretrained=None, **arch)
    model.load_state_dict(state.get("state_dict", state))
    return HPSReward(model.to(device, torch.float32), open_clip.get_tokenizer("ViT-H-14"))


# ----------------------------------------------------------------------------------------------------
# BLIP in transformers' classes: the key map from the original BLIP checkpoints (ImageReward, BLIP VQA)
# ----------------------------------------------------------------------------------------------------

# BLIP's ViT (timm's layout) -> transformers' BlipVisionModel; BLIP's BERT ("med") -> BlipTextModel keeps its names.
BLIP_VISION_KEYS = [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
]


def blip_vision_key(key: str) -> str:
    for pattern, repl in BLIP_VISION_KEYS:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    raise KeyError(f"unknown BLIP vision key {key!r}")


def map_blip_state(state: dict, vision: tuple, keep: dict) -> dict:
    """Rename an original BLIP state dict for transformers' classes: `vision` = (original prefix of the ViT, our
    prefix), its keys renamed by BLIP_VISION_KEYS; `keep` maps other original prefixes to ours, names unchanged.
    Keys under no prefix (projections, heads and queues the reward does not use) and `position_ids` buffers are
    dropped; a strict `load_state_dict` then checks that every parameter was found."""
    out = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        if key.startswith(vision[0]):
            out[vision[1] + blip_vision_key(key[len(vision[0]):])] = value
        for old, new in keep.items():
            if key.startswith(old):
                out[new + key[len(old):]] = value
    return out


def blip_vision_config(state: dict, prefix: str, **kw):
    """BLIP's ViT (LayerNorm eps 1e-6, patch 16) sized from its weights: width, depth, image size."""
    from transformers import BlipVisionConfig

    width = state[prefix + "cls_token"].shape[-1]
    depth = 1 + max(int(k[len(prefix):].split(".")[1]) for k in state if k.startswith(prefix + "blocks."))
    grid = math.isqrt(state[prefix + "pos_embed"].shape[1] - 1)
    return BlipVisionConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=depth,
                            num_attention_heads=width // 64, image_size=grid * 16, patch_size=16, layer_norm_eps=1e-6,
                            **kw)


def blip_text_config(state: dict, prefix: str, **kw):
    """BLIP's med_config.json (BERT-base with cross-attention to the image; vocabulary + [DEC] + [ENC]; LayerNorm eps
    1e-12), sized from the weights under `prefix` (the published checkpoints: 768 wide, 12 layers, 30524 tokens)."""
    from transformers import BlipTextConfig

    vocab, width = state[prefix + "embeddings.word_embeddings.weight"].shape
    depth = 1 + max(int(k[len(prefix):].split(".")[2]) for k in state if k.startswith(prefix + "encoder.layer."))
    return BlipTextConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=depth, num_attention_heads=width // 64,
                          encoder_hidden_size=state[prefix + "encoder.layer.0.crossattention.self.key.weight"].shape[1],
                          intermediate_size=state[prefix + "encoder.layer.0.intermediate.dense.weight"].shape[0],
                          max_position_embeddings=state[prefix + "embeddings.position_embeddings.weight"].shape[0],
                          layer_norm_eps=1e-12, hidden_act="gelu", bos_token_id=vocab - 2, pad_token_id=0,
                          sep_token_id=102, **kw)


def blip_tokenizer(source: str = "google-bert/bert-base-uncased"):
    """BLIP's tokenizer (its `init_tokenizer`): bert-base-uncased + `[DEC]` as bos (30522) + `[ENC]` (30523)."""
    from transformers import BertTokenizerFast

    tok = BertTokenizerFast.from_pretrained(source)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    if "[ENC]" not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


def _weights_file(weights: Optional[str], filename: str, repo: str):
    """(checkpoint file, tokenizer source): `weights` a file or a folder holding `filename`, else the hub copy; the
    tokenizer from the same folder if it has bert's vocab.txt, else bert-base-uncased from the hub."""
    path = Path(weights) if weights else Path(hub_file(repo, filename))
    path = path / filename if path.is_dir() else path
    return path, str(path.parent) if (path.parent / "vocab.txt").exists() else "google-bert/bert-base-uncased"


# ----------------------------------------------------------------------------------------------------
# ImageReward
# ----------------------------------------------------------------------------------------------------


class ImageRewardModel(torch.nn.Module):
    """BLIP (ViT image encoder + BERT text encoder cross-attending to it) + ScoreMLP on the [CLS] state.

    r = (MLP(text_encoder(prompt, image)[CLS]) - 0.16717362830052426) / 1.0333394966054072, the published mean
    and std by which THUDM/ImageReward's `score` (and so DPOK) standardises it.
    """

    MEAN, STD = 0.16717362830052426, 1.0333394966054072

    def __init__(self, vision_config, text_config):
        from transformers import BlipTextModel, BlipVisionModel

        super().__init__()
        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = ScoreMLP(text_config.hidden_size)

    def forward(self, pixel_values, input_ids, attention_mask):
        image = self.vision(pixel_values=pixel_values).last_hidden_state  # (B, 1 + patches, D_v)
        ones = torch.ones(image.shape[:2], dtype=torch.long, device=image.device)
        state = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image,
                          encoder_attention_mask=ones).last_hidden_state[:, 0]  # (B, D)
        return (self.mlp(state.float()).squeeze(-1) - self.MEAN) / self.STD


class ImageReward:
    """ImageReward's preprocessing: Resize(224) + CenterCrop (bicubic), CLIP normalisation; prompt padded to 35
    tokens."""

    def __init__(self, model: ImageRewardModel, tokenizer):
        self.model, self.tokenizer = model.eval().requires_grad_(False), tokenizer
        self.size = model.vision.config.image_size

    @torch.no_grad()
    def __call__(self, images, prompts):
        device, dtype = _on(self.model)
        x = normalize(resize_center_crop(images.to(device), self.size)).to(dtype)
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=35,
                             return_tensors="pt").to(device)
        return self.model(x, tok.input_ids, tok.attention_mask).float().to(images.device)


def imagereward_from_state(state: dict) -> ImageRewardModel:
    """Build ImageRewardModel from the original `ImageReward.pt` state dict (keys `blip.visual_encoder.*`,
    `blip.text_encoder.*`, `mlp.layers.*`), sizes read from the weights; every parameter must be covered."""
    model = ImageRewardModel(blip_vision_config(state, "blip.visual_encoder."),
                             blip_text_config(state, "blip.text_encoder."))
    model.load_state_dict(map_blip_state(state, ("blip.visual_encoder.", "vision."),
                                         {"blip.text_encoder.": "text.", "mlp.": "mlp."}))
    return model


def imagereward(device, weights: Optional[str] = None):
    """`weights`: ImageReward.pt, or a folder holding it (with bert-base-uncased's tokenizer files, else the hub's)."""
    path, tokenizer = _weights_file(weights, "ImageReward.pt", "THUDM/ImageReward")
    model = imagereward_from_state(load_state(path))
    return ImageReward(model.to(device, torch.float32), blip_tokenizer(tokenizer))


# ----------------------------------------------------------------------------------------------------
# BLIP-VQA as in T2I-CompBench
# ----------------------------------------------------------------------------------------------------

# The rule-based splitter's boundaries: conjunctions, prepositions and the verbs of T2I-CompBench's attribute prompts.
_SPLIT = re.compile(r"\s*(?:,|;|\.|\b(?:and|or|with|on|in|inside|of|to|near|under|above|below|behind|beside|next|"
                    r"top|at|by|from|over|into|onto|is|are|has|have|that|sitting|standing|lying|floating|takes)\b)\s*")
_DETERMINERS = {"a", "an", "the", "some"}


# T2I-CompBench drops these chunks (they name positions, not objects) and asks about the first 8 phrases at most.
_DROPPED_CHUNKS = ("top", "the side", "the left", "the right")
MAX_PHRASES = 8


def noun_phrases(prompt: str) -> list:
    """The prompt's noun phrases, each of which T2I-CompBench asks about.

    T2I-CompBench uses spaCy's `en_core_web_sm` noun chunks, drops the chunks 'top', 'the side', 'the left' and
    'the right' (exactly those texts) and keeps the first 8; when spaCy and that model are installed (README:
    `pip install -e ".[t2i]"`, then spaCy's model) they are used here too. Otherwise a rule-based splitter cuts at
    conjunctions, prepositions and a few verbs ("a green bench and a blue bowl" -> ["a green bench", "a blue bowl"]);
    it does not always give spaCy's chunks ("a red apple and yellow bananas", README), and `blip_vqa` warns when
    it is the one in use. The same filter and cap apply to both.
    """
    nlp = _spacy()
    if nlp is not None:
        chunks = [chunk.text for chunk in nlp(prompt).noun_chunks]
    else:
        chunks = [c.strip() for c in _SPLIT.split(prompt) if c and c.strip()]
        chunks = [c for c in chunks if c.lower() not in _DETERMINERS]
    return [c for c in chunks if c not in _DROPPED_CHUNKS][:MAX_PHRASES]


_SPACY = []


def _spacy():
    if not _SPACY:
        try:
            import spacy

            _SPACY.append(spacy.load("en_core_web_sm"))
        except Exception:  # noqa: BLE001 - spaCy or its English model absent: the rule-based splitter is used
            _SPACY.append(None)
    return _SPACY[0]


def vqa_question(phrase: str) -> str:
    """T2I-CompBench's question "<noun phrase>?" after BLIP's `pre_question` (lower case, no .!"()*#:;~)."""
    return re.sub(r"[.!\"()*#:;~]", "", f"{phrase}?".lower()).rstrip(" ")


class BlipVQAReward:
    """r = prod over the prompt's noun phrases p of P(yes) / (P(yes) + P(no)) for the question "p?" (1 if none).

    T2I-CompBench (BLIPvqa_eval, inference `vqa_prob`): the image resized to 480 x 480, the question's first token
    replaced by [ENC], the answer decoder's first-token distribution after [DEC].
    """

    def __init__(self, model, tokenizer, image_size: int = 480):
        self.model, self.tokenizer, self.size = model.eval().requires_grad_(False), tokenizer, image_size
        self.enc = tokenizer.convert_tokens_to_ids("[ENC]")
        self.yes, self.no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
        self.bos = tokenizer.bos_token_id  # [DEC], 30522

    @torch.no_grad()
    def __call__(self, images, prompts):
        device, dtype = _on(self.model)
        owner, questions = [], []
        for i, prompt in enumerate(prompts):
            for phrase in noun_phrases(prompt):
                owner.append(i)
                questions.append(vqa_question(phrase))
        out = torch.ones(len(prompts), device=device)
        if not questions:
            return out.to(images.device)
        x = normalize(resize_square(images.to(device), self.size)).to(dtype)
        image = self.model.vision_model(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state  # (B, N, D)
        ids = self.tokenizer(questions, truncation=True, max_length=35).input_ids
        p_yes = torch.empty(len(questions), device=device)
        # Questions of equal length run together, unpadded: T2I-CompBench pads and masks, but transformers' BLIP
        # text classes (5.x) drop the padding mask in cross-attention, so padding would change the answers.
        for length in sorted({len(q) for q in ids}):
            rows = [i for i, q in enumerate(ids) if len(q) == length]
            q = torch.tensor([ids[i] for i in rows], device=device)  # (Q_l, L)
            q[:, 0] = self.enc  # BLIP's VQA encodes the question with [ENC] in place of [CLS]
            img = image[torch.tensor([owner[i] for i in rows], device=device)]  # (Q_l, N, D)
            state = self.model.text_encoder(input_ids=q, encoder_hidden_states=img).last_hidden_state  # (Q_l, L, D)
            start = torch.full((len(rows), 1), self.bos, dtype=torch.long, device=device)
            logits = self.model.text_decoder(input_ids=start, encoder_hidden_states=state,
                                             use_cache=False).logits[:, 0].float()
            p_yes[rows] = torch.sigmoid(logits[:, self.yes] - logits[:, self.no])  # = p(yes) / (p(yes) + p(no))
        return out.scatter_reduce_(0, torch.tensor(owner, device=device), p_yes, "prod").to(images.device)


def blip_vqa_from_state(state: dict):
    """transformers' BlipForQuestionAnswering from the original BLIP VQA checkpoint (`model` inside, keys
    `visual_encoder.*`, `text_encoder.*`, `text_decoder.*`), e.g. `model_base_vqa_capfilt_large.pth`."""
    from transformers import BlipConfig, BlipForQuestionAnswering

    state = state.get("model", state)
    vision = blip_vision_config(state, "visual_encoder.")
    config = BlipConfig(vision_config=vision.to_dict(), text_config=blip_text_config(state, "text_encoder.").to_dict())
    model = BlipForQuestionAnswering(config)
    model.load_state_dict(map_blip_state(state, ("visual_encoder.", "vision_model."),
                                         {"text_encoder.": "text_encoder.", "text_decoder.": "text_decoder."}))
    return model


def blip_vqa(device, weights: Optional[str] = None, image_size: int = 480):
    """`weights`: a transformers BLIP VQA folder or hub id (default Salesforce/blip-vqa-capfilt-large, the port of the
    checkpoint T2I-CompBench uses, stored at 384 px: its position embeddings are interpolated to 480), or the
    original `.pth` (T2I-CompBench's model itself, 480 px; the tokenizer from its folder's vocab.txt, else the
    hub's)."""
    from transformers import BlipForQuestionAnswering

    if _spacy() is None:
        warnings.warn("blip_vqa: spaCy's en_core_web_sm is not installed, so noun phrases come from a rule-based "
                      "splitter that differs from T2I-CompBench's on some prompts; pip install -e '.[t2i]' and "
                      "python -m spacy download en_core_web_sm (README) give its chunks", stacklevel=2)
    source = weights or "Salesforce/blip-vqa-capfilt-large"
    if Path(source).is_file():
        path, tokenizer = _weights_file(source, "", "")
        model = blip_vqa_from_state(load_state(path))
    else:
        model, tokenizer = BlipForQuestionAnswering.from_pretrained(source), source
    return BlipVQAReward(model.to(device, torch.float32), blip_tokenizer(tokenizer), image_size)


# ----------------------------------------------------------------------------------------------------
# The registry, the spec parser and the weighted sum
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    load: Callable  # (device, weights: Optional[str]) -> f(images, prompts) -> (B,)
    weights: str = ""  # what --reward-weights NAME=... takes; empty: the reward has no weights
    hub: bool = False  # a hub id is accepted in place of a local path
    prompts: Union[Callable, str, None] = None  # fails in one line on prompts the reward cannot score ("module:fn")


def _resolve(fn: Union[Callable, str]) -> Callable:
    """A function, or "module:function" imported now."""
    if callable(fn):
        return fn
    module, _, name = fn.partition(":")
    return getattr(importlib.import_module(module), name)


def free(fn: Union[Callable, str], prompts: Union[Callable, str, None] = None) -> Entry:
    """A weight-free reward: a function, or "module:function" imported when the reward is made; `prompts` checks
    the prompts it will be asked to score."""
    return Entry(lambda device, weights=None: _resolve(fn), prompts=prompts)


REWARDS = {
    "jpeg_compressibility": free(jpeg_compressibility),
    "jpeg_incompressibility": free(jpeg_incompressibility),
    "color": free(color, prompts=lambda prompts: [prompt_color(p) for p in prompts]),
    # the shapes world's compositional reward (world/__init__.py, docs/world.md)
    "shapes": free("world:reward", prompts="world:parse_all"),
    "aesthetic": Entry(aesthetic, "the MLP's .pth/.safetensors (sac+logos+ava1-l14-linearMSE)"),
    "pickscore": Entry(pickscore, "a CLIPModel folder or hub id (yuvalkirstain/PickScore_v1)", hub=True),
    "hpsv2": Entry(hpsv2, "HPS_v2.1_compressed.pt (xswu/HPSv2)"),
    "imagereward": Entry(imagereward, "ImageReward.pt or a folder with it and bert-base-uncased's vocab.txt"),
    "clipscore": Entry(clipscore, "a CLIPModel folder or hub id (openai/clip-vit-large-patch14)", hub=True),
    "blip_vqa": Entry(blip_vqa, "a BLIP VQA folder or hub id (Salesforce/blip-vqa-capfilt-large) or BLIP's .pth",
                      hub=True),
}
EXAMPLE = "e.g. --reward pickscore:1,aesthetic:0.1"


def parse_spec(spec: str) -> list:
    """"name[:weight],..." -> [(name, weight)]; a bare name weighs 1. Fails in one line on a bad spec."""
    terms = []
    for item in spec.split(","):
        name, sep, weight = (part.strip() for part in item.partition(":"))
        if name not in REWARDS:
            cli.fail(f"unknown reward {name!r} in --reward {spec!r}; choose from {', '.join(REWARDS)} ({EXAMPLE})")
        try:
            value = float(weight) if sep else 1.0
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            cli.fail(f"reward weight {weight!r} of {name!r} in --reward {spec!r} is not a finite number ({EXAMPLE})")
        if name in dict(terms):
            cli.fail(f"reward {name!r} appears twice in --reward {spec!r}; give each reward once ({EXAMPLE})")
        terms.append((name, value))
    return terms


def parse_weights(spec: Optional[str], names: Sequence[str]) -> dict:
    """"name=path,..." -> {name: path}, checked against the rewards in use before anything loads."""
    out = {}
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        name, sep, path = (part.strip() for part in item.partition("="))
        if not sep or not path:
            cli.fail(f"--reward-weights {spec!r}: write NAME=PATH[,NAME=PATH...], e.g. --reward-weights "
                     f"aesthetic=mlp.pth")
        if name not in names:
            cli.fail(f"--reward-weights names {name!r}, which --reward does not use ({', '.join(names)})")
        entry = REWARDS[name]
        if not entry.weights:
            cli.fail(f"--reward-weights names {name!r}, which has no weights")
        if not Path(path).expanduser().exists() and not (entry.hub and re.fullmatch(r"[\w.-]+/[\w.-]+", path)):
            cli.fail(f"--reward-weights {name}={path}: no such file or folder (expected {entry.weights})")
        out[name] = str(Path(path).expanduser()) if Path(path).expanduser().exists() else path
    return out


class WeightedSum:
    """r = sum_i w_i r_i(images, prompts); `components=True` also returns the terms r_i, unweighted, (B, C)."""

    def __init__(self, names: Sequence[str], weights: Sequence[float], fns: Sequence[Callable]):
        self.names, self.weights, self.fns = list(names), torch.tensor(weights, dtype=torch.float32), list(fns)

    def __call__(self, images, prompts=None, components: bool = False):
        parts = torch.stack([fn(images, prompts).float().to(images.device) for fn in self.fns], dim=1)  # (B, C)
        total = (parts * self.weights.to(parts.device)).sum(1)  # (B,): exactly r_1 for one term of weight 1
        return (total, parts) if components else total


def load(name: str, device, weights: Optional[str] = None) -> Callable:
    """One reward by name; a failure to fetch or read its weights is one line naming the flag to pass."""
    entry = REWARDS[name]
    try:
        return entry.load(device, weights)
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to fetch or read weights is the same user error
        detail = " ".join(f"{type(e).__name__}: {e}".split())[:160]
        cli.fail(f"the {name} reward's weights could not be loaded ({detail}); download them and pass "
                    f"--reward-weights {name}=PATH ({entry.weights}), or use --reward color offline")


def make(spec: str, device, weights: Optional[str] = None, prompts: Sequence[str] = ()) -> WeightedSum:
    """`spec` "name[:weight],...", `weights` "name=path,...", and the `prompts` to be scored: all validated before
    any model loads."""
    terms = parse_spec(spec)
    paths = parse_weights(weights, [name for name, _ in terms])
    for name, _ in terms:
        if REWARDS[name].prompts is not None:
            _resolve(REWARDS[name].prompts)(list(prompts))
    fns = [load(name, device, paths.get(name)) for name, _ in terms]
    return WeightedSum([name for name, _ in terms], [w for _, w in terms], fns)
