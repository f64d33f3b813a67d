"""The schema: every config key with its type, its default and one line of help, as dataclasses.

`Config` is train.py's config; `GanConfig` (gan_train.py) and `FinetuneConfig` (finetune.py) add one
section each. YAML files and the command line only override these defaults. Open sections (model,
loss, optim, sched) also take the keyword arguments of the thing they name; those land in the
section's `extra` dict.
"""
import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional, Union


def knob(default, help_text):
    """A schema field: its default and one line of help (shown by `--help`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help_text})
    return field(default=default, metadata={"help": help_text})


def section(cls, help_text):
    """A nested section."""
    return field(default_factory=cls, metadata={"help": help_text})


@dataclass
class DataCfg:
    name: str = knob(
        "digits", "dataset: digits, fashion_mnist, mnist, cifar10, csv, image_csv, image_folder, synthetic, sine")
    root: str = knob("data", "where datasets live (and are downloaded to)")
    download: bool = knob(True, "download torchvision datasets when missing (needs a network)")
    image_size: Optional[int] = knob(28, "side of the square images the model sees; null = the dataset's own")
    channels: Optional[int] = knob(None, "1 or 3 converts images (grayscale <-> RGB); null = the dataset's own")
    batch_size: int = knob(256, "per-process batch size; the global batch is batch_size x processes x grad_accum")
    eval_batch_size: Optional[int] = knob(None, "per-process evaluation batch; null = 2 x batch_size")
    num_workers: int = knob(2, "DataLoader worker processes (DataLoader path only)")
    loader: Literal["auto", "memory", "dataloader"] = knob(
        "auto", "memory: decode once and keep a uint8 tensor on the device; auto picks it when it fits memory_limit_gb")
    memory_limit_gb: float = knob(4.0, "largest decoded dataset the memory loader takes under loader=auto")
    cache: bool = knob(True, "cache decoded datasets on disk next to the data (refreshed when the source changes)")
    shuffle: bool = knob(True, "shuffle training data each epoch (order = f(seed, epoch))")
    augment: Literal["none", "crop", "crop_flip"] = knob(
        "none", "training augmentation, per batch on the device: random crop with padding, and horizontal flip")
    train_crop: Optional[int] = knob(
        None, "RandomResizedCrop + flip to this side for training, Resize(eval_resize) + CenterCrop(eval_crop) for "
              "evaluation, per image (torchvision's recipe, aspect ratio kept); null = square resize to image_size")
    crop_scale: list[float] = knob([0.08, 1.0], "RandomResizedCrop area range, as a fraction of the image")
    crop_ratio: list[float] = knob([0.75, 1.3333333], "RandomResizedCrop aspect-ratio (w/h) range")
    hflip: float = knob(0.5, "train_crop: probability of a horizontal flip")
    eval_resize: int = knob(256, "train_crop: shorter side of the evaluation resize (232 in the new recipe)")
    eval_crop: Optional[int] = knob(None, "train_crop: side of the evaluation centre crop; null = train_crop")
    interpolation: Literal["bilinear", "bicubic", "nearest"] = knob(
        "bilinear", "train_crop: resampling of the crops and the evaluation resize (antialiased)")
    auto_augment: Literal["none", "trivialaugment", "randaugment", "autoaugment"] = knob(
        "none", "train_crop: TrivialAugmentWide, RandAugment or AutoAugment (ImageNet policy), per image")
    ra_magnitude: int = knob(9, "randaugment: magnitude of each operation (0-30)")
    ra_num_ops: int = knob(2, "randaugment: operations per image")
    random_erasing: float = knob(0.0, "probability of RandomErasing per training image (torchvision's defaults)")
    mixup_alpha: float = knob(0.0, "mixup Beta(alpha, alpha) per batch (0 = off); targets become soft")
    cutmix_alpha: float = knob(0.0, "cutmix Beta(alpha, alpha) per batch (0 = off); with mixup one of them per batch")
    mix_switch_prob: float = knob(0.5, "with mixup and cutmix both on: probability a batch uses cutmix")
    decoder: Literal["auto", "torchcodec", "pil"] = knob(
        "auto", "JPEG decoder of the image files: torchcodec when installed (PIL for other formats), or pil")
    decode_on: Literal["auto", "workers", "device"] = knob(
        "auto", "train_crop: where TorchCodec decodes the JPEGs: device = batched on the training device "
                "(nvJPEG on a GPU), workers = in the DataLoader workers; auto = device on CUDA, else workers")
    val_labels: Optional[str] = knob(
        None, "image_folder: labels of a flat val/ folder (ImageNet layout): a CSV (file, label) or "
              "ILSVRC2012_validation_ground_truth.txt")
    class_index: Optional[str] = knob(
        None, "image_folder: class order and names: imagenet_class_index.json or LOC_synset_mapping.txt")
    normalize: Literal["dataset", "imagenet", "symmetric", "none"] = knob(
        "dataset", "per-channel statistics: dataset, imagenet, symmetric ([0,1] -> [-1,1], for tanh GANs), none")
    val_fraction: float = knob(0.2, "held-out fraction for datasets without an official validation split")
    classes: Optional[list[int]] = knob(None, "keep only these classes, relabelled 0..K-1 (e.g. [5, 6, 7, 8, 9])")
    csv: Optional[str] = knob(None, "csv: pixel CSV (label, pixel1..pixelN); image_csv: labels CSV")
    val_csv: Optional[str] = knob(None, "csv: validation pixel CSV; null = split off val_fraction")
    images: Optional[str] = knob(None, "image_csv: directory of the image files")
    split_list: Optional[str] = knob(None, "image_csv: text file listing the training images; null = all rows")
    val_list: Optional[str] = knob(
        None, "image_csv: text file listing validation images; null = rows not in split_list")
    image_col: str = knob("Image_index", "image_csv: column holding the file name")
    label_col: str = knob("label", "image_csv: column holding the label (integer or class name)")
    num_samples: Optional[int] = knob(None, "synthetic / sine: number of training samples (null = 10000 / 4000)")
    seq_len: int = knob(32, "sine: input sequence length")
    on_bad_sample: Literal["error", "skip"] = knob(
        "error", "an unreadable image stops the run (error) or is skipped and counted")


@dataclass
class ModelCfg:
    name: str = knob("fashion_cnn", "mlp, lenet, alexnet, fashion_cnn, convnet, lstm, resnet, or torchvision:<name>")
    num_classes: Optional[int] = knob(None, "outputs; null = from the data")
    in_channels: Optional[int] = knob(None, "input channels; null = from the data")
    init: dict = knob(
        {"name": "default"}, "weight init: {name, bias, conv: {...}, linear: {...}, norm: {...}, <scheme args>}")
    weights: Optional[str] = knob(
        None, "start from these weights: a state_dict .pt/.pth or a checkpoint of this package")
    head: Optional[list[int]] = knob(
        None, "hidden widths of an MLP head replacing the last linear layer, e.g. [400, 300]")
    sync_bn: bool = knob(False, "BatchNorm as SyncBatchNorm with several processes (statistics over the global "
                         "batch; GPUs only, refused on CPU: dist.sync_buffers still applies)")
    extra: dict = knob({}, "")
    OPEN = True


@dataclass
class LossCfg:
    name: str = knob("cross_entropy", "any torch.nn loss by snake_case name (cross_entropy, mse, ...) or our own")
    extra: dict = knob({}, "")
    OPEN = True


@dataclass
class OptimCfg:
    name: str = knob("adam", "any torch.optim optimizer by lower-case name (sgd, adam, adamw, lbfgs, ...)")
    lr: float = knob(1.0e-3, "base learning rate")
    weight_decay: float = knob(0.0, "weight decay of the default parameter group")
    param_groups: list[dict] = knob([], "[{params: 'fc.*', lr: 1e-2, weight_decay: 0}, ...]; first match wins")
    no_decay_norm_bias: bool = knob(False, "no weight decay on biases and normalization-layer parameters")
    extra: dict = knob({}, "")
    OPEN = True


@dataclass
class SchedCfg:
    name: str = knob("none", "none, step, multistep, exponential, cosine, linear, onecycle")
    warmup_epochs: float = knob(0.0, "linear warmup length in epochs (fractions allowed)")
    warmup_start: float = knob(0.0, "lr multiplier at the start of warmup")
    extra: dict = knob({}, "")
    OPEN = True


@dataclass
class TrainCfg:
    epochs: int = knob(20, "training epochs")
    max_steps: Optional[int] = knob(None, "stop after this many optimizer steps (null = no limit)")
    precision: Literal["no", "fp16", "bf16"] = knob("no", "mixed precision: fp16 uses a GradScaler, bf16 none")
    grad_accum: int = knob(1, "micro-batches per optimizer step (no gradient sync on the others)")
    clip_grad_norm: Optional[float] = knob(None, "clip the global gradient norm (on unscaled gradients)")
    channels_last: bool = knob(False, "use the channels_last memory format for 4-D activations")
    compile: bool = knob(False, "torch.compile the model")
    compile_mode: Optional[Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]] = knob(
        None, "torch.compile mode (null = torch's default)")
    compile_backend: str = knob("inductor", "torch.compile backend (inductor; eager / aot_eager to debug)")
    log_every: int = knob(50, "optimizer steps between progress / metrics.jsonl updates")
    eval_every_epochs: int = knob(1, "evaluate every N epochs (and always after the last)")
    on_nonfinite: Literal["stop", "skip"] = knob("stop", "a NaN/inf loss stops the run (stop) or its step is skipped")
    eval_only: bool = knob(False, "only evaluate the loaded weights (see checkpoint.resume / finetune.weights)")
    deterministic: bool = knob(False, "reproducible GPU runs: deterministic algorithms and cudnn, no cudnn "
                               "autotuning, no TF32, CUBLAS_WORKSPACE_CONFIG=:4096:8 (slower)")
    tf32: bool = knob(True, "allow TF32 matmuls/convolutions on Ampere+ GPUs (off: full fp32; "
                      "train.deterministic turns it off)")
    ema: Optional[float] = knob(None, "keep an exponential moving average of the weights with this decay per EMA "
                                "update (e.g. 0.9998; null = off): evaluated and saved beside them (val_ema/*)")
    ema_every: int = knob(1, "optimizer steps between EMA updates (torchvision's --model-ema-steps)")
    ema_warmup_epochs: float = knob(0.0, "the EMA copies the weights until this many epochs have passed (torchvision "
                                    "resets it during the lr warmup)")


@dataclass
class DistCfg:
    gpus: Optional[Union[str, int, list[int]]] = knob(
        None, "GPUs to use, e.g. '2,3' (sets CUDA_VISIBLE_DEVICES); null = all visible")
    backend: Literal["auto", "nccl", "gloo"] = knob("auto", "process-group backend; auto = nccl on GPU, gloo on CPU")
    deepspeed: Optional[str] = knob(None, "DeepSpeed JSON config for torchrun launches (configs/deepspeed/*.json)")
    timeout_s: int = knob(1800, "collective timeout in seconds (NCCL/gloo)")
    find_unused_parameters: bool = knob(False, "DDP option for models with unused parameters")
    sync_buffers: Literal["broadcast", "mean"] = knob(
        "broadcast", "before every evaluation and save, batch-norm statistics become rank 0's (broadcast, "
                     "as DDP) or the ranks' mean (mean, as timm's distribute_bn); integer buffers: rank 0's")


@dataclass
class CheckpointCfg:
    every_epochs: int = knob(1, "write a checkpoint every N epochs (0 = only at the end)")
    every_steps: Optional[int] = knob(None, "also write one every N optimizer steps")
    keep_last: int = knob(3, "periodic checkpoints kept besides last.pt and best.pt")
    resume: str = knob("auto", "auto (continue the run in its directory), never, or a checkpoint path")
    monitor: str = knob(
        "val/acc", "metric that picks best.pt (val/acc, val/loss, val/top5, val/mse, ...; none = no best.pt)")
    mode: Literal["auto", "max", "min"] = knob(
        "auto", "whether a larger monitor value is better; auto = min for loss/mse")


@dataclass
class WandbCfg:
    enabled: bool = knob(False, "log to Weights & Biases (rank 0 only)")
    project: Optional[str] = knob(None, "wandb project (null = the run name)")
    entity: Optional[str] = knob(None, "wandb entity (team or user)")
    mode: Literal["offline", "online", "disabled"] = knob(
        "offline", "offline runs can be synced later with `wandb sync`")
    tags: list[str] = knob([], "wandb tags")


@dataclass
class TensorBoardCfg:
    enabled: bool = knob(False, "write TensorBoard event files to <run>/tensorboard (rank 0; needs the "
                                "tensorboard package)")


@dataclass
class LogCfg:
    wandb: WandbCfg = section(WandbCfg, "Weights & Biases")
    tensorboard: TensorBoardCfg = section(TensorBoardCfg, "TensorBoard")
    plots: bool = knob(True, "write curves.png (and confusion.png) in the run directory")
    progress: bool = knob(True, "show a progress bar on rank 0")
    verbose: bool = knob(False, "every rank prints its own line (host, device, CUDA_VISIBLE_DEVICES); "
                                "false: one summary line from rank 0")


@dataclass
class Config:
    name: str = knob("default", "run name; outputs go to <output_dir>/<name>/")
    output_dir: str = knob("runs", "parent directory of run directories")
    seed: int = knob(42, "seed of init, data order, augmentation and dropout")
    data: DataCfg = section(DataCfg, "data")
    model: ModelCfg = section(ModelCfg, "model")
    loss: LossCfg = section(LossCfg, "loss")
    optim: OptimCfg = section(OptimCfg, "optimizer")
    sched: SchedCfg = section(SchedCfg, "learning-rate schedule")
    train: TrainCfg = section(TrainCfg, "training loop")
    dist: DistCfg = section(DistCfg, "distributed runtime")
    checkpoint: CheckpointCfg = section(CheckpointCfg, "checkpoints")
    log: LogCfg = section(LogCfg, "logging")


@dataclass
class GanCfg:
    latent_dim: int = knob(64, "size of the latent vector z (latent_dim x 1 x 1)")
    g_features: int = knob(64, "generator width (channels of its last hidden layer)")
    d_features: int = knob(64, "discriminator width (channels of its first layer)")
    sample_every: int = knob(200, "optimizer steps between sample grids in samples/")
    grid: int = knob(64, "images in each sample grid (a square number looks best)")
    ema: Optional[float] = knob(None, "decay of an EMA of the generator used for the grids, e.g. 0.999; null = off")
    real_label: float = knob(1.0, "target for real images in the D loss (0.9 = one-sided label smoothing)")


@dataclass
class GanConfig(Config):
    gan: GanCfg = section(GanCfg, "DCGAN")


@dataclass
class FinetuneCfg:
    weights: Optional[str] = knob(None, "IMAGENET1K_V1 / DEFAULT (torchvision weights), a .pth state dict, or a "
                                        "checkpoint / model.pt of train.py or finetune.py")
    head: Union[str, list[int]] = knob(
        "replace", "replace (a new linear layer), keep, or MLP hidden widths, e.g. [400, 300]")
    freeze: Optional[Union[str, list[str], dict]] = knob(
        None, "backbone, module-name patterns ['conv1', 'layer1.*'], or {children: 6, plus: ['layer3.0']}")
    freeze_bn: bool = knob(True, "frozen batch-norm layers stay in eval mode (their statistics do not move)")
    in_channels: Optional[int] = knob(None, "adapt the first convolution to this many input channels (1 = grayscale)")
    unfreeze_at_epoch: Optional[int] = knob(None, "at this epoch (1-based) the frozen layers join training")
    backbone_lr_mult: float = knob(0.1, "learning rate of the unfrozen layers = optim.lr x this")


@dataclass
class FinetuneConfig(Config):
    finetune: FinetuneCfg = section(FinetuneCfg, "transfer learning")


def all_keys(schema, prefix=""):
    """Every dotted key of `schema` ('data.name', 'optim.lr', ...), open sections' extras excluded."""
    keys = []
    for f in dataclasses.fields(schema):
        if f.name == "extra":
            continue
        tp = f.type
        if dataclasses.is_dataclass(tp):
            keys += all_keys(tp, prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys
