"""What is built without the network: the CLIP tokenizer, and Stable Diffusion models with seeded random weights.

The offline stand-ins have the classes of the real models, so every code path that loads SD 1.5 or SD 3.5 runs on
them: `tiny` and `tiny-sd3` (small: the tests), `sd15-random` and `sd35m-random` (the real models' exact shapes and
cost: speed and memory benchmarks anywhere). common.load_pipeline builds them by name (common.offline_pipeline);
weights come from the seed alone, so every run starts from the same "pretrained" model.
"""

import gzip
import json
import tempfile
from pathlib import Path

import torch


def clip_tokenizer():
    """The CLIP BPE tokenizer of Stable Diffusion 1.x, built without the network.

    open_clip ships the BPE merges (`bpe_simple_vocab_16e6.txt.gz`); the vocabulary is derived from
    them exactly as CLIP does it: 256 byte symbols, the same with `</w>`, one entry per merge, then the
    two special tokens (ids 49406 and 49407). transformers' CLIPTokenizer reads the same two files.
    """
    import open_clip.tokenizer as oct
    from transformers import CLIPTokenizer

    merges = gzip.open(oct.default_bpe(), "rt", encoding="utf-8").read().split("\n")[1 : 49152 - 256 - 2 + 1]
    symbols = list(oct.bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}), encoding="utf-8")
        Path(tmp, "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        return CLIPTokenizer(Path(tmp, "vocab.json").as_posix(), Path(tmp, "merges.txt").as_posix(),
                             pad_token="<|endoftext|>", model_max_length=77)


def stable_diffusion(tiny: bool, scheduler, seed: int = 0):
    """Stable Diffusion 1.x built from configs with seeded random weights, without touching the network: `tiny` (a
    ~0.8M-parameter UNet, 32x32 images) or SD 1.5's exact shapes; `scheduler` is the DDIM scheduler it samples with."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4) if tiny else \
        dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=4,
        ) if tiny else UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(
            block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, norm_num_groups=8, sample_size=32,
        ) if tiny else AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, sample_size=512,
        )
        if tiny:  # a random decoder squashes colours towards grey; amplify its output so latents move colours visibly
            vae.decoder.conv_out.weight.data.mul_(3.0)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=text["hidden_size"],
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, **text))
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


# SD 3.5 Medium's published configs (stabilityai/stable-diffusion-3.5-medium: transformer/, vae/, text_encoder/ CLIP-L,
# text_encoder_2/ OpenCLIP bigG), for `sd35m-random`
SD35M_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                         attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                         caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                         dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
SD35M_CLIPS = (dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    projection_dim=768, hidden_act="quick_gelu"),
               dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                    projection_dim=1280, hidden_act="gelu"))


def stable_diffusion_3(tiny: bool, seed: int = 0):
    """A StableDiffusion3Pipeline with seeded random weights, built without the network, and without T5 (diffusers
    then feeds zeros in its place, as for SD 3.5 loaded without T5); the scheduler is SD3's
    FlowMatchEulerDiscreteScheduler with shift 3. `tiny-sd3`: an 8 x 8 x 16 latent (4 x 4 patches of 2), two joint
    transformer blocks (the last, as in every SD3, without the text stream's output), two 32-wide CLIP encoders with
    projections (their pooled outputs
    concatenated: 64 = `pooled_projection_dim`). `sd35m-random`: SD 3.5 Medium's shapes (`SD35M_TRANSFORMER`, its
    VAE and two CLIP encoders: 1024 px, a 128 x 128 x 16 latent), 3.15B random parameters (2.24B in the transformer)."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    clips = [dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32,
                  hidden_act="quick_gelu")] * 2 if tiny else SD35M_CLIPS
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=16, pooled_projection_dim=64,
            pos_embed_max_size=8) if tiny else SD3Transformer2DModel(**SD35M_TRANSFORMER)
        vae = AutoencoderKL(block_out_channels=(16, 32) if tiny else (128, 256, 512, 512),
                            down_block_types=("DownEncoderBlock2D",) * (2 if tiny else 4),
                            up_block_types=("UpDecoderBlock2D",) * (2 if tiny else 4),
                            layers_per_block=1 if tiny else 2,
                            norm_num_groups=8 if tiny else 32, latent_channels=16, sample_size=16 if tiny else 1024,
                            scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
        encoders = [CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
            **clip)) for clip in clips]
    tokenizer = clip_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=encoders[0], tokenizer=tokenizer, text_encoder_2=encoders[1], tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None)
