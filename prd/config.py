"""The typed config of a PRD run: every section's defaults are the reference's numbers
(docs/reference.md); presets in configs/ are thin YAML overlays on top.

    cfg = load(["configs/oracle.yaml"], ["train.steps=10"])
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from prd.background import BackgroundConfig
from prd.configio import load_config
from prd.losses import Ramp
from prd.student import StudentConfig
from prd.teacher_setup import TeachersConfig
from prd.triplane import FieldConfig
from renderers.cameras import CameraSampling
from renderers.marching import ISOSURFACE_METHODS
from renderers.mesh import MeshRenderConfig
from renderers.volume import VolumeConfig


def read_prompt_lines(path: str | Path, what: str) -> list[str]:
    """The non-blank lines of a UTF-8 text file, stripped; ValueError naming ``what`` if
    none, or the file and line of bytes that are not UTF-8."""
    prompts = []
    for i, raw in enumerate(Path(path).read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            raise ValueError(
                f"{what} {path}:{i}: bytes that are not UTF-8 ({raw[exc.start : exc.end]!r} at "
                f"column {exc.start + 1}); save the file as UTF-8"
            ) from None
        if line:
            prompts.append(line)
    if not prompts:
        raise ValueError(f"{what} {path} holds no prompts")
    return prompts


@dataclass
class PromptsConfig:
    """Where training prompts come from."""

    source: str | None = None
    """A curated prompt folder (``prd prompts curate`` output)."""
    file: str | None = None
    """A text file with one prompt a line (relative paths: to the working directory)."""
    prompts: list[str] = field(default_factory=list)
    """Inline training prompts."""
    shuffle: bool = True
    """Shuffle each epoch (deterministically from the run's seed)."""
    embed_cache: str | None = None
    """Folder of a text-embedding cache (sharded safetensors, keyed by encoder and
    prompt); None encodes every batch on the fly."""

    def __post_init__(self):
        given = [k for k in ("source", "file") if getattr(self, k) is not None]
        if len(given) + bool(self.prompts) > 1:
            raise ValueError("prompts: give one of prompts.source, prompts.file, prompts.prompts")
        if self.source is not None and not Path(self.source).is_dir():
            raise ValueError(f"prompts.source {self.source!r} is not a folder")
        if self.file is not None and not Path(self.file).is_file():
            raise ValueError(f"prompts.file {self.file!r} is not a file")

    def resolve(self) -> str | list[str]:
        """What the prompt stream reads: a curated folder (its shards checked against
        its manifest) or a list of prompts."""
        if self.source is not None:
            from prompts.curate import verify_shards

            verify_shards(self.source)
            return self.source
        if self.file is not None:
            return read_prompt_lines(self.file, "prompts.file")
        if not self.prompts:
            raise ValueError(
                "no training prompts: set prompts.source, prompts.file or prompts.prompts"
            )
        return list(self.prompts)


@dataclass
class TrainConfig:
    """The optimization loop."""

    steps: int = 15000
    """Optimizer steps (reference: 15k for the base prompt set, 30k at 1.7M prompts)."""
    batch_size: int = 2
    """Prompts (objects) per rank per micro-batch (reference: 2 per GPU on 8 GPUs)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (each runs all K progressive steps)."""
    progressive_steps: int = 4
    """K, student denoising steps per prompt; each is rendered and scored (reference: 4)."""
    optimizer: str = "adan"
    """"adan" (reference, pytorch-optimizer) or "adamw"."""
    lr: float = 2e-4
    """Learning rate (reference: 2e-4, constant)."""
    lr_scale: Ramp = field(default_factory=lambda: Ramp(1.0, 1.0, 0))
    """Multiplier of ``lr`` per optimizer step, e.g. a decay at the end of a run (reference:
    constant 1). A function of the step alone, so a resumed run continues it exactly."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value; 0 disables."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage, 1 or 2. ZeRO's non-finite gradient check is what skips a step
    after a NaN/Inf loss or gradient (so not 0); ZeRO-3 releases the field MLP's weights
    before the volume renderer's double backward (normals, eikonal) runs, so not 3."""
    precision: str = "fp32"
    """"fp32", or "bf16": frozen networks stored and run in bf16, trainable parameters and
    optimizer state fp32, the student under autocast (prd.precision). Whether bf16 pays on
    a CPU depends on the CPU (docs/distributed.md, "CPU notes")."""
    device: str = "auto"
    """"auto" (CUDA when present), "cpu" or "cuda"."""
    seed: int = 0
    """Base seed; rank r draws from seed + 1000 * r."""
    torch_threads: int = 0
    """CPU threads per process (torch.set_num_threads); 0 keeps torch's default. On a
    small shared CPU, 1 per rank avoids oversubscription."""
    eikonal: Ramp = field(default_factory=lambda: Ramp(1.0, 0.0, 20000))
    """Weight of the eikonal loss on the volume branch (reference: 1 -> 0 over 20k)."""
    sparsity: Ramp = field(default_factory=lambda: Ramp(1.0, 0.0, 20000))
    """Weight of the sparsity loss on the volume branch (reference: 1 -> 0 over 20k)."""
    volume_color_grad: Ramp = field(default_factory=lambda: Ramp(1.0, 0.01, 20000))
    """Scale of the colour gradient through the volume branch (reference: 1 -> 0.01)."""
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)
    """Constant background colour behind renders when background.learned is off; oracle
    teachers render their truth over it."""
    log_every: int = 10
    """Scalars to TensorBoard every N steps."""
    image_every: int = 200
    """Render grids to TensorBoard every N steps (0 disables)."""
    ckpt_every: int = 1000
    """Checkpoint (and export trainable weights) every N steps, and at the end."""
    keep_ckpts: int = 2
    """Complete checkpoints kept on disk."""
    max_nonfinite_in_row: int = 5
    """Stop the run after this many consecutive steps with a non-finite loss or gradient."""
    deepspeed_json: str | None = None
    """Extra DeepSpeed settings (JSON file) merged over the generated ones, e.g. offload."""
    collective_timeout: float = 1800.0
    """Seconds a collective (all-reduce, barrier) waits for the other ranks before the run
    fails, instead of hanging when a rank died unnoticed (torch's default is 30 min)."""
    # validation under ``prd eval``'s protocol (prd.evaluate.TrainingEval)
    eval_every: int = 0
    """Sample and score eval_prompts every N steps (CLIP score, R@1; 0 disables)."""
    eval_prompts: list[str] = field(default_factory=list)
    """Validation prompts, distinct; oracle prompts also get Chamfer, colour error, IoU."""
    eval_clip: str | None = None
    """Local transformers CLIPModel folder for eval_every (the paper's: ViT-B/32)."""

    def __post_init__(self):
        if self.eval_every < 0 or (self.eval_every and not (self.eval_prompts and self.eval_clip)):
            raise ValueError("train.eval_every >= 1 needs train.eval_prompts and train.eval_clip")
        if len(set(self.eval_prompts)) != len(self.eval_prompts):
            raise ValueError(f"train.eval_prompts must be distinct, got {self.eval_prompts}")
        for name in ("steps", "batch_size", "grad_accum", "progressive_steps", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.optimizer not in ("adan", "adamw"):
            raise ValueError(f"train.optimizer must be adan or adamw, got {self.optimizer!r}")
        if self.zero_stage not in (1, 2):
            raise ValueError(f"train.zero_stage must be 1 or 2, got {self.zero_stage}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"train.precision must be fp32 or bf16, got {self.precision!r}")
        if self.torch_threads < 0:
            raise ValueError(f"train.torch_threads must be >= 0, got {self.torch_threads}")
        if self.lr <= 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if self.ckpt_every < 1 or self.keep_ckpts < 1 or self.max_nonfinite_in_row < 1:
            raise ValueError("train.ckpt_every, keep_ckpts and max_nonfinite_in_row must be >= 1")
        if self.collective_timeout <= 0:
            raise ValueError(f"train.collective_timeout must be > 0, got {self.collective_timeout}")
        if not all(0.0 <= c <= 1.0 for c in self.background):
            raise ValueError(f"train.background must be 3 values in [0, 1], got {self.background}")
        if self.deepspeed_json is not None and not Path(self.deepspeed_json).is_file():
            raise ValueError(f"train.deepspeed_json {self.deepspeed_json!r} is not a file")


@dataclass
class SampleConfig:
    """One-call mesh sampling."""

    steps: int = 4
    """DDIM steps (the training K)."""
    grid: int = 160
    """Marching-cubes grid points per axis (reference: 160 at sampling)."""
    isosurface: str = "torch"
    """Marching cubes: "torch" (``renderers.marching``, on the sampler's device: no copy
    of the grid to the host) or "skimage" (the library, on the host)."""
    renoise: str = "ddim"
    """Between steps: "ddim" (deterministic, reference) or "fresh" (new noise, as training)."""
    format: str = "glb"
    """Default file format when the output names a folder: glb, obj or ply."""

    def __post_init__(self):
        if self.steps < 1 or self.grid < 8:
            raise ValueError(f"sample.steps must be >= 1 and sample.grid >= 8, got {self}")
        if self.isosurface not in ISOSURFACE_METHODS:
            raise ValueError(
                f"sample.isosurface must be one of {ISOSURFACE_METHODS}, got {self.isosurface!r}"
            )
        if self.renoise not in ("ddim", "fresh"):
            raise ValueError(f"sample.renoise must be ddim or fresh, got {self.renoise!r}")
        if self.format not in ("glb", "obj", "ply"):
            raise ValueError(f"sample.format must be glb, obj or ply, got {self.format!r}")


@dataclass
class Config:
    """A PRD run."""

    student: StudentConfig = dataclasses.field(default_factory=StudentConfig)
    field: FieldConfig = dataclasses.field(default_factory=FieldConfig)
    cameras: CameraSampling = dataclasses.field(default_factory=CameraSampling)
    volume: VolumeConfig = dataclasses.field(default_factory=VolumeConfig)
    mesh: MeshRenderConfig = dataclasses.field(default_factory=MeshRenderConfig)
    mesh_grid: int = 128
    """Marching-cubes grid points per axis in training (reference: 128)."""
    background: BackgroundConfig = dataclasses.field(default_factory=BackgroundConfig)
    teachers: TeachersConfig = dataclasses.field(default_factory=TeachersConfig)
    prompts: PromptsConfig = dataclasses.field(default_factory=PromptsConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)

    def __post_init__(self):
        if self.field.channels != self.student.triplane_channels:
            raise ValueError(
                f"field.channels ({self.field.channels}) must equal student.triplane_channels "
                f"({self.student.triplane_channels})"
            )
        if self.mesh_grid < 8:
            raise ValueError(f"mesh_grid must be >= 8, got {self.mesh_grid}")


def load(files: list[str | Path] | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML presets (in order) <- ``key=value`` overrides."""
    return load_config(Config, files, overrides)
