"""World: one seed -> a reproducible, random-access stream of scenes, pairs and clips."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sightline.data.synthetic.language import Question, questions
from sightline.data.synthetic.layout import WorldConfig, check_seed, configure, derive_seed
from sightline.data.synthetic.motion import Clip, ScenePair, render_clip, render_pair
from sightline.data.synthetic.render import Scene, render_scene

__all__ = ["DAMAGE_QTYPES", "GENERATOR", "World", "WorldFacts", "world_facts"]

GENERATOR = "sightline.data.synthetic"  # the `generator` of every world.json this package writes
# Steering the folder attribute of a synthetic dataset: the other attributes whose questions measure damage
# (a shape edit must leave the colour answer alone, and so on).
DAMAGE_QTYPES: dict[str, tuple[str, ...]] = {"shape": ("colour",), "colour": ("shape",), "size": ("shape", "colour")}


class World:
    """Scene i, pair i and clip i of world `seed` depend only on (seed, i, config): any item can be
    drawn alone, in any order, in any process, and comes out identical."""

    def __init__(self, seed: int = 0, config: WorldConfig | None = None, **overrides: Any):
        self.config = configure(config, overrides)
        self.seed = check_seed(seed)

    def __repr__(self) -> str:
        return f"World(seed={self.seed}, config={self.config!r})"

    def seed_of(self, kind: str, i: int) -> int:
        """The seed of item `i` of stream `kind` ("scene", "pair", "clip")."""
        return derive_seed(self.seed, kind, int(i))

    def scene(self, i: int, **kwargs: Any) -> Scene:
        """Scene `i` (kwargs go to `render_scene`: objects=, style=, or config overrides)."""
        return render_scene(self.seed_of("scene", i), self.config, **kwargs)

    def scenes(self, n: int, start: int = 0) -> Iterator[Scene]:
        """Scenes start .. start + n - 1."""
        for i in range(start, start + n):
            yield self.scene(i)

    def questions(self, i: int, **kwargs: Any) -> tuple[Scene, list[Question]]:
        """Scene `i` and every question it settles (kwargs go to `questions`)."""
        scene = self.scene(i)
        return scene, questions(scene, **kwargs)

    def pair(self, i: int, **kwargs: Any) -> ScenePair:
        """Pair `i` (kwargs go to `render_pair`: mode=, affine=, flip_prob=, ...)."""
        return render_pair(self.seed_of("pair", i), self.config, **kwargs)

    def clip(self, i: int, **kwargs: Any) -> Clip:
        """Clip `i` (kwargs go to `render_clip`: n_frames=, max_speed=, ...)."""
        return render_clip(self.seed_of("clip", i), self.config, **kwargs)


@dataclass(frozen=True)
class WorldFacts:
    """What a dataset exported from the synthetic world says about itself (its world.json)."""

    world: World  # re-draws any scene of the dataset exactly
    info: dict[str, Any]  # world.json as written: generator, seed, config, layout, attribute, ...
    folder: Path  # the dataset folder holding world.json

    @property
    def attribute(self) -> str | None:
        """The attribute an image-folder export is foldered by (shape, colour, size), else None."""
        return self.info.get("attribute")

    @property
    def damage_rule(self) -> dict[str, tuple[str, ...]]:
        """Steering attribute -> the question types that measure damage (DAMAGE_QTYPES)."""
        return dict(DAMAGE_QTYPES)


def world_facts(path: str | os.PathLike) -> WorldFacts | None:
    """The synthetic world behind a dataset (its folder, a .jsonl manifest in it, or a file beside
    world.json), or None when it was not exported by sightline.data.synthetic."""
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    wj = folder / "world.json"
    if not wj.is_file():
        return None
    try:
        info = json.loads(wj.read_text(encoding="utf-8"))
    except ValueError:
        return None
    if not isinstance(info, dict) or info.get("generator") != GENERATOR:
        return None
    return WorldFacts(World(int(info["seed"]), WorldConfig.from_dict(info["config"])), info, folder)
