"""Train the model organism from scratch on the synthetic world, in two stages.

Stage 1 (vision warm-up, `vision_steps`): the vision tower alone learns to say, for every patch,
which shapes and colours cover it and how much of it (soft targets: the fraction of the patch's
pixels of each class, from the world's exact masks, so that a small object that covers no patch
by majority is still taught), through two linear heads that are thrown away afterwards, as a
vision encoder is pretrained before a VLM is assembled. Images are mirrored left-right at random
in this stage (labels with them). A ViT trained from scratch only through the language model's
answers learnt colour but stayed at chance on shape; dense labels teach it shape in minutes.
Stage 2: the whole VLM learns question-answer pairs, with the patch loss kept on the vision tower
(weight `vision_aux_weight`) so that it does not forget what stage 1 taught. The tower as stage 1 left
it is saved alone (`<out>/vision_stage1/`, and `model/vision_stage1/`, a CLIPVisionModel folder): the
vision encoder before the language model was trained on it. Each training sequence
is one image followed by several question/answer turns of the chat template; the loss is on the
answer tokens (and the turn's end marker) only.

Reproducible from its seed: scene i of the training set is `render_scene(derive_seed(seed, "train", i))`
and batch k draws its scenes and questions from a generator seeded by (seed, k), so a resumed run
sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from sightline.errors import UserError
from sightline.organism.model import OrganismArch, build_organism, save_organism
from sightline.report.files import write_json

IGNORE = -100


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on (saved with its checkpoints)."""

    out: str = "organism-train"
    """run folder (checkpoints, log, the final model/)"""
    seed: int = 0
    """seed of the training scenes and batches"""
    n_scenes: int = 32000
    """distinct training scenes, rendered once (16000 let stage 1 overfit)"""
    vision_steps: int = 6000
    """stage 1: dense patch labels for the vision tower alone"""
    vision_aux_weight: float = 1.0
    """stage 2: weight of the patch loss kept on the vision tower"""
    vision_batch_size: int = 64
    """stage 1 images per step"""
    vision_lr: float = 2e-3
    """stage 1 learning rate"""
    steps: int = 3000
    """stage 2: question answering, the whole model"""
    batch_size: int = 32
    """stage 2 sequences per step"""
    turns: int = 4
    """question/answer turns per sequence"""
    lr: float = 6e-4
    """stage 2 learning rate (2e-3 blew up the from-scratch vision tower: its residual grew 20x)"""
    min_lr_frac: float = 0.05
    """cosine decay floor, as a fraction of lr"""
    warmup: int = 100
    """linear warm-up steps of each stage"""
    weight_decay: float = 0.01
    """AdamW weight decay"""
    grad_clip: float = 1.0
    """gradient-norm clip"""
    count_probs: tuple[float, ...] = (0.4, 0.2, 0.2, 0.2)
    """P(1 object), P(2), ..."""
    qtypes: tuple[str, ...] = ()
    """question types to train on; () = all"""
    curriculum_steps: int = 400
    """first stage 2 steps on single-object scenes asked shape and colour only, so the vision path is
    learnt before the language model settles on answering from priors"""
    checkpoint_every: int = 250
    """steps between resumable checkpoints"""
    threads: int = 0
    """torch threads; 0 = torch's default"""
    arch: OrganismArch = field(default_factory=OrganismArch)
    """sizes of the organism's parts"""

    def to_dict(self) -> dict:
        """Every field, JSON-ready."""
        from sightline.config import to_dict

        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """The config a saved to_dict describes (unknown keys ignored: older runs)."""
        from sightline.config import from_dict

        return from_dict(cls, d, strict=False)


class SceneBank:
    """The training scenes' pixels (uint8) and their questions, rendered once up front."""

    def __init__(self, cfg: TrainConfig, progress: bool = True):
        from tqdm.auto import tqdm

        from sightline.data.synthetic import WorldConfig, derive_seed, questions, render_scene

        world = WorldConfig(image_size=cfg.arch.image_size, count_probs=cfg.count_probs)
        n = cfg.n_scenes
        s = cfg.arch.image_size
        self.pixels = np.empty((n, s, s, 3), np.uint8)
        g = s // cfg.arch.patch_size
        dtype = np.uint8 if cfg.arch.patch_size ** 2 < 256 else np.int32
        # pixels of each class in each patch: [n, g*g, 9], class 0 background, then 1 + SHAPES/COLOURS index
        self.shape_cover = np.empty((n, g * g, 9), dtype)
        self.colour_cover = np.empty((n, g * g, 9), dtype)
        self.questions: list[list[tuple[str, str, str]]] = []
        single = []
        for i in tqdm(range(n), desc="render scenes", disable=not progress, dynamic_ncols=True):
            scene = render_scene(derive_seed(cfg.seed, "train", i), world)
            self.pixels[i] = np.asarray(scene.to_pil())
            self.shape_cover[i], self.colour_cover[i] = patch_cover(scene, cfg.arch.patch_size)
            self.questions.append([(q.question, q.answer, q.qtype) for q in questions(scene)])
            if len(scene.objects) == 1:
                single.append(i)
        self.single = np.asarray(single, dtype=np.int64)  # single-object scenes, for the curriculum

    def __len__(self) -> int:
        return len(self.pixels)


def patch_cover(scene, patch: int) -> tuple[np.ndarray, np.ndarray]:
    """Per patch (row-major), how many of its pixels each shape and each colour covers:
    two [g*g, 9] count arrays, column 0 the background, then 1 + SHAPES / COLOURS index."""
    from sightline.data.synthetic import COLOURS

    h, w = scene.class_mask.shape
    gh, gw = h // patch, w // patch

    def counts(label_hw: np.ndarray, k: int) -> np.ndarray:
        cells = label_hw[: gh * patch, : gw * patch].reshape(gh, patch, gw, patch).transpose(0, 2, 1, 3)
        cells = cells.reshape(gh * gw, patch * patch).astype(np.int64)
        out = np.zeros((gh * gw, k), np.int64)
        np.add.at(out, (np.repeat(np.arange(gh * gw), patch * patch), cells.reshape(-1)), 1)
        return out

    colour_of = np.zeros(len(scene.objects) + 1, np.uint8)
    for o in scene.objects:
        colour_of[o.index + 1] = 1 + COLOURS.index(o.colour)
    return counts(scene.class_mask, 9), counts(colour_of[scene.instance_mask], 9)


def patch_labels(scene, patch: int) -> tuple[np.ndarray, np.ndarray]:
    """Per patch (row-major), the shape and the colour covering most of its pixels (0 = background)."""
    shape, colour = patch_cover(scene, patch)
    return shape.argmax(1), colour.argmax(1)


class VisionHeads(torch.nn.Module):
    """Stage 1's per-patch shape and colour classifiers over the vision tower's last hidden state."""

    def __init__(self, d: int, n_shapes: int = 8, n_colours: int = 8):
        super().__init__()
        self.shape = torch.nn.Linear(d, n_shapes + 1)
        self.colour = torch.nn.Linear(d, n_colours + 1)


def vision_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """The patch features the projector reads: the vision tower's selected layer, CLS dropped. [B, g*g, d]"""
    out = model.model.vision_tower(pixel_values, output_hidden_states=True)
    return out.hidden_states[model.config.vision_feature_layer][:, 1:]


def vision_loss(heads: VisionHeads, features: torch.Tensor, shape_cover: torch.Tensor,
                colour_cover: torch.Tensor) -> torch.Tensor:
    """Patch cross-entropy against the soft targets (each class's share of the patch's pixels), for
    shape and colour; the patches an object touches weigh as much, together, as all background ones.
    `features` [B, g*g, d]; the covers [B, g*g, 9] pixel counts."""
    loss = features.new_zeros(())
    for head, cover in ((heads.shape, shape_cover), (heads.colour, colour_cover)):
        target = cover.float() / cover.sum(-1, keepdim=True).float()
        ce = -(target * torch.log_softmax(head(features), -1)).sum(-1).reshape(-1)
        obj = (cover[..., 1:].sum(-1) > 0).float().reshape(-1)
        loss = loss + (ce * (1 - obj)).sum() / (1 - obj).sum().clamp(min=1) + (ce * obj).sum() / obj.sum().clamp(min=1)
    return loss


def mirror(pixels: np.ndarray, covers: list[np.ndarray], flip: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Mirror left-right the images where `flip` is set, with their [B, g*g, k] patch covers."""
    pixels = pixels.copy()
    pixels[flip] = pixels[flip][:, :, ::-1]
    out = []
    for c in covers:
        b, n, k = c.shape
        g = int(round(n ** 0.5))
        c = c.reshape(b, g, g, k).copy()
        c[flip] = c[flip][:, :, ::-1]
        out.append(c.reshape(b, n, k))
    return pixels, out


class Encoder:
    """Turns (image, [(question, answer)]) into input ids and labels with the chat template's tokens."""

    def __init__(self, processor, n_image_tokens: int):
        tok = processor.tokenizer
        self.tok = tok
        self.user = tok.convert_tokens_to_ids("<|user|>")
        self.assistant = tok.convert_tokens_to_ids("<|assistant|>")
        self.end = tok.convert_tokens_to_ids("<|end|>")
        self.image = tok.image_token_id
        self.pad = tok.pad_token_id
        self.n_image_tokens = n_image_tokens
        ip = processor.image_processor
        self.mean = torch.tensor(ip.image_mean).view(1, 3, 1, 1)
        self.std = torch.tensor(ip.image_std).view(1, 3, 1, 1)
        self._cache: dict[str, list[int]] = {}

    def _ids(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.tok(text, add_special_tokens=False)["input_ids"]
        return self._cache[text]

    def sequence(self, qas: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
        """Token ids of `<|user|><image>q1<|end|><|assistant|>a1<|end|><|user|>q2...` and labels.

        This is exactly what the chat template renders for these turns (special tokens split the
        text, so tokenizing the pieces apart gives the same ids)."""
        ids: list[int] = []
        labels: list[int] = []
        for k, (q, a) in enumerate(qas):
            head = [self.user] + ([self.image] * self.n_image_tokens if k == 0 else []) + self._ids(q)
            head += [self.end, self.assistant]
            ans = self._ids(a) + [self.end]
            ids += head + ans
            labels += [IGNORE] * len(head) + ans
        return ids, labels

    def pixel_values(self, pixels_uint8: np.ndarray) -> torch.Tensor:
        """What the CLIP processor gives for images already at the model's size: rescale, normalise."""
        x = torch.from_numpy(np.array(pixels_uint8)).permute(0, 3, 1, 2).float() / 255.0  # a writable copy
        return (x - self.mean) / self.std

    def batch(self, seqs: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = max(len(s[0]) for s in seqs)
        ids = torch.full((len(seqs), n), self.pad, dtype=torch.long)
        lab = torch.full((len(seqs), n), IGNORE, dtype=torch.long)
        att = torch.zeros((len(seqs), n), dtype=torch.long)
        for i, (s, l) in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            lab[i, : len(l)] = torch.tensor(l)
            att[i, : len(s)] = 1
        return ids, lab, att


def draw_batch(bank: SceneBank, cfg: TrainConfig, step: int):
    """Scenes and questions of batch `step`: a pure function of (seed, step)."""
    rng = np.random.default_rng([cfg.seed, step])
    early = step < cfg.curriculum_steps
    pool = bank.single if early and len(bank.single) else np.arange(len(bank))
    scenes = pool[rng.integers(0, len(pool), cfg.batch_size)]
    qtypes = ("shape", "colour") if early else cfg.qtypes
    turns = []
    for i in scenes:
        qs = bank.questions[i]
        by_type: dict[str, list[tuple[str, str]]] = {}
        for q, a, t in qs:
            if not qtypes or t in qtypes:
                by_type.setdefault(t, []).append((q, a))
        types = sorted(by_type)
        picked = []
        for _ in range(cfg.turns):  # a question type uniformly, then a question of that type
            t = types[rng.integers(len(types))]
            picked.append(by_type[t][rng.integers(len(by_type[t]))])
        turns.append(picked)
    return scenes, turns


def draw_vision_batch(bank: SceneBank, cfg: TrainConfig, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Scene indices of stage-1 batch `step` and which of them to mirror (a pure function of (seed, step))."""
    rng = np.random.default_rng([cfg.seed, 1, step])
    return rng.integers(0, len(bank), cfg.vision_batch_size), rng.random(cfg.vision_batch_size) < 0.5


def cosine_lr(step: int, total: int, peak: float, warmup: int, min_frac: float) -> float:
    """Linear warm-up, then cosine decay to min_frac * peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Stage 2's learning rate at its step `step`."""
    return cosine_lr(step, cfg.steps, cfg.lr, cfg.warmup, cfg.min_lr_frac)


def _save_checkpoint(path: Path, model, opt, step: int, cfg: TrainConfig, log: list[dict]) -> None:
    """model weights (stage-1 heads included) + Adam state (safetensors) + step and log (JSON),
    committed by a final rename. `model` is a Module holding the organism (and, in stage 1, heads)."""
    from sightline.report.files import save_safetensors as save_file  # mode like every other file

    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    names = {id(p): n for n, p in model.named_parameters()}
    state = {}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if st:
                for k, v in st.items():
                    state[f"{names[id(p)]}::{k}"] = torch.as_tensor(v).clone()
    save_file(state, str(tmp / "optimizer.safetensors"))
    write_json(tmp / "state.json", {"step": step, "config": cfg.to_dict(), "log": log}, indent=None)
    if path.exists():
        import shutil

        shutil.rmtree(path)
    tmp.rename(path)


def _load_checkpoint(path: Path, model, opt) -> tuple[int, list[dict]]:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path / "model.safetensors")))
    state = load_file(str(path / "optimizer.safetensors"))
    params = dict(model.named_parameters())
    for key, v in state.items():
        name, k = key.split("::")
        opt.state[params[name]][k] = v
    meta = json.loads((path / "state.json").read_text())
    return int(meta["step"]), list(meta["log"])


class _Stage1(torch.nn.Module):
    """The organism and stage 1's heads under one module, so that one checkpoint holds both."""

    def __init__(self, model, heads: VisionHeads):
        super().__init__()
        self.model = model
        self.heads = heads


def stage2_params(both: _Stage1, cfg: TrainConfig) -> list:
    """What stage 2 trains: the whole organism, and stage 1's heads while the patch loss is kept."""
    named = list(both.model.named_parameters(prefix="model"))
    return named + (list(both.heads.named_parameters(prefix="heads")) if cfg.vision_aux_weight else [])


def _adamw(params_named, cfg: TrainConfig, lr: float):
    decay = [p for n, p in params_named if p.ndim >= 2]
    no_decay = [p for n, p in params_named if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))


def save_vision_tower(model, processor, out: str | Path) -> Path:
    """Save the organism's vision tower alone as an ordinary CLIPVisionModel folder, with the organism's
    image processor config: a stand-alone vision encoder (`sightline perceive --encoder`)."""
    from sightline.report.files import set_file_modes

    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    model.model.vision_tower.save_pretrained(tmp, safe_serialization=True)
    processor.image_processor.save_pretrained(tmp)
    set_file_modes(tmp)  # save_pretrained writes the weights 0600
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out


@torch.no_grad()
def vision_heldout(model, heads: VisionHeads, enc, cfg: TrainConfig, n: int = 256) -> dict:
    """Stage 1's held-out figures on fresh single-object scenes: patch accuracy on the patches an
    object covers by majority, and the image's shape read from the heads (the shape with the most
    probability summed over all patches)."""
    from sightline.data.synthetic import SHAPES, WorldConfig, derive_seed, render_scene

    world = WorldConfig(image_size=cfg.arch.image_size, n_objects=1)
    scenes = [render_scene(derive_seed(cfg.seed, "stage1-heldout", i), world) for i in range(n)]
    labels = np.stack([patch_labels(sc, cfg.arch.patch_size)[0] for sc in scenes])
    f = vision_features(model, enc.pixel_values(np.stack([np.asarray(sc.to_pil()) for sc in scenes])))
    prob = torch.softmax(heads.shape(f), -1)
    pred = prob.argmax(-1).numpy()
    obj = labels > 0
    votes = prob[..., 1:].sum(1).argmax(-1).numpy() + 1
    truth = [1 + SHAPES.index(sc.objects[0].shape) for sc in scenes]
    return {"patch_shape_acc": round(float((pred[obj] == labels[obj]).mean()), 4),
            "image_shape_vote_acc": round(float(np.mean(np.asarray(votes) == np.asarray(truth))), 4)}


def train(cfg: TrainConfig, resume: bool = True, progress: bool = True, stop_after: int | None = None) -> Path:
    """Train (or resume) and save the final checkpoint to `cfg.out/model`; returns that folder.

    Steps count both stages: 0 .. vision_steps-1 are stage 1, then stage 2's `steps`. `stop_after`
    ends the session after that many steps in total (as an interruption would), leaving the run to
    be resumed from its last checkpoint. `cfg.threads` holds for the training only: torch's thread
    count is put back afterwards."""
    threads = torch.get_num_threads()
    try:
        return _train(cfg, resume, progress, stop_after)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: TrainConfig, resume: bool, progress: bool, stop_after: int | None) -> Path:
    from tqdm.auto import tqdm

    out = Path(cfg.out)
    ckpt = out / "checkpoint"
    if (out / "config.json").exists():
        saved = TrainConfig.from_dict(json.loads((out / "config.json").read_text()))
        if replace(saved, threads=cfg.threads) != cfg:  # threads change speed, not results
            raise UserError(f"{out} holds a run with another config; choose another --out or delete it")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", cfg.to_dict())
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model, processor = build_organism(cfg.arch, seed=cfg.seed)
    heads = VisionHeads(cfg.arch.vision_hidden)
    both = _Stage1(model, heads)
    model.train()
    total = cfg.vision_steps + cfg.steps
    start, log = 0, []
    if resume and ckpt.exists():
        start = int(json.loads((ckpt / "state.json").read_text())["step"])
    stage1 = start < cfg.vision_steps
    features: list[torch.Tensor] = []  # stage 2: the vision features the model's forward computed, for the patch loss
    layer = model.config.vision_feature_layer

    def keep_features(_module, _args, output):
        features.append(output.hidden_states[layer][:, 1:])

    hook = model.model.vision_tower.register_forward_hook(keep_features)
    opt = (_adamw(list(both.model.model.vision_tower.named_parameters(prefix="model.model.vision_tower"))
                  + list(both.heads.named_parameters(prefix="heads")), cfg, cfg.vision_lr)
           if stage1 else _adamw(stage2_params(both, cfg), cfg, cfg.lr))
    if resume and ckpt.exists():
        start, log = _load_checkpoint(ckpt, both, opt)
    bank = SceneBank(cfg, progress=progress)
    g = cfg.arch.image_size // cfg.arch.patch_size
    enc = Encoder(processor, g * g)
    t0 = time.perf_counter()
    bar = tqdm(range(start, total), initial=start, total=total, desc="train", disable=not progress,
               dynamic_ncols=True)
    ema = None
    for step in bar:
        if step == cfg.vision_steps and stage1:  # stage 1 done: record it, then the whole model trains
            log.append({"step": step, "stage1_heldout": vision_heldout(model, heads, enc, cfg),
                        "seconds": round(time.perf_counter() - t0, 1)})
            bar.write(f"stage 1 held-out: {log[-1]['stage1_heldout']}")
            save_vision_tower(model, processor, out / "vision_stage1")  # before stage 2 changes it
            stage1, ema = False, None
            opt = _adamw(stage2_params(both, cfg), cfg, cfg.lr)
        features.clear()
        if stage1:
            scenes, flip = draw_vision_batch(bank, cfg, step)
            lr = cosine_lr(step, cfg.vision_steps, cfg.vision_lr, cfg.warmup, cfg.min_lr_frac)
            pix, (sc, cc) = mirror(bank.pixels[scenes], [bank.shape_cover[scenes], bank.colour_cover[scenes]], flip)
            loss = vision_loss(heads, vision_features(model, enc.pixel_values(pix)), torch.from_numpy(sc),
                               torch.from_numpy(cc))
        else:
            k = step - cfg.vision_steps
            scenes, turns = draw_batch(bank, cfg, k)
            ids, labels, att = enc.batch([enc.sequence(t) for t in turns])
            lr = lr_at(k, cfg)
            loss = model(input_ids=ids, attention_mask=att, pixel_values=enc.pixel_values(bank.pixels[scenes]),
                         labels=labels).loss
            if cfg.vision_aux_weight:
                loss = loss + cfg.vision_aux_weight * vision_loss(
                    heads, features.pop(), torch.from_numpy(bank.shape_cover[scenes]),
                    torch.from_numpy(bank.colour_cover[scenes]))
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for grp in opt.param_groups for p in grp["params"]], cfg.grad_clip)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        bar.set_postfix(stage=1 if stage1 else 2, loss=f"{ema:.4f}", lr=f"{lr:.2e}")
        if (step + 1) % 50 == 0:
            log.append({"step": step + 1, "stage": 1 if stage1 else 2, "loss_ema": round(ema, 5),
                        "seconds": round(time.perf_counter() - t0, 1)})
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < total:
            _save_checkpoint(ckpt, both, opt, step + 1, cfg, log)
        if stop_after is not None and step + 1 >= stop_after:
            bar.close()
            hook.remove()
            return ckpt
    bar.close()
    hook.remove()
    if cfg.vision_steps and not any("stage1_heldout" in e for e in log):  # stage 1 only (steps=0)
        log.append({"step": total, "stage1_heldout": vision_heldout(model, heads, enc, cfg)})
        save_vision_tower(model, processor, out / "vision_stage1")
    elif cfg.vision_aux_weight:  # the heads trained on through stage 2: how the vision tower ended
        log.append({"step": total, "final_vision_heldout": vision_heldout(model, heads, enc, cfg)})
    model.eval()
    final = save_organism(model, processor, out / "model")
    if (out / "vision_stage1" / "config.json").exists():  # the tower as stage 1 left it, beside the model
        import shutil

        shutil.copytree(out / "vision_stage1", final / "vision_stage1", dirs_exist_ok=True)
    write_json(out / "train_log.json", {"config": cfg.to_dict(), "log": log,
                                        "seconds_this_session": round(time.perf_counter() - t0, 1)})
    return final
