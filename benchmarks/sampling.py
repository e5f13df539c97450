"""Our sampler (with per-step log-probs) against diffusers' pipeline (StableDiffusionPipeline, or
StableDiffusion3Pipeline for an SD 3.x model).

Same model, steps, batch, CFG scale and eta (on SD 3.x: our SDE at noise level --eta against the pipeline's ODE, which
costs the same transformer calls); both decode to images. Prints the median wall time of each and their ratio
(ours / diffusers; the aim is <= 1.05). Unset, --num-steps, --guidance and --eta take the model family's defaults
(SD 1.x: 20 steps, 5.0, 1.0; SD 3.x: Flow-GRPO's 10, 4.5, 0.7), and --resolution the scripts' (SD 3.x: 512 px).

    python benchmarks/sampling.py                                   # tiny model, CPU
    python benchmarks/sampling.py --model sd15-random --batch 8     # SD 1.5's shapes, random weights (GPU)
    python benchmarks/sampling.py --model sd35m-random --batch 8    # SD 3.5 Medium's shapes, random weights (GPU)
"""

import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
import common  # noqa: E402
import runs  # noqa: E402


@dataclass
class Args:
    model: str = "tiny"
    """hub id, local folder, `tiny`, `sd15-random`, `tiny-sd3` or `sd35m-random`"""
    batch: int = 8
    """images per call"""
    num_steps: Optional[int] = None
    """sampling steps (unset: 20 on SD 1.x, 10 on SD 3.x)"""
    guidance: Optional[float] = None
    """classifier-free guidance scale (unset: 5.0 on SD 1.x, 4.5 on SD 3.x)"""
    eta: Optional[float] = None
    """DDIM eta, or Flow-GRPO's noise level on SD 3.x (unset: 1.0, or 0.7)"""
    resolution: Optional[int] = None
    """image side in pixels (unset: the model's native size on SD 1.x; Flow-GRPO's 512 on SD 3.x: common.latent_size)"""
    mixed_precision: str = "auto"
    """no, fp16, bf16, or auto (fp16 on GPU, no on CPU: common.resolve_precision)"""
    repeats: int = 5
    """timed calls of each (after one warm-up call)"""


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


if __name__ == "__main__":
    args = tyro.cli(Args)
    runs.fill_family_defaults(args, dict(num_steps=20, guidance=5.0, eta=1.0))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cli.exit_in_one_line(lambda: "nothing was written; run it again")  # Ctrl-C: one line
    precision = common.resolve_precision(args.mixed_precision, device)
    common.speed_flags(device)
    pipe = common.load_pipeline(args.model, device=device, mixed_precision=precision, lora_rank=0,
                                resolution=args.resolution)
    net = common.denoiser(pipe).requires_grad_(False)
    if precision != "no":  # inference only: the denoiser may be in the low precision too, as diffusers runs it
        net.to(common.DTYPES[precision])
    prompts = ["a photo of a cat"] * args.batch
    embeds = common.encode_prompts(pipe, prompts)
    neg = common.encode_prompts(pipe, [""])
    side = common.latent_side(pipe)  # the --resolution's latent, as the scripts sample
    shape = (args.batch, net.config.in_channels, side, side)
    latents = torch.randn(shape, generator=torch.Generator(device).manual_seed(0), device=device)

    def ours():
        with common.autocast(device, precision):
            common.sample(pipe, embeds, neg, num_steps=args.num_steps, guidance=args.guidance, eta=args.eta,
                          generator=torch.Generator(device).manual_seed(0), latents=latents)

    def theirs():
        if common.is_flow(pipe):  # the pipeline's ODE; its conditioning unpacked from ours
            (hidden, pooled), (neg_hidden, neg_pooled) = (common.unpack_flow_embeds(net, e)
                                                          for e in (embeds, neg.expand(args.batch, -1, -1)))
            kw = dict(prompt_embeds=hidden, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg_hidden,
                      negative_pooled_prompt_embeds=neg_pooled)
        else:
            kw = dict(prompt_embeds=embeds, negative_prompt_embeds=neg.expand(args.batch, -1, -1), eta=args.eta)
        with torch.no_grad(), common.autocast(device, precision):
            pipe(**kw, latents=latents, num_inference_steps=args.num_steps, guidance_scale=args.guidance,
                 height=side * pipe.vae_scale_factor, width=side * pipe.vae_scale_factor,
                 generator=torch.Generator(device).manual_seed(0), output_type="pt")

    times = {"ours": [], "diffusers": []}
    for name, fn in (("ours", ours), ("diffusers", theirs)):
        fn()  # warm-up
    for _ in range(args.repeats):  # interleaved, so drifts in machine load hit both alike
        times["ours"].append(timed(ours, device))
        times["diffusers"].append(timed(theirs, device))
    ours_s, theirs_s = statistics.median(times["ours"]), statistics.median(times["diffusers"])
    print(f"model={args.model} device={device} precision={precision} batch={args.batch} steps={args.num_steps} "
          f"resolution={side * pipe.vae_scale_factor} "
          f"cfg={args.guidance} eta={args.eta}")
    print(f"ours (with log-probs): {ours_s:.3f} s   diffusers pipeline: {theirs_s:.3f} s   "
          f"ratio: {ours_s / theirs_s:.3f}")
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
