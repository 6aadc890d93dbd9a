"""`mmgen distill`: a few-step, guidance-free student from a trained teacher run, with no training images.

Method (trajectory distillation, one round):

1. The teacher samples from fresh noise with classifier-free guidance, each trajectory at its own
   guidance scale w drawn uniformly from the distilled range, on a DDIM grid of `teacher_steps`
   steps (deterministic, eta 0) that contains the student's K timesteps.
2. The student is the teacher's DiT plus a guidance embedding (added to the timestep embedding, as in
   Meng et al., "On Distillation of Guided Diffusion Models"), whose last layer starts at zero, so the
   student starts as the teacher's conditional model.
3. For each of its K steps, from the teacher's latent at the step's timestep, the student's single
   DDIM step must land where the teacher's several steps landed (the next of the student's timesteps,
   or the clean latent after the last one). DDIM is linear in the predicted noise, so the target noise
   is solved in closed form, as in progressive distillation; the loss is the squared error of the noise.

One round replaces progressive distillation's log2(teacher_steps / K) rounds: a tiny teacher's whole
trajectory costs less than a second per batch, so the teacher runs its full grid once and every
student step learns from it directly. Everything is seeded (`seed`); the thread count also changes
the result (see `training.common.set_threads`).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mmgen_deploy.config import DISTILLED_SAMPLER, ModelConfig, StudentConfig
from mmgen_deploy.defaults import SAMPLING
from mmgen_deploy.errors import RunDirError, UsageError
from mmgen_deploy.io_utils import write_json
from mmgen_deploy.models.dit import DiT
from mmgen_deploy.models.load import load_dit, load_first_stage, load_text_encoder
from mmgen_deploy.rundir import TEXT_PART, RunDir, first_stage_part, writes_run
from mmgen_deploy.sampling.schedulers import DDIMScheduler, respaced_timesteps
from mmgen_deploy.training.common import (
    StepCallback,
    ema_decay_at,
    ema_update,
    interrupted,
    load_checkpoint,
    lr_at,
    progress_bar,
    restore_rng,
    rng_state,
    save_checkpoint,
    set_lr,
)
from mmgen_deploy.training.recipes import prepare_run

# Teacher and student step with deterministic DDIM: a step is then linear in the predicted noise.
NO_STEP_NOISE = 0.0
# Student step counts `mmgen distill --steps` takes: each divides the teacher grid's steps.
STUDENT_STEPS = (1, 2, 4, 8)


@dataclass(frozen=True)
class DistillSettings:
    steps: int = 4  # the student's denoiser evaluations per image
    teacher_steps: int = 24  # the teacher's DDIM grid (a multiple of every STUDENT_STEPS entry)
    guidance_min: float = 1.0
    guidance_max: float = 6.0
    # Teacher samples the student learns from. Measured on the quickstart model (4 steps, lr 3e-4, 2 rounds;
    # benchmarks/RESULTS.md): 2048 -> 88.9 %, 4096 -> 92.8 % colour+shape against the teacher's 93.3 %.
    trajectories: int = 4096
    train_steps: int = 1500
    batch_size: int = 128
    lr: float = 3e-4  # every student in benchmarks/RESULTS.md with rounds on its own trajectories used it
    warmup: int = 100
    ema_decay: float = 0.995
    seed: int = 0
    checkpoint_every: int = 250
    # Training rounds: the first on the teacher's own trajectories, each later one on pairs that start
    # where the student's own steps lead (made with the student as it is at the round's start).
    rounds: int = 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check(self) -> None:
        if self.steps not in STUDENT_STEPS:
            raise UsageError(f"{{steps}} {self.steps} is not a supported student step count",
                             f"choose one of {', '.join(map(str, STUDENT_STEPS))}", params=["steps"])
        if self.teacher_steps % self.steps:
            raise UsageError(f"the teacher's {self.teacher_steps} steps are not a multiple of {self.steps}")
        if not 0 < self.guidance_min <= SAMPLING.cfg_scale <= self.guidance_max <= SAMPLING.max_cfg_scale:
            raise UsageError(f"guidance range {self.guidance_min:g}..{self.guidance_max:g} must hold the default "
                             f"scale {SAMPLING.cfg_scale:g} and lie in 0..{SAMPLING.max_cfg_scale:g}",
                             "e.g. {guidance_range} 1:6", params=["guidance_range"])
        for name in ("trajectories", "train_steps", "batch_size", "checkpoint_every", "rounds"):
            if getattr(self, name) < 1:
                raise UsageError(f"{{{name}}} must be >= 1, got {getattr(self, name)}", params=[name])


def student_timesteps(num_train_timesteps: int, steps: int) -> tuple[int, ...]:
    """The K timesteps a K-step student visits (largest first); its last step lands on the clean sample.
    They are every (teacher_steps / K)-th point of the teacher's grid (`respaced_timesteps` with K + 1
    points, the final 0 dropped)."""
    return tuple(int(t) for t in respaced_timesteps(num_train_timesteps, steps + 1)[:-1])


def check_teacher(teacher: RunDir, config: ModelConfig) -> None:
    """A trained, undistilled DiT: refused before anything is written."""
    if config.student is not None:
        raise UsageError(f"{teacher.root} is itself a distilled student", "distill its teacher instead")
    if not teacher.weights_path("dit").is_file():
        raise RunDirError(f"{teacher.root} has no trained DiT", "train it first (`mmgen train dit`)")
    from safetensors import safe_open

    # Only the output layer is read: a DiT-XL/2 checkpoint is 2.7 GB, and the teacher is loaded once, later.
    try:
        with safe_open(str(teacher.weights_path("dit")), framework="pt") as weights:
            final = [weights.get_tensor(k) for k in weights.keys()  # noqa: SIM118 (not a dict)
                     if k.startswith("final_layer.linear.")]
    except Exception as exc:  # safetensors raises its own error types for every kind of damage
        raise RunDirError(f"corrupt weight file {teacher.weights_path('dit')}: {str(exc).splitlines()[0]}",
                          "re-train or restore the file") from None
    if not final or all(float(v.abs().max()) == 0.0 for v in final):
        raise RunDirError(f"{teacher.root}'s DiT is untrained (its output layer is all zeros)",
                          "train it first (`mmgen train dit`)")


def student_config(config: ModelConfig, settings: DistillSettings) -> ModelConfig:
    student = StudentConfig(
        method="trajectory", steps=settings.steps,
        timesteps=student_timesteps(config.diffusion.num_train_timesteps, settings.steps),
        sampler=DISTILLED_SAMPLER, guidance_min=settings.guidance_min, guidance_max=settings.guidance_max,
        default_cfg_scale=SAMPLING.cfg_scale, teacher_steps=settings.teacher_steps)
    # Everything else is the teacher's: first stage, schedule, labels, text encoder, an audio run's transform.
    return config.replace(dit=config.dit.replace(guidance_embed=True), student=student)


def _condition_batch(config: ModelConfig, teacher: RunDir, count: int,
                     generator: torch.Generator) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Conditions for `count` samples and the null condition: class ids (uniform over the classes), or a
    text run's encoded training captions (and the empty prompt)."""
    if not config.uses_text:
        y = torch.randint(0, config.dit.num_classes, (count,), generator=generator)
        return {"y": y}, {"y": torch.full((count,), config.dit.num_classes, dtype=torch.long)}
    from mmgen_deploy.data import DataSpec, load_split

    tokenizer = teacher.load_tokenizer()
    encoder = load_text_encoder(teacher, config).eval()
    captions = load_split(DataSpec.from_dict(teacher.read_meta()["data"]), "train").captions
    pick = torch.randint(0, len(captions), (count,), generator=generator)
    with torch.inference_mode():
        text, mask, pooled = encoder(torch.from_numpy(tokenizer([captions[i] for i in pick.tolist()])).long())
        empty = encoder(torch.from_numpy(tokenizer([""])).long())
    null = tuple(e.expand(count, *e.shape[1:]) for e in empty)
    return ({"text": text, "text_mask": mask, "text_pooled": pooled},
            {"text": null[0], "text_mask": null[1], "text_pooled": null[2]})


def _take(conditions: dict[str, torch.Tensor], index: torch.Tensor | slice) -> dict[str, torch.Tensor]:
    return {k: v[index] for k, v in conditions.items()}


def _call(dit: DiT, x: torch.Tensor, t: torch.Tensor, conditions: dict[str, torch.Tensor],
          guidance: torch.Tensor | None = None) -> torch.Tensor:
    c = dit.config.in_channels
    if "y" in conditions:
        return dit(x, t, conditions["y"], guidance=guidance)[:, :c]
    return dit(x, t, text=conditions["text"], text_mask=conditions["text_mask"],
               text_pooled=conditions["text_pooled"], guidance=guidance)[:, :c]


def trajectory_pairs(teacher_dit: DiT, config: ModelConfig, settings: DistillSettings,
                     conditions: dict[str, torch.Tensor], null: dict[str, torch.Tensor],
                     guidance: torch.Tensor, noise: torch.Tensor, *, student: DiT | None = None,
                     first_targets: torch.Tensor | None = None, batch: int = 512,
                     show_progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), each (trajectories, K, C, h, w): for each of the student's K steps, the latent
    it starts from and where the teacher's guided DDIM steps (deterministic, on a `teacher_steps` grid
    that contains the student's timesteps) take that latent by the next of the student's timesteps (the
    clean latent after the last one).

    Without `student`, each step starts where the teacher's previous steps ended: the teacher's own
    trajectory. With `student`, each step starts where the student's own previous steps ended, so the
    student learns to correct the drift its own steps cause (exposure bias). The first step starts from
    the noise either way: `first_targets` (an earlier call's targets[:, 0] for the same noise) saves the
    teacher's steps of it, a 1 / K share of the work."""
    T = config.diffusion.num_train_timesteps
    grid = respaced_timesteps(T, settings.teacher_steps + 1)[:-1]  # the teacher visits these
    teacher_x, teacher_eps = _step_coefficients(config, tuple(int(t) for t in grid))
    stride = settings.teacher_steps // settings.steps
    timesteps = student_timesteps(T, settings.steps)
    cx, ce = _step_coefficients(config, timesteps)
    n, k_steps = noise.shape[0], settings.steps
    inputs = torch.empty(n, k_steps, *noise.shape[1:])
    targets = torch.empty_like(inputs)
    total = ((n + batch - 1) // batch) * len(grid)
    with progress_bar("teacher", total, 0, show_progress) as advance, torch.inference_mode():
        for start in range(0, n, batch):
            stop = min(start + batch, n)
            x = noise[start:stop].clone()
            both = {k: torch.cat([conditions[k][start:stop], null[k][start:stop]]) for k in conditions}
            own = _take(conditions, slice(start, stop))
            w = guidance[start:stop].view(-1, 1, 1, 1)
            for k in range(k_steps):
                inputs[start:stop, k] = x
                reuse = k == 0 and first_targets is not None
                y = first_targets[start:stop].clone() if reuse and first_targets is not None else x.clone()
                for j in range(k * stride, (k + 1) * stride):
                    if not reuse:
                        t_in = torch.full((2 * (stop - start),), float(grid[j]))
                        cond, uncond = _call(teacher_dit, torch.cat([y, y]), t_in, both).chunk(2)
                        eps = uncond + w * (cond - uncond)
                        y = teacher_x[j] * y + teacher_eps[j] * eps
                    advance()
                targets[start:stop, k] = y
                if student is None:
                    x = y
                else:
                    t_k = torch.full((stop - start,), float(timesteps[k]))
                    eps = _call(student, x, t_k, own, guidance=guidance[start:stop])
                    x = cx[k] * x + ce[k] * eps
    return inputs, targets


def _step_coefficients(config: ModelConfig, timesteps: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per step k over `timesteps` (the last landing on the clean sample): deterministic DDIM lands on
    x_next = cx[k] x + ce[k] eps, the coefficients the sampling loop's DDIM scheduler uses."""
    ddim = DDIMScheduler(config.diffusion, len(timesteps), eta=NO_STEP_NOISE, timesteps=np.asarray(timesteps))
    return torch.tensor(ddim.coef_x, dtype=torch.float32), torch.tensor(ddim.coef_eps, dtype=torch.float32)


def distill(teacher: RunDir, student: RunDir, settings: DistillSettings, *, resume: bool = False,
            callback: StepCallback | None = None, show_progress: bool = True) -> dict[str, Any]:
    """Train a `settings.steps`-step guidance-embedded student of `teacher` into the run `student` (a
    new run directory sharing the teacher's first stage and text encoder). Resumable from the
    student's checkpoint, which holds the training state and names the round's trajectory pairs, saved
    once per round beside it (`RunDir.distill_pairs_path`). `distill_into` checks the teacher and the
    settings first."""
    config = teacher.load_config()
    new_config = student_config(config, settings)
    fingerprint = teacher.weights_sha256()
    checkpoint = student.checkpoint_path("distill")
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    teacher_dit = load_dit(teacher, config).eval().requires_grad_(False)
    dit = DiT(new_config.dit)
    missing, unexpected = dit.load_state_dict(teacher_dit.state_dict(), strict=False)
    if unexpected or any(not k.startswith("g_embedder.") for k in missing):
        raise RunDirError(f"{teacher.root}'s DiT weights do not fit its configuration")
    ema = copy.deepcopy(dit).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in dit.parameters() if p.requires_grad], lr=settings.lr,
                                  weight_decay=0.0, fused=True)
    start = 0
    pairs: tuple[torch.Tensor, torch.Tensor] | None = None
    pairs_round = 0  # regenerations so far: 0 while training on the teacher's own trajectories
    pairs_sha256: str | None = None  # of the round's pairs file, once written
    if resume:
        if not checkpoint.is_file():
            raise RunDirError(f"{student.root} has no distillation checkpoint to resume",
                              "start without {resume}", params=["resume"])
        state = load_checkpoint(checkpoint)
        if state.get("teacher_sha256") != fingerprint:
            raise RunDirError(f"{teacher.root} changed since this distillation started (its weights hash differs)",
                              "distill again without {resume} (add {overwrite})", params=["resume", "overwrite"])
        saved = {**settings.to_dict(), **state.get("settings", {})}
        if {k: v for k, v in saved.items() if k != "train_steps"} != {
                k: v for k, v in settings.to_dict().items() if k != "train_steps"}:
            raise RunDirError(f"{checkpoint} was made with other settings ({saved})",
                              "resume with the same options (only {train_steps} may grow)", params=["train_steps"])
        dit.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        restore_rng(state["rng"], generator)
        if "pairs_sha256" in state:
            pairs_round, pairs_sha256 = int(state["pairs_round"]), str(state["pairs_sha256"])
            pairs, guidance, conditions, null, noise = _load_pairs(
                student.distill_pairs_path(pairs_round), pairs_sha256, checkpoint)
        else:  # a checkpoint that holds its pairs itself
            pairs = (state["inputs"], state["targets"])
            guidance, conditions, null, noise = state["guidance"], state["conditions"], state["null"], state["noise"]
        start = int(state["step"])
    started = time.perf_counter()
    teacher_seconds = 0.0
    if pairs is None:
        conditions, null = _condition_batch(config, teacher, settings.trajectories, generator)
        guidance = settings.guidance_min + (settings.guidance_max - settings.guidance_min) * torch.rand(
            settings.trajectories, generator=generator)
        noise = torch.randn(settings.trajectories, config.dit.in_channels, config.dit.input_size,
                            config.dit.input_size, generator=generator)
        pairs = trajectory_pairs(teacher_dit, config, settings, conditions, null, guidance, noise,
                                 show_progress=show_progress)
        teacher_seconds = time.perf_counter() - started
    # Later rounds start each student step where the student's own steps lead (see `trajectory_pairs`).
    round_length = max(1, settings.train_steps // settings.rounds)
    assert new_config.student is not None
    timesteps = torch.tensor(new_config.student.timesteps, dtype=torch.float32)
    cx, ce = _step_coefficients(config, new_config.student.timesteps)
    n, k_steps = settings.trajectories, settings.steps
    metrics: dict[str, float] = {}
    last_saved = start if resume else None
    try:
        with progress_bar("student", settings.train_steps, start, show_progress) as advance:
            for step in range(start, settings.train_steps):
                # A checkpoint is written before the round that starts at its step: resuming there
                # makes that round's pairs as the uninterrupted run did.
                if step > 0 and step % round_length == 0 and step // round_length < settings.rounds:
                    round_started = time.perf_counter()
                    pairs = trajectory_pairs(teacher_dit, config, settings, conditions, null, guidance, noise,
                                             student=ema, first_targets=pairs[1][:, 0], show_progress=False)
                    pairs_round, pairs_sha256 = pairs_round + 1, None
                    teacher_seconds += time.perf_counter() - round_started
                dit.train()
                set_lr(optimizer, lr_at(step, base_lr=settings.lr, warmup=settings.warmup,
                                        total=settings.train_steps))
                pick = torch.randint(0, n, (settings.batch_size,), generator=generator)
                k = torch.randint(0, k_steps, (settings.batch_size,), generator=generator)
                x, x_next = pairs[0][pick, k], pairs[1][pick, k]
                coef_x, coef_e = cx[k].view(-1, 1, 1, 1), ce[k].view(-1, 1, 1, 1)
                target = (x_next - coef_x * x) / coef_e
                prediction = _call(dit, x, timesteps[k], _take(conditions, pick), guidance=guidance[pick])
                loss = F.mse_loss(prediction, target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                ema_update(ema, dit, ema_decay_at(step, settings.ema_decay))
                metrics = {"loss": loss.item()}
                done = step + 1
                if done % settings.checkpoint_every == 0 or done == settings.train_steps:
                    pairs_path = student.distill_pairs_path(pairs_round)
                    if pairs_sha256 is None:  # the round's pairs, once: they cost trajectories x K latents
                        pairs_sha256 = _save_pairs(pairs_path, pairs, guidance, conditions, null, noise)
                    save_checkpoint(checkpoint, {
                        "step": done, "model": dit.state_dict(), "ema": ema.state_dict(),
                        "optimizer": optimizer.state_dict(), "rng": rng_state(generator),
                        "settings": settings.to_dict(), "teacher_sha256": fingerprint,
                        "pairs_round": pairs_round, "pairs_sha256": pairs_sha256})
                    for stale in student.distill_pairs_files():
                        if stale != pairs_path:
                            stale.unlink(missing_ok=True)
                    last_saved = done
                advance(loss=metrics["loss"])
                if callback is not None:
                    callback(done, metrics)
    except KeyboardInterrupt:
        raise interrupted("distillation", checkpoint, last_saved) from None
    train_seconds = time.perf_counter() - started
    lineage = {"teacher": str(teacher.root.resolve()), "teacher_sha256": fingerprint, "method": "trajectory",
               "steps": settings.steps, "guidance_range": [settings.guidance_min, settings.guidance_max],
               "settings": settings.to_dict()}
    student.save_weights(first_stage_part(config), load_first_stage(teacher, config))
    if config.uses_text:
        student.save_tokenizer(teacher.load_tokenizer())
        student.save_weights(TEXT_PART, load_text_encoder(teacher, config))
    student.save_weights("dit", ema)
    result = {"stage": "distill", **lineage, "resumed_from": start if resume else None,
              "seconds": round(train_seconds, 1), "teacher_seconds": round(teacher_seconds, 1),
              "threads": torch.get_num_threads(), "final_loss": metrics.get("loss")}
    write_json(student.reports_dir / "distill.json", result)
    student.update_meta(distilled_from=lineage)
    return result


def _save_pairs(path: Path, pairs: tuple[torch.Tensor, torch.Tensor], guidance: torch.Tensor,
                conditions: dict[str, torch.Tensor], null: dict[str, torch.Tensor], noise: torch.Tensor) -> str:
    """Write one round's pairs and what they start from to `path` atomically; return the file's sha256."""
    from safetensors.torch import save_file

    from mmgen_deploy.io_utils import atomic_path, sha256_file

    tensors = {"inputs": pairs[0], "targets": pairs[1], "guidance": guidance, "noise": noise,
               # Copies: a text encoder's outputs (and the expanded empty prompt) may share memory.
               **{f"conditions.{k}": v.clone() for k, v in conditions.items()},
               **{f"null.{k}": v.clone() for k, v in null.items()}}
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"mmgen": "mmgen-run/distill-pairs"})
        return sha256_file(tmp)


def _load_pairs(path: Path, sha256: str, checkpoint: Path) -> tuple[
        tuple[torch.Tensor, torch.Tensor], torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor],
        torch.Tensor]:
    """The pairs `checkpoint` trained on, refused in one line unless `path` holds exactly them (`sha256`):
    (inputs, targets), guidance scales, conditions, null conditions, noise."""
    from safetensors.torch import load_file

    from mmgen_deploy.io_utils import sha256_file

    hint, params = "distill again without {resume} (add {overwrite})", ["resume", "overwrite"]
    if not path.is_file():
        raise RunDirError(f"{checkpoint} trains on the trajectory pairs {path}, which are missing", hint, params=params)
    if sha256_file(path) != sha256:
        raise RunDirError(f"{path} is not the trajectory pairs {checkpoint} trained on (its sha256 differs)", hint,
                          params=params)
    tensors = load_file(str(path))
    conditions = {k.removeprefix("conditions."): v for k, v in tensors.items() if k.startswith("conditions.")}
    null = {k.removeprefix("null."): v for k, v in tensors.items() if k.startswith("null.")}
    return (tensors["inputs"], tensors["targets"]), tensors["guidance"], conditions, null, tensors["noise"]


@writes_run("distill", create=True)
def distill_into(student_dir: Path, teacher: RunDir, settings: DistillSettings, *, overwrite: bool = False,
                 resume: bool = False, callback: StepCallback | None = None,
                 show_progress: bool = True) -> dict[str, Any]:
    """Check the teacher and the settings, make (or reuse, to resume) the student's run directory at
    `student_dir` under its writer lock, then `distill`. Bad input is refused before anything is written."""
    settings.check()
    config = teacher.load_config()
    check_teacher(teacher, config)
    if Path(student_dir).resolve() == teacher.root.resolve():
        raise UsageError("the student must go to its own run directory, not the teacher's", "choose another {out}",
                         params=["out"])
    data = teacher.read_meta().get("data", {})
    if data:  # in the normalised form prepare_run compares with
        from mmgen_deploy.data import DataSpec

        data = DataSpec.from_dict(data).to_dict()
    student = prepare_run(Path(student_dir), student_config(config, settings), data, overwrite=overwrite,
                          resume=resume)
    return distill(teacher, student, settings, resume=resume, callback=callback, show_progress=show_progress)
