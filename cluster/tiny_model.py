"""The `tiny` model: the real ZImagePipeline architecture with tiny random weights, built offline.

Every component is the class the real Z-Image-Turbo uses (ZImageTransformer2DModel, a Qwen3 text encoder with a Qwen2
tokenizer, the 16-channel AutoencoderKL with the real scale factor 8, FlowMatchEulerDiscreteScheduler), only
narrower and shallower. It is saved with `save_pretrained` and served through `from_pretrained`, the same path real
weights take, so the service, the tests and the benchmarks exercise the real code without a download or a GPU.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

# Bump when the architecture below changes so caches built by older versions are rebuilt, not reused.
TINY_MODEL_VERSION = "v3"

# The pipeline calls apply_chat_template(..., enable_thinking=True); this template renders the same turn markers
# as Qwen3's without the thinking block.
_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _build(folder: Path, seed: int) -> None:
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    # 1. Tokenizer: byte-level BPE with no merges, so every UTF-8 byte is a token and any prompt encodes.
    vocab = {token: i for i, token in enumerate(_SPECIAL_TOKENS + sorted(ByteLevel.alphabet()))}
    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / "vocab.json").write_text(json.dumps(vocab))
        (Path(scratch) / "merges.txt").write_text("#version: 0.2\n")
        tokenizer = Qwen2Tokenizer(
            vocab_file=str(Path(scratch) / "vocab.json"),
            merges_file=str(Path(scratch) / "merges.txt"),
            unk_token=None,
            bos_token=None,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
        )
    tokenizer.chat_template = _CHAT_TEMPLATE
    # 2. Text encoder: Qwen3 (the real one is Qwen3-4B); its hidden size is the transformer's cap_feat_dim.
    text_encoder = Qwen3Model(
        Qwen3Config(
            vocab_size=len(vocab),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=1024,
        )
    )
    # 3. Transformer: head_dim 16 = sum(axes_dims), like the real 128 = 32 + 48 + 48.
    transformer = ZImageTransformer2DModel(
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=16,
        axes_dims=[8, 4, 4],
        axes_lens=[1024, 256, 256],
    )
    # 4. VAE: four blocks keep the real 8x spatial factor; 16 latent channels like the Flux VAE. No attention in the
    #    mid block: over every latent pixel it is quadratic in the image's area (half the CPU time of a 2048x2048
    #    image: 9.1 s with it, 4.8 s without), and four channels per block (decoding 2048x2048 takes 2.9 s with
    #    them, 5.7 s with eight). The simulated cards account the real VAE's memory either way.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[4, 4, 4, 4],
        layers_per_block=1,
        norm_num_groups=4,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    pipe = ZImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )
    pipe.save_pretrained(folder)


def ensure_tiny_model(root: Path, seed: int = 0) -> Path:
    """Return the folder of the tiny model under `root`, building it on first use.

    Several replicas may start at once: each builds into its own temporary folder and renames it into place, so a
    reader never sees a half-written model and the loser of the race just discards its copy.
    """
    folder = root / f"tiny-{TINY_MODEL_VERSION}"
    if (folder / "model_index.json").exists():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".tiny-", dir=root))
    try:
        _build(scratch, seed)
        try:
            os.rename(scratch, folder)
        except OSError:
            if not (folder / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return folder


# Adapters built for the tiny model (the embedded default's LoRA folder): name -> (rank, seed).
TINY_LORAS = {"tiny-ink": (4, 1), "tiny-glow": (8, 2)}


def build_tiny_lora(model_folder: Path, out_file: Path, rank: int = 4, seed: int = 1) -> Path:
    """A LoRA adapter for the tiny model's transformer, as a single safetensors file like those people share.

    peft adds rank-`rank` adapters to the attention projections; both factors are random (peft starts B at zero,
    which would leave images unchanged), so an image made with the adapter differs visibly from one without.
    """
    import torch
    from diffusers import ZImagePipeline, ZImageTransformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = ZImageTransformer2DModel.from_pretrained(model_folder, subfolder="transformer")
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                       target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    ZImagePipeline.save_lora_weights(out_file.parent, transformer_lora_layers=get_peft_model_state_dict(transformer),
                                     weight_name=out_file.name)
    return out_file


def ensure_tiny_loras(root: Path, model_folder: Path) -> Path:
    """The folder of the tiny model's adapters under `root` (TINY_LORAS), built on first use like the model."""
    folder = root / f"tiny-loras-{TINY_MODEL_VERSION}"
    if all((folder / f"{name}.safetensors").exists() for name in TINY_LORAS):
        return folder
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".tiny-loras-", dir=root))
    try:
        for name, (rank, seed) in TINY_LORAS.items():
            build_tiny_lora(model_folder, scratch / f"{name}.safetensors", rank, seed)
        try:
            os.rename(scratch, folder)
        except OSError:
            if not all((folder / f"{name}.safetensors").exists() for name in TINY_LORAS):
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return folder
