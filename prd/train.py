"""``prd train``: progressive rendering distillation (the paper's Algorithm 1).

One optimizer step, for each micro-batch of prompts:
  1. prompts for this rank from the stream; text embeddings from the frozen text encoder
  2. for k = 1..K (timesteps t_1 > ... > t_K):
     a. re-noise: pure noise at k = 1, else the previous clean latent x0 with fresh noise
     b. student: eps -> x0 latents -> VAE decoder -> geometry and texture triplanes
     c. fresh cameras (4 views per object)
     d. volume branch: NeuS patch render; mesh branch: marching cubes + rasterizer
     e. losses: every teacher on every branch, eikonal + sparsity on the volume branch
        (each teacher's gradient w.r.t. the renders is taken right after its call, so
        no teacher graph lives until the backward: ``prd.branches.score_branches``)
     f. backward of the step's loss; DeepSpeed divides it by its accumulation steps
        (K x grad_accum), which is the paper's 1/K; x0 is detached for step k + 1
  3. one optimizer step (DeepSpeed at the accumulation boundary), at the step's learning
     rate train.lr x train.lr_scale (set before the step's first backward)
then logging, evaluation (train.eval_every) and checkpoints. Nothing else runs per step.

Besides TensorBoard (``RUN/tb``), rank 0 appends one JSON object a line per step to
``RUN/metrics.jsonl``: ``{"step", "loss", "losses", "grad_norm", "lr", "seconds",
"nonfinite_total"}``; a non-finite value is written as ``NaN`` / ``Infinity`` (Python's
``json`` reads them). A resumed run first drops the lines past its checkpoint's step, so
the file always holds one line per step of the run's history. Every train.eval_every
steps the line also holds ``"eval"``: the scores of ``prd.evaluate.TrainingEval``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from prd import checkpoint, distributed, precision
from prd.branches import render_branches, score_branches
from prd.config import Config, TrainConfig, load
from prd.configio import load_config_text, to_dict, to_yaml
from prd.evaluate import TrainingEval
from prd.logs import RunLogger
from prd.model import PRDModel, build_model
from prd.progressive import add_noise, progressive_timesteps
from prd.student import check_base
from prd.teacher_setup import StudentBase, build_teachers, check_teachers
from prd.weights import save_weights
from prompts.embed_cache import EmbeddingCache
from prompts.stream import PromptStream
from renderers.cameras import sample_cameras


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (e.g. too many non-finite losses); checkpoints are intact."""


def _resume_value(text: str) -> str:
    if text != "auto":
        import argparse

        raise argparse.ArgumentTypeError(
            f"takes nothing or 'auto', got {text!r} (put key=value overrides before --resume)"
        )
    return text


def add_arguments(p) -> None:
    p.add_argument("--config", action="append", default=[], help="YAML preset (repeatable)")
    p.add_argument("--out", required=True, help="run folder (checkpoints, logs, exports)")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        type=_resume_value,
        help="continue from the run's last whole checkpoint; --resume auto: continue when "
        "there is one, else start (what a restarting launcher passes)",
    )
    p.add_argument("overrides", nargs="*", help="config overrides key=value")


def run(args) -> int:
    cfg = load(args.config, args.overrides)
    try:
        summary = train(cfg, Path(args.out), resume=args.resume)
    except TrainingStopped as exc:
        print(f"prd train: stopped: {exc}")
        return 3
    print(json.dumps(summary))
    return 0


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """The DeepSpeed settings of a run; the user's JSON may add keys, not change ours."""
    t = cfg.train
    accum = t.progressive_steps * t.grad_accum
    ds = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": t.batch_size * accum * world_size,
        "zero_optimization": {"stage": t.zero_stage},
        # never DeepSpeed's bf16 mode, which casts the trainable parameters too: under
        # train.precision bf16 only the frozen networks are bf16 (prd.precision)
        "bf16": {"enabled": False},
        "gradient_clipping": t.grad_clip,
        "steps_per_print": 10**9,
        # Adan (pytorch-optimizer) is not on DeepSpeed's list of ZeRO-tested optimizers; it
        # keeps plain per-parameter state, which ZeRO partitions like Adam's.
        "zero_allow_untested_optimizer": True,
        "wall_clock_breakdown": False,
    }
    if t.deepspeed_json:
        extra = json.loads(Path(t.deepspeed_json).read_text())
        clash = sorted(set(extra) & set(ds))
        if clash:
            raise ValueError(
                f"{t.deepspeed_json} sets {clash}, which train.* owns; set them in the config"
            )
        ds.update(extra)
    return ds


def reaching_every_parameter(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """``loss`` plus 0 x one element of each parameter: the same value and gradients, but
    every parameter gets a gradient (zero where the loss does not reach it) on every rank.

    ZeRO packs the gradients that arrive into buckets and reduces them across ranks; a
    parameter that one rank's loss skips (the deformation MLP, when all of that rank's
    meshes come out empty) shifts that rank's buckets and the reduction fails with a size
    mismatch."""
    anchor = sum(p.reshape(-1)[0] for p in params)
    return loss + 0.0 * anchor


def regularization(regs: dict[str, torch.Tensor], t: TrainConfig, step: int) -> torch.Tensor:
    """The volume branch's eikonal and sparsity terms weighted by their ramps at ``step``;
    a term whose weight is 0 is left out, so nothing backpropagates through it."""
    total = next(iter(regs.values())).new_zeros(())
    for name, ramp in (("eikonal", t.eikonal), ("sparsity", t.sparsity)):
        if ramp.at(step) > 0:
            total = total + ramp.at(step) * regs[name]
    return total


def make_engine(cfg: Config, model: torch.nn.Module, world_size: int):
    """(DeepSpeed engine, trainable parameters) of ``model``: the parameters that require
    gradients, ``make_optimizer``'s optimizer and ``deepspeed_config``'s ZeRO settings.
    Call after the process group exists (``prd.distributed.setup``)."""
    import deepspeed

    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=trainable,
        optimizer=make_optimizer(cfg, trainable),
        config=deepspeed_config(cfg, world_size),
    )
    return engine, trainable


def make_optimizer(cfg: Config, params):
    t = cfg.train
    if t.optimizer == "adan":
        from pytorch_optimizer import Adan

        # the reference's Adan: betas (0.98, 0.92, 0.99), eps 1e-15 (the library's is 1e-8)
        return Adan(
            params, lr=t.lr, betas=(0.98, 0.92, 0.99), eps=1e-15, weight_decay=t.weight_decay
        )
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)


def make_stream(cfg: Config, info: distributed.DistInfo) -> PromptStream:
    return PromptStream(
        cfg.prompts.resolve(),
        cfg.train.batch_size,
        rank=info.rank,
        world_size=info.world_size,
        seed=cfg.train.seed,
        shuffle=cfg.prompts.shuffle,
    )


def _flat(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_resumable(saved_yaml: str, cfg: Config, run_dir: Path) -> None:
    """A resumed run must be the same run: only train.steps and logging may change."""
    saved = load_config_text(Config, saved_yaml)
    free = ("steps", "log_every", "image_every", "ckpt_every", "keep_ckpts", "collective_timeout")
    free += ("eval_every", "eval_prompts", "eval_clip")  # evaluation leaves training alone
    for name in free:
        setattr(saved.train, name, getattr(cfg.train, name))
    old, new = _flat(to_dict(saved)), _flat(to_dict(cfg))
    diff = [k for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]
    if diff:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:5])
        raise ValueError(
            f"--resume: the config differs from {run_dir / 'config.yaml'} ({shown}); only "
            f"train.{{{','.join(free)}}} may change on resume; start a new run folder instead"
        )


def check_run_dir(cfg: Config, run_dir: Path, resume: bool | str) -> int | None:
    """Fail before any heavy work if ``run_dir`` does not fit ``resume`` (True, False or
    "auto"); returns the checkpoint step to resume from, or None to start. Read-only, so
    every rank runs it and all of them fail together."""
    done = checkpoint.latest_step(run_dir)
    if resume == "auto":
        resume = done is not None
    if not resume:
        if done is not None:
            raise ValueError(
                f"{run_dir} already holds a run (checkpoint of step {done}); pass --resume "
                "or use a new folder"
            )
        return None
    cfg_file = run_dir / "config.yaml"
    if done is None or not cfg_file.is_file():
        raise FileNotFoundError(
            f"--resume: {run_dir} holds no complete checkpoint and config.yaml to resume from"
        )
    check_resumable(cfg_file.read_text(), cfg, run_dir)
    return checkpoint.resumable_step(run_dir, log=distributed.log_main)


def encode_text(model: PRDModel, cache: EmbeddingCache | None, prompts, device) -> torch.Tensor:
    """(B, 77, C) embeddings of the student's frozen text encoder, through the cache if any."""
    if cache is None:
        return model.student.encode_text(prompts)
    return cache.get_or_compute(prompts, model.student.encode_text).to(device)


def student_base(model: PRDModel, cfg: Config, cache, device) -> StudentBase:
    """What an SD teacher on the student's base folder borrows: the student's UNet run as
    its base (adapters off) and its prompt encoding (through the embedding cache)."""
    student = model.student
    return StudentBase(
        folder=cfg.student.pretrained,
        unet=student.unet,
        text_encoder=student.text_encoder,
        unet_context=student.base_unet,
        text_fn=lambda prompts: encode_text(model, cache, prompts, device),
    )


def train(cfg: Config, run_dir: Path, resume: bool | str = False) -> dict:
    """Run (or resume) distillation into ``run_dir``; returns a summary of the last step.
    resume: False (a new run), True (continue; fails without a checkpoint) or "auto"
    (continue when the folder holds a checkpoint, else start)."""
    # fail before any process group or model exists: run folder, prompts, weight folders
    run_dir = Path(run_dir)
    cfg.prompts.resolve()
    resume_step = check_run_dir(cfg, run_dir, resume)
    check_base(cfg.student)
    check_teachers(cfg.teachers, cfg.student.pretrained)
    evaluator = TrainingEval.from_config(cfg.train)  # None unless train.eval_every
    if cfg.train.torch_threads:
        torch.set_num_threads(cfg.train.torch_threads)
    info = distributed.setup(cfg.train.device, timeout=cfg.train.collective_timeout)

    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.write_atomic(run_dir / "config.yaml", to_yaml(cfg))
        if resume_step is not None:
            checkpoint.set_aside_damaged(run_dir, resume_step)
    distributed.barrier()

    torch.manual_seed(cfg.train.seed + 1000 * info.rank)
    gen = torch.Generator().manual_seed(cfg.train.seed + 1000 * info.rank)
    # the same base weights on every rank, and the ones ``prd sample`` rebuilds
    frozen = precision.frozen_dtype(cfg.train.precision)
    model: PRDModel = build_model(cfg, device=info.device, dtype=frozen, seed=cfg.train.seed)
    cache = None
    if cfg.prompts.embed_cache is not None:
        cache = EmbeddingCache(cfg.prompts.embed_cache, model.student.text_encoder_id())
    teachers = build_teachers(
        cfg.teachers,
        cfg.train.background,
        cfg.cameras.n_views,
        device=info.device,
        student=student_base(model, cfg, cache, info.device),
        frozen_dtype=frozen,
    )
    precision.check_trainable_fp32(model)
    engine, trainable = make_engine(cfg, model, info.world_size)
    stream = make_stream(cfg, info)
    start, nonfinite_in_row, nonfinite_total = 0, 0, 0
    if resume_step is not None:
        state = checkpoint.load_training_state(engine, run_dir, info.rank, resume_step)
        start = state["step"]
        checkpoint.restore_position(state, gen, stream, info.rank, cfg.train.seed)
        nonfinite_in_row, nonfinite_total = state["nonfinite_in_row"], state["nonfinite_total"]

    t_cfg = cfg.train
    ab = model.student.alphas_cumprod.to(info.device)
    timesteps = progressive_timesteps(t_cfg.progressive_steps)
    background = torch.tensor(t_cfg.background, device=info.device)
    logger = RunLogger(run_dir, info.is_main, start, t_cfg.steps, log_every=t_cfg.log_every)
    if info.is_main:
        checkpoint.truncate_metrics(run_dir, start)
    last: dict = {}

    for step in range(start, t_cfg.steps):
        t0 = time.perf_counter()
        lr = t_cfg.lr * t_cfg.lr_scale.at(step)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        losses: dict[str, float] = {}
        images = {}
        log_images = bool(t_cfg.image_every) and (step + 1) % t_cfg.image_every == 0
        step_finite = True
        for _ in range(t_cfg.grad_accum):
            # 1. prompts and their embeddings (frozen text encoder)
            prompts = stream.next_batch()
            text = encode_text(model, cache, prompts, info.device)
            b, planes = len(prompts), cfg.student.planes
            size = cfg.student.resolved_latent_size()
            latent_shape = (b * planes, 4, size, size)
            backdrop = model.backdrop(prompts, text, background)
            x0_prev = None
            # 2. K progressive steps
            for k, t_k in enumerate(timesteps):
                # 2a. re-noise the last clean latent to t_k (pure noise at k = 1)
                noise = torch.randn(latent_shape, generator=gen).to(info.device)
                t = torch.full((b * planes,), t_k, dtype=torch.long, device=info.device)
                z_t = noise if x0_prev is None else add_noise(x0_prev, noise, t, ab)
                # 2b. student: x0 latents and triplanes
                with precision.autocast(t_cfg.precision, info.device):
                    x0, geometry, texture = engine(z_t, t, text)
                field = model.field(geometry, texture)
                # 2c. fresh cameras
                cams = sample_cameras(b, cfg.cameras, gen, device=info.device)
                # 2d. the two renders
                branches = render_branches(field, cams, cfg, gen, backdrop, step)
                # 2e. teachers on every branch (each teacher's gradient w.r.t. the renders
                # taken at once, freeing its graph; under teachers.offload teacher by
                # teacher, each on the device only for its calls), regularizers on the
                # volume branch
                scores = score_branches(branches, teachers, prompts, step, gen,
                                        keep_outputs=log_images,
                                        offload=cfg.teachers.offload)  # fmt: skip
                for (name, branch), value in scores.losses.items():
                    losses[f"{name}/{branch}/k{k + 1}"] = value.item()
                for (name, branch), g in scores.outputs.items():
                    # a latent teacher decodes its target to show it
                    images[(branch, k, name)] = (branches[branch].views, g.target)
                regs = branches["volume"].regularizers
                for name, value in regs.items():
                    losses[f"{name}/k{k + 1}"] = value.item()
                reg_k = regularization(regs, t_cfg, step)
                loss_k = scores.loss + reg_k
                value_k = scores.value + reg_k.detach()
                losses[f"total/k{k + 1}"] = value_k.item()
                if not torch.isfinite(value_k):
                    # Backpropagated anyway: ZeRO's non-finite gradient check then skips the
                    # optimizer step and clears the gradients (asserted in the tests).
                    step_finite = False
                # 2f. backward (scaled 1/K by DeepSpeed) and detach for the next step
                engine.backward(reaching_every_parameter(loss_k, trainable))
                engine.step()
                x0_prev = x0.detach()
        # 3. the optimizer step happened at the accumulation boundary above, unless ZeRO
        # found a non-finite gradient on any rank (then it skipped it on all ranks, which
        # thus count the skip, and stop, together)
        applied = engine.was_step_applied()
        if applied and not step_finite:
            raise RuntimeError(
                f"step {step + 1}: a non-finite loss reached an applied optimizer step; "
                f"ZeRO stage {t_cfg.zero_stage} did not skip it"
            )
        if applied:
            nonfinite_in_row = 0
        else:
            nonfinite_in_row += 1
            nonfinite_total += 1
        # None when DeepSpeed skips the norm; inf after a skipped (non-finite) step
        grad_norm = engine.get_global_grad_norm()
        last = {
            "step": step + 1,
            "loss": sum(v for k, v in losses.items() if k.startswith("total/")),
            "nonfinite_total": nonfinite_total,
        }
        scalars = {
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "lr": lr,
            "seconds": time.perf_counter() - t0,
            "nonfinite_total": nonfinite_total,
        }
        logger.log_step(step + 1, losses, **scalars)
        if info.is_main:
            evals = evaluator(step + 1, model, cfg.sample, logger.writer) if evaluator else {}
            checkpoint.append_metrics(run_dir, {**last, "losses": losses, **scalars, **evals})
        if log_images:
            logger.log_images(step + 1, images)
        if nonfinite_in_row >= t_cfg.max_nonfinite_in_row:
            logger.close()
            raise TrainingStopped(
                f"{nonfinite_in_row} steps in a row had a non-finite loss or gradient (last: step "
                f"{step + 1}); the last checkpoint in {run_dir / checkpoint.CKPT_DIR} is intact"
            )
        if (step + 1) % t_cfg.ckpt_every == 0 or step + 1 == t_cfg.steps:
            trainer_state = {
                "step": step + 1,
                "rng": checkpoint.rng_state(gen),
                "stream": stream.state_dict(),
                "nonfinite_in_row": nonfinite_in_row,
                "nonfinite_total": nonfinite_total,
            }
            checkpoint.save_training_state(engine, run_dir, step + 1, info.rank, trainer_state)
            save_weights(model, cfg, run_dir, step + 1, is_main=info.is_main)
            if cache is not None:
                cache.flush()
            if info.is_main:
                checkpoint.prune_checkpoints(run_dir, t_cfg.keep_ckpts)
    logger.close()
    if cache is not None:
        cache.close()
    if not last:
        last = {"step": start, "loss": math.nan, "nonfinite_total": nonfinite_total}
    return last
