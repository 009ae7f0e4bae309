"""Configs as plain dataclasses. The CLIs turn absl flags into these; library code takes them.

Each dataclass's defaults ARE its recipe, and the one place they are written: the CLIs read their
flag defaults from these classes (micle_tf/cli/common.py), so `micle-pretrain` with no tuning
flag equals `PretrainConfig()` and `micle-finetune` equals `FinetuneConfig()`. Pretraining
follows SimCLR (LARS, lr 0.3 x batch/256, 10 warmup epochs, weight decay 1e-6); fine-tuning
follows SimCLR's fine-tuning (LARS, lr 0.16 x batch/256, no warmup, no weight decay, 30 epochs
at batch 128). Every field is a plain JSON value, so a config is written into each run's
model_dir and re-created from it (`from_dict`).
"""
import dataclasses
from typing import Optional

BACKBONE_DEPTHS = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101,
                   "resnet152": 152}


@dataclasses.dataclass
class ModelConfig:
    backbone: str = "resnet50"
    width_multiplier: int = 1
    sk_ratio: float = 0.0
    image_size: int = 224
    proj_out_dim: int = 128
    num_proj_layers: int = 3
    proj_hidden_dim: Optional[int] = None  # None = backbone feature width, as in SimCLR
    synchronized_bn: bool = False
    bn_momentum: float = 0.9

    @property
    def depth(self):
        if self.backbone not in BACKBONE_DEPTHS:
            raise ValueError(f"unknown backbone {self.backbone!r}; expected one of "
                             f"{sorted(BACKBONE_DEPTHS)}")
        return BACKBONE_DEPTHS[self.backbone]


@dataclasses.dataclass
class TrainConfig:
    """What every training run shares (pretraining and fine-tuning); the schedule defaults are
    the pretraining recipe's (FinetuneConfig overrides them)."""
    data_dir: str = ""
    model_dir: str = ""
    batch_size: int = 256
    train_steps: Optional[int] = None  # overrides train_epochs when set
    train_epochs: int = 100
    steps_per_epoch: Optional[int] = None  # default: train cases // batch (>= 1)
    learning_rate: float = 0.3
    learning_rate_scaling: str = "linear"  # optimizers.LR_SCALINGS
    warmup_epochs: float = 10.0
    weight_decay: float = 1e-6
    optimizer: str = "lars"  # optimizers.OPTIMIZERS
    momentum: float = 0.9
    strategy: str = "default"  # training.distribute.STRATEGIES
    tpu: Optional[str] = None
    mixed_precision: Optional[str] = None  # None (float32) | training.distribute.MIXED_PRECISION
    cache_decoded: bool = False  # keep decoded training cases in RAM (small data sets)
    seed: int = 0
    keep_checkpoints: int = 3
    verbose: int = 1
    train_split: str = "train"
    eval_split: str = "val"


@dataclasses.dataclass
class PretrainConfig(TrainConfig):
    method: str = "simclr"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    temperature: float = 0.1
    augment: str = "derm"
    # "device": the input pipeline crops/flips/rotates and draws the rest; colour jitter,
    # grayscale and blur run batched in the train step (GPU/TPU hosts short of CPU).
    augment_placement: str = "host"
    # None = the preset's default for model.image_size (augment.preset_settings).
    color_jitter_strength: Optional[float] = None
    crop_area_min: Optional[float] = None  # floor of the random crop's area fraction
    init_checkpoint: Optional[str] = None  # encoder weights to start from (stage 2)
    linear_probe: bool = True  # online probe when the train split has labels
    knn_monitor: bool = True  # kNN accuracy + same-case retrieval on eval_split per epoch
    tfds_name: Optional[str] = None  # stage 1 on a TFDS image dataset instead of records
    tfds_data_dir: Optional[str] = None


@dataclasses.dataclass
class FinetuneConfig(TrainConfig):
    # SimCLR's fine-tuning recipe (google-research/simclr, fine-tuning on ImageNet labels).
    batch_size: int = 128
    train_epochs: int = 30
    learning_rate: float = 0.16
    warmup_epochs: float = 0.0
    weight_decay: float = 0.0
    optimizer: str = "lars"
    init_from: str = "none"  # a pretrain model_dir | imagenet_simclr:PATH | none
    label_fraction: float = 1.0
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    ft_proj_selector: int = 0
    fine_tune_after_block: int = -1  # -1 all layers; 4 = linear evaluation (frozen encoder)
    uncertainty_policy: str = "ignore"
    label_smoothing: float = 0.0
    augment: str = "finetune"
    crop_area_min: Optional[float] = None  # None = the preset's crop floor (finetune: 0.5)
    level: str = "image"  # training examples are images; evaluation aggregates per case
    early_stopping_patience: Optional[int] = None  # epochs without val AUC gain


def to_dict(config):
    return dataclasses.asdict(config)


def from_dict(cls, values):
    """Re-creates a config (nested ModelConfig included) from `to_dict` output."""
    values = dict(values)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if "model" in values and isinstance(values["model"], dict):
        values["model"] = ModelConfig(**values["model"])
    return cls(**{k: v for k, v in values.items() if k in fields})
