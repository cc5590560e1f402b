"""ModelHandle over a diffusers StableDiffusion(XL)Pipeline, and offline loading by name or path."""
from __future__ import annotations

from pathlib import Path

import torch

from trainer.diffusion import schedules
from trainer.models import naming
from trainer.models.handle import (
    BaseModel, Cond, LoraTarget, ModelError, ModelHandle, TargetOptions, checkpoint_hashes, text_encoder_path_in_target_set,
    unet_path_in_target_set, weights_fingerprint,
)


def arch_of_pipeline(pipe) -> str:
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    return "sd2" if pipe.unet.config.cross_attention_dim == 1024 else "sd1"


def _prediction_of(config) -> str:
    kind = config.get("prediction_type", "epsilon")
    if kind not in ("epsilon", "v_prediction"):
        raise ModelError(f"prediction type {kind!r} is not supported (epsilon or v_prediction)")
    return "v" if kind == "v_prediction" else "eps"


class DiffusersHandle(ModelHandle):
    """A loaded diffusers pipeline. Training happens on its modules in place (no copy)."""

    def __init__(self, pipe, prediction: str | None = None):
        super().__init__()
        self.pipe = pipe
        self.arch = arch_of_pipeline(pipe)
        self.prediction = prediction or _prediction_of(pipe.scheduler.config)
        self.alphas_cumprod = schedules.alphas_cumprod_from_scheduler_config(dict(pipe.scheduler.config))
        self.device = pipe.unet.device
        self.dtype = pipe.unet.dtype
        self._layout = naming.UNetLayout.from_config(pipe.unet.config)
        self.vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        self._identity: str | None = None
        self._base_model: BaseModel | None = None
        for module in self.base_modules():
            module.requires_grad_(False)

    #: What the pipeline was loaded from ('demo', a folder, a checkpoint file); set by ``load_handle``.
    source: str = ""

    def base_model(self) -> BaseModel:
        if not self.source:
            return BaseModel()
        path = Path(self.source).expanduser()
        if not path.is_file():
            return BaseModel(path.name if self.source != "demo" else "demo")
        if self._base_model is None:            # hashing a 2-7 GB file takes seconds: once per handle
            self._base_model = BaseModel(path.stem, *checkpoint_hashes(str(path)))
        return self._base_model

    def base_modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.pipe.unet, self.pipe.vae, self.pipe.text_encoder,
                            getattr(self.pipe, "text_encoder_2", None)) if m is not None]

    @property
    def unet(self) -> torch.nn.Module:
        return self.pipe.unet

    @property
    def unet_layout(self) -> naming.UNetLayout:
        return self._layout

    def text_encoders(self) -> list[tuple[str, torch.nn.Module]]:
        if self.arch == "sdxl":
            return [("lora_te1_", self.pipe.text_encoder), ("lora_te2_", self.pipe.text_encoder_2)]
        return [("lora_te_", self.pipe.text_encoder)]

    # -- conditioning --------------------------------------------------------------------------

    def _token_chunks(self, tokenizer, texts: list[str]) -> torch.Tensor:
        """Token ids [B, chunks, L]: A1111 splits long prompts into chunks of L-2 tokens, each wrapped
        in BOS ... EOS and padded; every prompt in a batch gets the same number of chunks."""
        length = tokenizer.model_max_length
        body = length - 2
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        ids = [tokenizer(t, add_special_tokens=False, truncation=False).input_ids for t in texts]
        n_chunks = max(1, max((len(i) + body - 1) // body for i in ids))
        rows = []
        for tokens in ids:
            chunks = []
            for c in range(n_chunks):
                part = tokens[c * body:(c + 1) * body]
                chunk = [bos] + part + [eos]
                chunks.append(chunk + [pad] * (length - len(chunk)))
            rows.append(chunks)
        return torch.tensor(rows, dtype=torch.long)

    def encode_prompts(self, texts: list[str], size: tuple[int, int]) -> Cond:
        pipe = self.pipe
        device = self.device
        if self.arch != "sdxl":
            ids = self._token_chunks(pipe.tokenizer, texts)
            b, c, n = ids.shape
            hidden = pipe.text_encoder(ids.view(b * c, n).to(device))[0]
            return Cond(hidden.reshape(b, c * n, -1))
        # SDXL as A1111's sgm conditioner: penultimate hidden states of CLIP-L and OpenCLIP-G
        # (no final norm), concatenated; pooled OpenCLIP-G from the first chunk; size ids in pixels.
        ids1 = self._token_chunks(pipe.tokenizer, texts)
        ids2 = self._token_chunks(pipe.tokenizer_2, texts)
        b, c, n = ids1.shape
        out1 = pipe.text_encoder(ids1.view(b * c, n).to(device), output_hidden_states=True)
        out2 = pipe.text_encoder_2(ids2.view(b * c, n).to(device), output_hidden_states=True)
        hidden = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
        pooled = out2[0].view(b, c, -1)[:, 0]
        h, w = size
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=hidden.dtype, device=device).repeat(b, 1)
        return Cond(hidden.reshape(b, c * n, -1), pooled, time_ids)

    # -- latents ---------------------------------------------------------------------------------

    def _vae_dtype(self) -> torch.dtype:
        vae = self.pipe.vae
        # SDXL's VAE overflows in fp16; diffusers flags it with force_upcast.
        if vae.dtype == torch.float16 and vae.config.get("force_upcast", False):
            return torch.float32
        return vae.dtype

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        dtype = self._vae_dtype()
        with _temporarily_cast(vae, dtype):
            # The posterior mean, so that cached latents are deterministic.
            latents = vae.encode(pixels.to(self.device, dtype)).latent_dist.mean
        shift = vae.config.get("shift_factor") or 0.0
        return ((latents - shift) * vae.config.scaling_factor).float()

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        dtype = self._vae_dtype()
        shift = vae.config.get("shift_factor") or 0.0
        with _temporarily_cast(vae, dtype):
            return vae.decode((latents / vae.config.scaling_factor + shift).to(self.device, dtype)).sample.float()

    def predict(self, latents: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        extra = {}
        if self.arch == "sdxl":
            extra["added_cond_kwargs"] = {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
        return self.pipe.unet(latents, t, encoder_hidden_states=cond.crossattn, **extra).sample

    supports_gradient_checkpointing = True

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        # Non-reentrant checkpoints (diffusers, transformers) pass gradients to the LoRA hooks' parameters
        # even though the frozen base weights and inputs need none.
        unet = self.pipe.unet
        unet.enable_gradient_checkpointing() if enabled else unet.disable_gradient_checkpointing()
        for _, encoder in self.text_encoders():
            if enabled:
                encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            else:
                encoder.gradient_checkpointing_disable()

    # -- LoRA targets ----------------------------------------------------------------------------

    def lora_targets(self, options: TargetOptions) -> list[LoraTarget]:
        targets = []
        for path, module in self.pipe.unet.named_modules():
            if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            if not unet_path_in_target_set(path, options.target_set):
                continue
            block = naming.block_id_of_ldm_path(naming.unet_diffusers_to_ldm(path, self._layout))
            if options.blocks and block not in options.blocks:
                continue
            targets.append(LoraTarget(naming.unet_kohya_key(path, self.arch, self._layout), module, block))
        if options.text_encoder:
            for prefix, encoder in self.text_encoders():
                for path, module in encoder.named_modules():
                    if isinstance(module, torch.nn.Linear) and text_encoder_path_in_target_set(path, options.target_set):
                        targets.append(LoraTarget(naming.text_encoder_kohya_key(path, prefix), module, "BASE"))
        return targets

    @property
    def identity(self) -> str:
        """Changes with the VAE and text-encoder weights (a cheap fingerprint, computed once)."""
        if self._identity is None:
            self._identity = weights_fingerprint(self.arch, [self.pipe.vae] + [m for _, m in self.text_encoders()])
        return self._identity


class _temporarily_cast:
    def __init__(self, module: torch.nn.Module, dtype: torch.dtype):
        self.module, self.dtype, self.original = module, dtype, module.dtype

    def __enter__(self):
        if self.dtype != self.original:
            self.module.to(self.dtype)

    def __exit__(self, *exc):
        if self.dtype != self.original:
            self.module.to(self.original)


def load_pipeline(model: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """``demo``, a diffusers folder or a single-file ``.safetensors`` checkpoint -> pipeline, offline."""
    if model == "demo":
        from trainer.models.demo import load_pipeline as load_demo
        return load_demo(device=device, dtype=dtype)
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelError(f"{path}: not a diffusers model folder (no model_index.json)")
        import json

        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
        cls_name = json.loads((path / "model_index.json").read_text()).get("_class_name", "")
        cls = StableDiffusionXLPipeline if "XL" in cls_name else StableDiffusionPipeline
        kwargs = {} if cls is StableDiffusionXLPipeline else {"safety_checker": None, "requires_safety_checker": False}
        try:
            pipe = cls.from_pretrained(path, torch_dtype=dtype, local_files_only=True, **kwargs)
        except (OSError, ValueError) as e:
            raise ModelError(f"{path}: cannot load the diffusers model offline ({e})") from None
        return pipe.to(device)
    if path.is_file():
        from trainer.models.single_file import load_single_file
        return load_single_file(path, dtype=dtype, device=device)
    raise ModelError(f"model {model!r} not found: give 'demo', a diffusers folder or a .safetensors checkpoint")


def load_handle(model: str, *, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                prediction: str | None = None) -> DiffusersHandle:
    from trainer.device import default_device
    handle = DiffusersHandle(load_pipeline(model, device=device or default_device(), dtype=dtype), prediction)
    handle.source = model
    return handle
