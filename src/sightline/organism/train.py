"""Train the model organism from scratch on question-answer pairs about the synthetic world.

Reproducible from its seed: scene i of the training set is `render_scene(derive_seed(seed, "train", i))`
and batch k draws its scenes and questions from a generator seeded by (seed, k), so a resumed run
sees exactly the batches an uninterrupted one would. Each training sequence is one image followed
by several question/answer turns of the chat template; the loss is on the answer tokens (and the
turn's end marker) only.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch

from sightline.errors import UserError
from sightline.organism.model import OrganismArch, build_organism, save_organism

IGNORE = -100


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on (saved with its checkpoints)."""

    out: str = "organism-train"
    seed: int = 0
    n_scenes: int = 8000  # distinct training scenes, rendered once
    steps: int = 4000
    batch_size: int = 32
    turns: int = 4  # question/answer turns per sequence
    lr: float = 6e-4  # 2e-3 blew up the from-scratch vision tower (its residual grew 20x, answers stayed at chance)
    min_lr_frac: float = 0.05
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    count_probs: tuple[float, ...] = (0.4, 0.2, 0.2, 0.2)  # P(1 object), P(2), ...
    qtypes: tuple[str, ...] = ()  # question types to train on; () = all
    # first steps: single-object scenes asked shape and colour only, so the vision path is learnt
    # before the language model settles on answering from priors
    curriculum_steps: int = 400
    checkpoint_every: int = 250
    threads: int = 0  # torch threads; 0 = torch's default
    arch: OrganismArch = field(default_factory=OrganismArch)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["count_probs"] = list(self.count_probs)
        d["qtypes"] = list(self.qtypes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = dict(d)
        d["arch"] = OrganismArch(**d.get("arch", {}))
        d["count_probs"] = tuple(d.get("count_probs", cls.count_probs))
        d["qtypes"] = tuple(d.get("qtypes", ()))
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class SceneBank:
    """The training scenes' pixels (uint8) and their questions, rendered once up front."""

    def __init__(self, cfg: TrainConfig, progress: bool = True):
        from tqdm.auto import tqdm

        from sightline.data.synthetic import WorldConfig, derive_seed, questions, render_scene

        world = WorldConfig(image_size=cfg.arch.image_size, count_probs=cfg.count_probs)
        n = cfg.n_scenes
        s = cfg.arch.image_size
        self.pixels = np.empty((n, s, s, 3), np.uint8)
        self.questions: list[list[tuple[str, str, str]]] = []
        single = []
        for i in tqdm(range(n), desc="render scenes", disable=not progress, dynamic_ncols=True):
            scene = render_scene(derive_seed(cfg.seed, "train", i), world)
            self.pixels[i] = np.asarray(scene.to_pil())
            self.questions.append([(q.question, q.answer, q.qtype) for q in questions(scene)])
            if len(scene.objects) == 1:
                single.append(i)
        self.single = np.asarray(single, dtype=np.int64)  # single-object scenes, for the curriculum

    def __len__(self) -> int:
        return len(self.pixels)


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


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_frac * lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def _save_checkpoint(path: Path, model, opt, step: int, cfg: TrainConfig, log: list[dict]) -> None:
    """model weights + Adam state (safetensors) + step and log (JSON), committed by a final rename."""
    from safetensors.torch import save_file

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
    (tmp / "state.json").write_text(json.dumps({"step": step, "config": cfg.to_dict(), "log": log}))
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


def train(cfg: TrainConfig, resume: bool = True, progress: bool = True, stop_after: int | None = None) -> Path:
    """Train (or resume) and save the final checkpoint to `cfg.out/model`; returns that folder.

    `stop_after` ends the session after that many steps in total (as an interruption would), leaving
    the run to be resumed from its last checkpoint."""
    from tqdm.auto import tqdm

    out = Path(cfg.out)
    ckpt = out / "checkpoint"
    if (out / "config.json").exists():
        saved = TrainConfig.from_dict(json.loads((out / "config.json").read_text()))
        if replace(saved, threads=cfg.threads) != cfg:  # threads change speed, not results
            raise UserError(f"{out} holds a run with another config; choose another --out or delete it")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model, processor = build_organism(cfg.arch, seed=cfg.seed)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    start, log = 0, []
    if resume and ckpt.exists():
        start, log = _load_checkpoint(ckpt, model, opt)
    bank = SceneBank(cfg, progress=progress)
    g = cfg.arch.image_size // cfg.arch.patch_size
    enc = Encoder(processor, g * g)
    t0 = time.perf_counter()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train", disable=not progress,
               dynamic_ncols=True)
    ema = None
    for step in bar:
        scenes, turns = draw_batch(bank, cfg, step)
        ids, labels, att = enc.batch([enc.sequence(t) for t in turns])
        pix = enc.pixel_values(bank.pixels[scenes])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        out_ = model(input_ids=ids, attention_mask=att, pixel_values=pix, labels=labels)
        loss = out_.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        bar.set_postfix(loss=f"{ema:.4f}", lr=f"{lr_at(step, cfg):.2e}")
        if (step + 1) % 50 == 0:
            log.append({"step": step + 1, "loss_ema": round(ema, 5), "seconds": round(time.perf_counter() - t0, 1)})
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            _save_checkpoint(ckpt, model, opt, step + 1, cfg, log)
        if stop_after is not None and step + 1 >= stop_after:
            bar.close()
            return ckpt
    bar.close()
    model.eval()
    final = save_organism(model, processor, out / "model")
    (out / "train_log.json").write_text(json.dumps({"config": cfg.to_dict(), "log": log,
                                                    "seconds_this_session": round(time.perf_counter() - t0, 1)},
                                                   indent=2))
    return final
