"""The Stable Diffusion 1.5 architecture with random weights, as a diffusers folder, for the
benchmarks that time it (bench_sd15_gpu.py on a GPU, bench_sd15_cpu.py on the CPU).

SD 1.5's configs (runwayml/stable-diffusion-v1-5): the UNet (860M parameters), the CLIP
ViT-L/14 text encoder and the SD VAE; the weights are random (speed does not depend on
their values) and the tokenizer is the tests' small BPE vocabulary.
"""
import os

import torch

from sd_fixtures import write_tokenizer

UNET = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
            attention_head_dim=8, norm_num_groups=32,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
MAX_TOKENS = 77


def write_folder(root: str, *, sample_size: int, unet=None, text=None, vae=None, seed: int = 0) -> str:
    """A diffusers StableDiffusionPipeline folder at `root` (DPM-Solver++ scheduler, SD's betas),
    its UNet's sample_size `sample_size` (latent pixels: images of 8x that by default); unet /
    text / vae override the SD 1.5 configs (a tiny stand-in checks a harness)."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    vocab = write_tokenizer(os.path.join(root, "_tok"), max_length=MAX_TOKENS)
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(root, "_tok"), local_files_only=True)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=vocab, max_position_embeddings=MAX_TOKENS,
                                                bos_token_id=vocab - 2, eos_token_id=vocab - 1,
                                                pad_token_id=vocab - 1, projection_dim=768, **(text or TEXT)))
    unet = diffusers.UNet2DConditionModel(in_channels=4, out_channels=4, sample_size=sample_size, **(unet or UNET))
    vae = vae or VAE
    blocks = len(vae["block_out_channels"])
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=sample_size * 8,
                                  down_block_types=("DownEncoderBlock2D",) * blocks,
                                  up_block_types=("UpDecoderBlock2D",) * blocks, **vae)
    scheduler = diffusers.DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012,
                                                      beta_schedule="scaled_linear", steps_offset=1)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.save_pretrained(root)
    return root
