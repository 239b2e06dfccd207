"""Tiny random VQ-Diffusion pipelines, saved by diffusers itself into a temp folder.

The layout of microsoft/vq-diffusion-ithq: vqvae (VQModel), transformer
(Transformer2DModel over num_vector_embeds, AdaLN on the timestep, geglu-approximate,
attention bias), text_encoder + tokenizer (CLIP, built locally), scheduler
(VQDiffusionScheduler) and learned_classifier_free_sampling_embeddings, learnable with
random non-zero values or not learnable (the zero-shot variant). Every parameter is
random, so zero-initialised layers cannot hide a bug.
"""
import os

import torch

from sd_fixtures import randomize, write_tokenizer

TINY = dict(codes=96, grid=4, heads=2, head_dim=8, layers=2, timesteps=10, text_dim=32)


def make_vq_components(folder, learned=True, seed=0, codes=None, grid=None, heads=None, head_dim=None,
                       layers=None, timesteps=None, text_dim=None, vae_channels=(8, 16), max_length=16):
    """Save a tiny random diffusers VQDiffusionPipeline under `folder`; return the folder path.

    codes: codebook size (the transformer has codes + 1 classes with the mask);
    grid: the token grid is grid x grid (the VQ-VAE's images are grid * 2^(levels-1) wide).
    """
    import diffusers
    from diffusers.pipelines.deprecated.vq_diffusion.pipeline_vq_diffusion import (
        LearnedClassifierFreeSamplingEmbeddings,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    p = dict(TINY)
    for key, value in dict(codes=codes, grid=grid, heads=heads, head_dim=head_dim, layers=layers,
                           timesteps=timesteps, text_dim=text_dim).items():
        if value is not None:
            p[key] = value
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    tok_dir = os.path.join(folder, "_tok")
    vocab = write_tokenizer(tok_dir, max_length=max_length)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir, local_files_only=True)
    text_encoder = randomize(CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab, hidden_size=p["text_dim"], intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=max_length, projection_dim=p["text_dim"],
        bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1, hidden_act="quick_gelu")), seed)
    levels = len(vae_channels)
    vqvae = randomize(diffusers.VQModel(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=tuple(vae_channels), layers_per_block=1,
        latent_channels=8, sample_size=p["grid"] * 2 ** (levels - 1), num_vq_embeddings=p["codes"],
        norm_num_groups=4, vq_embed_dim=6), seed + 1)
    transformer = randomize(diffusers.Transformer2DModel(
        num_attention_heads=p["heads"], attention_head_dim=p["head_dim"], num_layers=p["layers"],
        cross_attention_dim=p["text_dim"], attention_bias=True, sample_size=p["grid"],
        num_vector_embeds=p["codes"] + 1, activation_fn="geglu-approximate",
        num_embeds_ada_norm=p["timesteps"], norm_type="ada_norm"), seed + 2)
    scheduler = diffusers.VQDiffusionScheduler(num_vec_classes=p["codes"] + 1,
                                               num_train_timesteps=p["timesteps"])
    if learned:
        null = LearnedClassifierFreeSamplingEmbeddings(learnable=True, hidden_size=p["text_dim"], length=max_length)
        with torch.no_grad():
            null.embeddings.copy_(torch.randn(max_length, p["text_dim"], generator=torch.Generator().manual_seed(seed)))
    else:
        null = LearnedClassifierFreeSamplingEmbeddings(learnable=False)
    pipe = diffusers.VQDiffusionPipeline(vqvae=vqvae, text_encoder=text_encoder, tokenizer=tokenizer,
                                         transformer=transformer, scheduler=scheduler,
                                         learned_classifier_free_sampling_embeddings=null)
    pipe.save_pretrained(folder)
    return folder


def load_diffusers_pipeline(folder):
    """diffusers' VQDiffusionPipeline built from the folder's components, each loaded by its own
    class: diffusers' from_pretrained no longer resolves the deprecated null-embedding class."""
    import diffusers
    from diffusers.pipelines.deprecated.vq_diffusion.pipeline_vq_diffusion import (
        LearnedClassifierFreeSamplingEmbeddings,
    )
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = os.fspath(folder)
    pipe = diffusers.VQDiffusionPipeline(
        vqvae=diffusers.VQModel.from_pretrained(folder, subfolder="vqvae"),
        text_encoder=CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder"), local_files_only=True),
        tokenizer=CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer"), local_files_only=True),
        transformer=diffusers.Transformer2DModel.from_pretrained(folder, subfolder="transformer"),
        scheduler=diffusers.VQDiffusionScheduler.from_pretrained(folder, subfolder="scheduler"),
        learned_classifier_free_sampling_embeddings=LearnedClassifierFreeSamplingEmbeddings.from_pretrained(
            folder, subfolder="learned_classifier_free_sampling_embeddings"))
    pipe.set_progress_bar_config(disable=True)
    return pipe
