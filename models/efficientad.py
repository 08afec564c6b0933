"""EfficientAD (`--method efficientad`): teacher distillation, student + autoencoder training,
and the quantile-normalised anomaly maps.

    distill_teacher(...)       PDN teacher <- a pretrained backbone's layer2+3 features (once)
    EfficientAD(config).fit    student (768 ch) + autoencoder on a category's normal images
    EfficientAD.score          local (teacher-student) and global (AE-student) maps, each mapped
                               by its 0.9 / 0.995 validation quantiles to 0 / 0.1, averaged,
                               padded to the image's 64x64 stride-4 grid

Training follows the paper: batch 1, Adam lr 1e-4, weight decay 1e-5, lr x0.1 for the last 5%
of the steps; the student's teacher half is trained with the hard-feature loss (p = 0.999) plus
the ImageNet penalty when images are given, its AE half and the AE on colour-jittered images.
Checkpoints are written atomically every N steps; `resume` continues from the last one, and
every step draws its randomness from (seed, step), so a resumed run repeats the same steps.
"""
import os
import time

import numpy as np
import paddle
import paddle.nn.functional as F
from tqdm import tqdm

from datasets.efficientad import ae_color_jitter, list_image_tree, natural_crops, penalty_image
from datasets.transforms import Preprocess
from models.backbone import make_engine, run_in_chunks
from models.pdn import (IMAGE_SIZE, MAP_BORDER, MODEL_SIZES, OUT_CHANNELS, RECEPTIVE_FIELD, DistillationTarget,
                        EfficientADNet, pdn)
from utils import UserError, atomic_path, load_pdparams

LR, WEIGHT_DECAY, LR_DROP_AT = 1e-4, 1e-5, 0.95
HARD_QUANTILE = 0.999
MAP_QUANTILES = (0.9, 0.995)
VALIDATION_SHARE = 0.1
PAPER_TRAIN_STEPS, PAPER_DISTILL_STEPS = 70000, 60000
DISTILL_CROP = 128          # PDN distillation input; the pixel loss makes crops as good as full images
NORMALIZATION_CROPS = 64    # crops measuring the distillation target's channel mean / std
TEACHER_FORMAT = "efficientad-teacher/1"
CHECKPOINT_FORMAT = "efficientad-checkpoint/1"


# ---------------------------------------------------------------- losses and maps
def hard_feature_loss(distance, q=HARD_QUANTILE):
    """Mean of the squared differences at or above their q-quantile (the paper's L_hard). The
    threshold is a constant for the gradient, so numpy finds it (same linear-interpolation
    quantile as torch.quantile)."""
    threshold = float(np.quantile(distance.numpy(), q))
    return distance[distance >= threshold].mean()


def student_parts(student, images, halves):
    """The student's output half `halves[i]` (0: imitates the teacher, 1: the autoencoder) for
    each image. Only those channels of the last conv are computed: the values and gradients of
    slicing the full output, without the unused half's FLOPs (a quarter of PDN-S training)."""
    *trunk, last = student.children()
    h = paddle.to_tensor(images)
    for layer in trunk:
        h = layer(h)
    return [F.conv2d(h[i:i + 1], last.weight[half * OUT_CHANNELS:(half + 1) * OUT_CHANNELS],
                     last.bias[half * OUT_CHANNELS:(half + 1) * OUT_CHANNELS]) for i, half in enumerate(halves)]


def map_quantiles(maps):
    return np.quantile(np.asarray(maps, np.float64), MAP_QUANTILES).astype(np.float32)


def quantile_normalize(maps, quantiles):
    """The paper's map normalisation: the 0.9 quantile of validation maps -> 0, the 0.995 -> 0.1."""
    low, high = float(quantiles[0]), float(quantiles[1])
    return 0.1 * (maps - low) / max(high - low, 1e-12)


def output_cells(size):
    """PDN output cells along a side of a size-pixel input (each sees 33 px, stride 4)."""
    return (size - RECEPTIVE_FIELD) // 4 + 1


def check_train_crop(crop):
    """Student training windows: a crop at a multiple of 4 px gives exactly the cells of the full
    image's output it covers (the PDN is unpadded), so training on it matches whole-image training
    at those cells for a fraction of the FLOPs (128 px: 24x24 of the 56x56 cells, ~5x faster)."""
    if not crop or crop >= IMAGE_SIZE:
        return None
    if crop % 4 or crop < 64:
        raise UserError(f"--train_crop must be a multiple of 4 between 64 and {IMAGE_SIZE}, got {crop}")
    return int(crop)


# ---------------------------------------------------------------- training loop
class Trainer:
    """Adam over named modules with the paper's schedule, a progress bar showing the loss,
    atomic checkpoints every `every` steps (and at the end), resume, and an optional time box
    (`minutes`: training stops when it is spent; the lr drop comes at 95% of steps or time)."""

    def __init__(self, modules, steps, checkpoint_path, every, identity, minutes=None, group=None):
        # group (scaleout.Group, several workers): data parallel; each worker draws its own
        # images, gradients (and the clock of the time box) are averaged, worker 0 checkpoints.
        self.group = group if group is not None and group.size > 1 else None
        self.modules = modules
        self.steps = steps
        self.path = checkpoint_path
        self.every = every
        self.identity = identity
        self.seconds = minutes * 60 if minutes else None
        self.optimizer = paddle.optimizer.Adam(learning_rate=LR, weight_decay=WEIGHT_DECAY,
                                               parameters=[p for m in modules.values() for p in m.parameters()])

    def run(self, step_loss, resume, progress, desc):
        """step_loss(step, rng) -> (loss tensor, {name: float}). -> {"steps", "seconds", "loss"}."""
        step, elapsed, losses = self._load() if resume else (0, 0.0, [])
        started = time.perf_counter() - elapsed
        bar = tqdm(total=self.steps, initial=step, desc=desc, unit="step", disable=not progress, leave=False)
        while step < self.steps and not (self.seconds and elapsed >= self.seconds):
            late = step >= LR_DROP_AT * self.steps or (self.seconds and elapsed >= LR_DROP_AT * self.seconds)
            self.optimizer.set_lr(LR * (0.1 if late else 1.0))
            paddle.seed(step_seed(self.identity["seed"], step))  # dropout
            worker = [self.group.rank] if self.group and self.group.rank else []  # worker 0 draws as one process
            loss, parts = step_loss(step, np.random.RandomState([self.identity["seed"], step] + worker))
            loss.backward()
            elapsed = time.perf_counter() - started
            if self.group:
                elapsed = self._average_gradients(elapsed)
            self.optimizer.step()
            self.optimizer.clear_grad()
            step += 1
            losses.append(float(loss))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", **{k: f"{v:.4f}" for k, v in parts.items()})
            if self.every and step % self.every == 0 and step < self.steps:
                self._save(step, elapsed, losses)
        bar.close()
        self._save(step, elapsed, losses)  # a time-boxed or finished run can be extended later
        return {"steps": step, "seconds": elapsed, "loss": float(np.mean(losses[-100:])) if losses else None}

    def _average_gradients(self, elapsed):
        """One all_reduce of every gradient and the elapsed time: the workers step alike and
        stop at the same step."""
        grads = [p.grad for m in self.modules.values() for p in m.parameters() if p.grad is not None]
        flat = paddle.concat([g.reshape([-1]) for g in grads] + [paddle.to_tensor([elapsed], grads[0].dtype)])
        flat = self.group.average_tensor(flat, "averaging the gradients")
        lo = 0
        for g in grads:
            size = int(np.prod(g.shape))
            g.set_value(flat[lo:lo + size].reshape(g.shape))
            lo += size
        return float(flat[lo])

    def _param_names(self):
        # Paddle keys optimizer state by process-global parameter names (conv2d_7.w_0...);
        # checkpoints use module paths so that another process can load them.
        return {p.name: f"{name}.{key}" for name, m in self.modules.items() for key, p in m.named_parameters()}

    def _save(self, step, elapsed, losses):
        if self.group and self.group.rank != 0:
            return  # one writer: every worker holds the same weights
        state = {"format": CHECKPOINT_FORMAT, "identity": self.identity, "step": step, "elapsed_s": elapsed,
                 "losses": np.array(losses, np.float32),
                 "modules": {n: {k: v.numpy() for k, v in m.state_dict().items()} for n, m in self.modules.items()},
                 "optimizer": {k: v.numpy() for k, v in
                               rename_prefixes(self.optimizer.state_dict(), self._param_names()).items()}}
        with atomic_path(self.path) as tmp:
            paddle.save(state, tmp, protocol=4)

    def _load(self):
        state = load_pdparams(self.path, "checkpoint", marker=CHECKPOINT_FORMAT,
                              missing=f"--resume: no checkpoint at {self.path} (train without --resume first)",
                              wrong=f"{self.path} is not an EfficientAD checkpoint")
        for key, value in self.identity.items():
            if state["identity"].get(key) != value:
                raise UserError(f"--resume: checkpoint {self.path} was written with {key}={state['identity'].get(key)}, "
                                f"this run has {value}; drop --resume to start over")
        for name, module in self.modules.items():
            module.set_state_dict(state["modules"][name])
        inverse = {v: k for k, v in self._param_names().items()}
        self.optimizer.set_state_dict({k: paddle.to_tensor(v) for k, v in
                                       rename_prefixes(state["optimizer"], inverse).items()})
        return int(state["step"]), float(state["elapsed_s"]), [float(v) for v in state["losses"]]


def rename_prefixes(state, mapping):
    """Optimizer accumulators are named <parameter name>_moment1_0 etc.: swap the prefix."""
    out = {}
    for key, value in state.items():
        for old, new in mapping.items():
            if key.startswith(old + "_"):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


def step_seed(seed, step):
    return (seed * 1_000_003 + step) % (2**31)


def weights_fingerprint(state):
    """Identifies a teacher inside checkpoints without storing it twice."""
    return round(float(sum(np.abs(np.asarray(v, np.float64)).sum() for v in state.values())), 3)


# ---------------------------------------------------------------- teacher
def load_teacher(path, model_size):
    if not path:
        raise UserError("--method efficientad needs a distilled teacher: pass --teacher_weights PATH "
                        "(make one with train.py --method efficientad --distill --distill_data DIR)")
    teacher = load_pdparams(path, "teacher weights", marker=TEACHER_FORMAT,
                            wrong=f"{path} is not a teacher written by --distill (no '{TEACHER_FORMAT}' marker)")
    if teacher["model_size"] != model_size:
        raise UserError(f"teacher {path} is a {teacher['model_size']} PDN; pass --model_size {teacher['model_size']}")
    return teacher


def distill_teacher(out_path, model_size, arch, backbone_weights, data_dirs, steps, seed, engine_kwargs,
                    progress=True, resume=False, checkpoint_every=500, minutes=None):
    """Train a PDN to reproduce the standardised backbone features on random crops of natural
    images (MSE, as the paper's pretraining); write the teacher file atomically."""
    paths = list_image_tree(data_dirs, progress)
    target_net = DistillationTarget(arch)
    target_net.backbone.load_pretrained(backbone_weights)
    target = make_engine(target_net, (3, DISTILL_CROP, DISTILL_CROP), **engine_kwargs)
    sample = run_in_chunks(target, natural_crops(paths, np.random.RandomState(seed), NORMALIZATION_CROPS,
                                                 DISTILL_CROP))[0]
    mean, std = sample.mean(axis=(0, 2, 3), keepdims=True), sample.std(axis=(0, 2, 3), keepdims=True) + 1e-6
    paddle.seed(seed)  # the initial weights too are a function of the seed
    teacher = pdn(model_size)

    def step_loss(step, rng):
        x = natural_crops(paths, rng, 1, DISTILL_CROP)
        y = (target(x)[0] - mean) / std
        return ((teacher(paddle.to_tensor(x)) - paddle.to_tensor(y)) ** 2).mean(), {}

    identity = {"kind": "distill", "model_size": model_size, "arch": arch, "seed": seed, "images": len(paths),
                "backbone_weights": os.path.basename(backbone_weights) if backbone_weights else "imagenet"}
    trainer = Trainer({"teacher": teacher}, steps, out_path + ".ckpt", checkpoint_every, identity, minutes)
    info = trainer.run(step_loss, resume, progress, "distill")
    record = dict(identity, format=TEACHER_FORMAT, steps=info["steps"], seconds=info["seconds"],
                  final_loss=info["loss"], target=f"{arch} layer2+layer3",
                  state={k: v.numpy() for k, v in teacher.state_dict().items()})
    with atomic_path(out_path) as tmp:
        paddle.save(record, tmp, protocol=4)
    return info


# ---------------------------------------------------------------- the method
class EfficientAD:
    """fit(train batches) -> state; feature_net(state) -> graph; score(outputs, stats) -> maps."""

    blur_sigma = 0.0  # the paper's maps are only upsampled
    # Image pixels along each edge that no PDN output sees (score() sets them to the normal level),
    # plus the two that bilinear upsampling mixes with them: tiles stitch around them.
    map_border = 4 * MAP_BORDER + 2
    SPLITS_IMAGES = True   # fit(group=...): data-parallel training...
    DATA_PARALLEL = True   # ...on all the images, each worker drawing its own

    def __init__(self, config):
        self.config = config
        if config.get("model_size", "small") not in MODEL_SIZES:
            raise UserError(f"unknown --model_size {config['model_size']}; choose one of {', '.join(MODEL_SIZES)}")
        self.model_size = config.get("model_size", "small")

    @staticmethod
    def fit_options(args, category):
        """The run's training options beyond the model config (teacher, penalty, checkpoints)."""
        return {"teacher_weights": args.teacher_weights, "imagenet_dir": args.imagenet_dir, "resume": args.resume,
                "checkpoint_path": os.path.join(args.save_path, "checkpoints", f"{category}.ckpt"),
                "checkpoint_every": args.checkpoint_every, "train_minutes": args.train_minutes}

    @staticmethod
    def check_geometry(config, max_stats_gb=None):
        """The autoencoder's bottleneck and output size are built for 256x256 inputs (the paper's):
        other frames are fed as 256-pixel tiles."""
        _, h, w = Preprocess.from_config(config).input_shape
        if (h, w) != (IMAGE_SIZE, IMAGE_SIZE):
            raise UserError(f"efficientad takes {IMAGE_SIZE}x{IMAGE_SIZE} network inputs (its autoencoder is built "
                            f"for them), got {h}x{w}: use --image_size {IMAGE_SIZE},{IMAGE_SIZE}, or --tile {IMAGE_SIZE} "
                            f"for other sizes")

    def feature_net(self, state):
        net = EfficientADNet(self.model_size)
        net.set_state_dict(state["net"])
        net.eval()
        return net

    @staticmethod
    def score(outputs, stats):
        """-> [B, 64, 64]; the 16 px image border no output sees gets 0, the normal (0.9 quantile)
        level, as in the reference code."""
        local, glob = outputs
        combined = 0.5 * quantile_normalize(local, stats["q_local"]) + 0.5 * quantile_normalize(glob, stats["q_global"])
        return np.pad(combined, ((0, 0), (MAP_BORDER, MAP_BORDER), (MAP_BORDER, MAP_BORDER)))

    def fit(self, batches, engine_kwargs, weights_path=None, progress=True, teacher_weights=None, imagenet_dir=None,
            checkpoint_path="efficientad.ckpt", resume=False, checkpoint_every=500, train_minutes=None, group=None):
        """`batches()`: 256x256 ImageNet-normalised normal images. `weights_path` (the backbone's)
        is used only by distillation. Holds out 10% of the images for the map quantiles."""
        cfg = self.config
        teacher = load_teacher(teacher_weights, self.model_size)
        images = np.concatenate(list(batches()))
        if images.shape[1:] != (3, IMAGE_SIZE, IMAGE_SIZE):
            raise UserError(f"efficientad needs {IMAGE_SIZE}x{IMAGE_SIZE} inputs, got {images.shape[2]}x{images.shape[3]}")
        if len(images) < 2:
            raise UserError("efficientad needs at least 2 training images (one is held out for the map quantiles)")
        n_val = max(1, int(round(len(images) * VALIDATION_SHARE)))
        order = np.random.RandomState(cfg.get("seed", 0)).permutation(len(images))
        train, val = images[np.sort(order[n_val:])], images[np.sort(order[:n_val])]
        penalty_paths = list_image_tree([imagenet_dir], progress) if imagenet_dir else None

        paddle.seed(cfg.get("seed", 0))
        net = EfficientADNet(self.model_size)
        net.teacher.pdn.set_state_dict(teacher["state"])
        teacher_engine = make_engine(net.teacher.pdn, (3, IMAGE_SIZE, IMAGE_SIZE), **engine_kwargs)
        raw = np.stack([teacher_engine(x[None])[0][0].astype(np.float16)
                        for x in tqdm(train, desc="teacher", unit="img", disable=not progress, leave=False)])
        mean = raw.mean(axis=(0, 2, 3), dtype=np.float64).astype(np.float32)[None, :, None, None]
        var = np.mean([((r.astype(np.float32) - mean[0]) ** 2).mean(axis=(1, 2)) for r in raw], axis=0)
        std = np.sqrt(var).astype(np.float32)[None, :, None, None] + 1e-6
        net.teacher.mean.set_value(paddle.to_tensor(mean))
        net.teacher.std.set_value(paddle.to_tensor(std))
        student, autoencoder = net.student, net.autoencoder
        student.train()
        autoencoder.train()

        crop = check_train_crop(cfg.get("train_crop"))

        def step_loss(step, rng):
            i = rng.randint(len(train))
            x_st, x_ae = train[i:i + 1], ae_color_jitter(train[i:i + 1], rng)
            t_st = (raw[i:i + 1].astype(np.float32) - mean) / std
            t_ae = paddle.to_tensor((teacher_engine(x_ae)[0] - mean) / std)
            ae = autoencoder(paddle.to_tensor(x_ae))
            ae_target = ae
            x_students = np.concatenate([x_st, x_ae])
            if crop:  # the student sees one window; its targets are the same cells of the full maps
                (y, x), cells = rng.randint(0, (IMAGE_SIZE - crop) // 4 + 1, size=2), output_cells(crop)
                x_students = x_students[:, :, 4 * y:4 * y + crop, 4 * x:4 * x + crop]
                t_st = t_st[:, :, y:y + cells, x:x + cells]
                ae_target = ae[:, :, y:y + cells, x:x + cells]
            s_st, s_ae = student_parts(student, x_students, (0, 1))
            loss_hard = hard_feature_loss((paddle.to_tensor(t_st) - s_st) ** 2)
            loss_ae = ((t_ae - ae) ** 2).mean()
            loss_stae = ((ae_target - s_ae) ** 2).mean()
            parts = {"hard": float(loss_hard), "ae": float(loss_ae), "stae": float(loss_stae)}
            loss = loss_hard + loss_ae + loss_stae
            if penalty_paths:
                penalty = (student_parts(student, penalty_image(penalty_paths, rng), (0,))[0] ** 2).mean()
                parts["penalty"] = float(penalty)
                loss = loss + penalty
            return loss, parts

        identity = {"kind": "train", "model_size": self.model_size, "seed": cfg.get("seed", 0),
                    "train_images": len(train), "teacher": weights_fingerprint(teacher["state"]),
                    "imagenet_penalty": bool(penalty_paths), "train_crop": crop}
        if group is not None and group.size > 1:
            identity["workers"] = group.size  # --resume with as many workers
        steps = cfg.get("train_steps") or PAPER_TRAIN_STEPS
        trainer = Trainer({"student": student, "autoencoder": autoencoder}, steps, checkpoint_path,
                          checkpoint_every, identity, train_minutes, group)
        info = trainer.run(step_loss, resume, progress, "train")
        raw = None  # frees the teacher outputs before the validation pass

        net.eval()
        engine = make_engine(net, (3, IMAGE_SIZE, IMAGE_SIZE), **engine_kwargs)
        local, glob = run_in_chunks(engine, val)
        state = {"net": {k: v.numpy() for k, v in net.state_dict().items()},
                 "stats": {"q_local": map_quantiles(local), "q_global": map_quantiles(glob)},
                 "training": dict(info, validation_images=len(val), teacher=os.path.basename(teacher_weights),
                                  teacher_steps=int(teacher["steps"]), imagenet_penalty=bool(penalty_paths))}
        return state, engine
