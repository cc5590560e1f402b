"""The job classes, generated from trainer/jobs/fields.py by ``python -m trainer.jobs.codegen``; do not edit."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from trainer.jobs.specs import CopierRules, Job, PairRules, _Spec, typed_spec
from trainer.jobs.vocabulary import LossType, LrSchedule, MixedPrecision, OptimizerName, OutsideMask, PredictionChoice, SavePrecision, TargetSet


@typed_spec('copier_pass')
@dataclass(frozen=True)
class PassSettings(_Spec):
    """Network and training settings of one copier pass (pass 1, the copier)."""

    network_dim: int = 16
    network_alpha: float = 16.0
    conv_dim: int = 0
    conv_alpha: float = 1.0
    blocks: list[str] = field(default_factory=list)
    steps: int = 500
    batch_size: int = 2
    lr: float = 0.0005
    optimizer: OptimizerName = 'AdamW'
    optimizer_args: str = ''
    lr_scheduler: LrSchedule = 'cosine'
    lr_warmup_steps: int = 0
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    timestep_min: int = 0
    timestep_max: int = 1000
    seed: int = 42


@typed_spec('difference_pass')
@dataclass(frozen=True)
class DifferencePass(PassSettings):
    """Settings of copier pass 2 (the difference); ``same_as_pass1`` reuses pass 1's training settings."""

    network_dim: int = 8
    network_alpha: float = 8.0
    lr: float = 0.0001
    same_as_pass1: bool = True


@typed_spec('standard')
@dataclass(frozen=True)
class StandardJob(Job):
    """Standard LoRA training: a folder of captioned images -> one LoRA."""

    mode: ClassVar[Literal['standard']] = 'standard'
    name: str = 'my_lora'
    output_dir: str = ''
    overwrite: bool = False
    save_every_n_steps: int = 0
    save_precision: SavePrecision = 'fp16'
    model: str = ''
    prediction: PredictionChoice = 'auto'
    mixed_precision: MixedPrecision = 'bf16'
    gradient_checkpointing: bool = False
    network_dim: int = 16
    network_alpha: float = 8.0
    conv_dim: int = 0
    conv_alpha: float = 1.0
    target_set: TargetSet = 'attn_mlp'
    train_text_encoder: bool = False
    blocks: list[str] = field(default_factory=list)
    init_lora: str = ''
    dataset_dir: str = ''
    trigger_word: str = ''
    caption_extension: str = '.txt'
    shuffle_captions: bool = False
    keep_tokens: int = 0
    caption_dropout: float = 0.0
    flip_horizontal: bool = False
    resolution: int = 512
    enable_buckets: bool = True
    bucket_no_upscale: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    steps: int = 1000
    batch_size: int = 1
    gradient_accumulation: int = 1
    lr: float = 0.0001
    text_encoder_lr: float = 5e-05
    optimizer: OptimizerName = 'AdamW'
    optimizer_args: str = ''
    lr_scheduler: LrSchedule = 'constant'
    lr_warmup_steps: int = 0
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    max_grad_norm: float = 1.0
    min_snr_gamma: float = 0.0
    noise_offset: float = 0.0
    timestep_min: int = 0
    timestep_max: int = 1000
    seed: int = 42
    sample_prompts: list[str] = field(default_factory=list)
    sample_every_n_steps: int = 0


@typed_spec('copier')
@dataclass(frozen=True)
class CopierJob(CopierRules, Job):
    """Copier two-pass difference: pass 1 learns image A (the copier), pass 2 learns A -> B on top of it.

    ``passes()`` gives the two passes as they run (pass 2 resolved through ``same_as_pass1``)."""

    mode: ClassVar[Literal['copier']] = 'copier'
    parts: ClassVar[dict[str, type]] = {'copier_pass': PassSettings, 'difference_pass': DifferencePass}
    name: str = 'my_difference'
    output_dir: str = ''
    overwrite: bool = False
    save_every_n_steps: int = 0
    save_precision: SavePrecision = 'fp16'
    model: str = ''
    prediction: PredictionChoice = 'auto'
    mixed_precision: MixedPrecision = 'bf16'
    gradient_checkpointing: bool = False
    target_set: TargetSet = 'attn_mlp'
    train_text_encoder: bool = False
    resolution: int = 512
    text_encoder_lr: float = 5e-05
    max_grad_norm: float = 1.0
    min_snr_gamma: float = 0.0
    noise_offset: float = 0.0
    image_a: list[str] = field(default_factory=list)
    image_b: list[str] = field(default_factory=list)
    prompt: str = ''
    copier_file: str = ''
    save_copier: bool = False
    swap_ab: bool = False
    train_opposite: bool = True
    use_mask: bool = False
    difference_mask: bool = False
    difference_threshold: int = 10
    difference_dilate: int = 8
    outside_mask: OutsideMask = 'keep'
    sample_prompts: list[str] = field(default_factory=list)
    sample_every_n_steps: int = 0
    copier_pass: PassSettings = field(default_factory=PassSettings)
    difference_pass: DifferencePass = field(default_factory=DifferencePass)


@typed_spec('lcm')
@dataclass(frozen=True)
class LcmJob(Job):
    """LCM distillation into a LoRA (LCM-LoRA) from a dataset or from prompts."""

    mode: ClassVar[Literal['lcm']] = 'lcm'
    name: str = 'my_lcm_lora'
    output_dir: str = ''
    overwrite: bool = False
    save_every_n_steps: int = 0
    save_precision: SavePrecision = 'fp16'
    model: str = ''
    prediction: PredictionChoice = 'auto'
    mixed_precision: MixedPrecision = 'bf16'
    gradient_checkpointing: bool = False
    network_dim: int = 64
    network_alpha: float = 64.0
    conv_dim: int = 64
    conv_alpha: float = 64.0
    target_set: TargetSet = 'all'
    blocks: list[str] = field(default_factory=list)
    init_lora: str = ''
    dataset_dir: str = ''
    resolution: int = 512
    steps: int = 1000
    batch_size: int = 4
    gradient_accumulation: int = 1
    lr: float = 0.0001
    optimizer: OptimizerName = 'AdamW'
    optimizer_args: str = ''
    lr_scheduler: LrSchedule = 'constant'
    lr_warmup_steps: int = 0
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    max_grad_norm: float = 1.0
    seed: int = 42
    prompts_file: str = ''
    prompts: list[str] = field(default_factory=list)
    num_generated_images: int = 200
    num_ddim_timesteps: int = 50
    guidance_scale: float = 3.0
    guidance_scale_max: float = 15.0
    loss_type: LossType = 'huber'
    huber_c: float = 0.001
    use_ema_target: bool = False
    ema_decay: float = 0.95
    sample_prompts: list[str] = field(default_factory=list)
    sample_every_n_steps: int = 0
    comparison_sheet: bool = True


@typed_spec('addift')
@dataclass(frozen=True)
class AddiftJob(PairRules, Job):
    """ADDifT difference LoRA: trained directly on the prediction difference of one or several pairs A -> B."""

    mode: ClassVar[Literal['addift']] = 'addift'
    name: str = 'my_addift'
    output_dir: str = ''
    overwrite: bool = False
    save_every_n_steps: int = 0
    save_precision: SavePrecision = 'fp16'
    model: str = ''
    prediction: PredictionChoice = 'auto'
    mixed_precision: MixedPrecision = 'bf16'
    gradient_checkpointing: bool = False
    network_dim: int = 4
    network_alpha: float = 4.0
    conv_dim: int = 0
    conv_alpha: float = 1.0
    target_set: TargetSet = 'attn_mlp'
    blocks: list[str] = field(default_factory=list)
    resolution: int = 512
    steps: int = 100
    batch_size: int = 1
    lr: float = 0.001
    optimizer: OptimizerName = 'AdamW'
    optimizer_args: str = ''
    lr_scheduler: LrSchedule = 'constant'
    lr_warmup_steps: int = 0
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    max_grad_norm: float = 1.0
    min_snr_gamma: float = 0.0
    timestep_min: int = 500
    timestep_max: int = 1000
    seed: int = 42
    image_a: list[str] = field(default_factory=list)
    image_b: list[str] = field(default_factory=list)
    prompt: str = ''
    swap_ab: bool = False
    use_mask: bool = False
    difference_mask: bool = False
    difference_threshold: int = 10
    difference_dilate: int = 8
    outside_mask: OutsideMask = 'keep'
    pair_prompts: list[str] = field(default_factory=list)
    addift_strength: float = 1.0
    sample_prompts: list[str] = field(default_factory=list)
    sample_every_n_steps: int = 0


@typed_spec('ileco')
@dataclass(frozen=True)
class IlecoJob(Job):
    """iLECO: a slider LoRA from two prompts alone (no images), moving source_prompt toward target_prompt."""

    mode: ClassVar[Literal['ileco']] = 'ileco'
    name: str = 'my_slider'
    output_dir: str = ''
    overwrite: bool = False
    save_every_n_steps: int = 0
    save_precision: SavePrecision = 'fp16'
    model: str = ''
    prediction: PredictionChoice = 'auto'
    mixed_precision: MixedPrecision = 'bf16'
    gradient_checkpointing: bool = False
    network_dim: int = 4
    network_alpha: float = 8.0
    conv_dim: int = 0
    conv_alpha: float = 1.0
    target_set: TargetSet = 'attn_mlp'
    blocks: list[str] = field(default_factory=list)
    resolution: int = 512
    steps: int = 300
    batch_size: int = 2
    lr: float = 0.0005
    optimizer: OptimizerName = 'AdamW'
    optimizer_args: str = ''
    lr_scheduler: LrSchedule = 'cosine'
    lr_warmup_steps: int = 0
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    max_grad_norm: float = 1.0
    seed: int = 42
    source_prompt: str = ''
    target_prompt: str = ''
    slider_scale: float = 1.0
    both_directions: bool = True
    denoise_steps: int = 20
    sample_prompts: list[str] = field(default_factory=list)
    sample_every_n_steps: int = 0
