"""The closed vocabulary of the synthetic world: shapes, colours, sizes, styles, background colours, answers."""

from __future__ import annotations

__all__ = [
    "ANSWERS",
    "BACKGROUND_RGB",
    "BACKGROUNDS",
    "COLOUR_RGB",
    "COLOURS",
    "NUMBERS",
    "POSITIONS",
    "QTYPES",
    "SHAPES",
    "SIZE_FRACTIONS",
    "SIZES",
    "STYLES",
    "answer_family",
    "plural",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "diamond", "cross", "heart")

# Object colours. Every pair is at least 90 apart in RGB (yellow/orange are the closest, 92) and
# every background colour is at least 90 away from each of them, so the nearest palette colour of
# any pixel names its object's colour even under the "noisy" style (noise is at most 12 per channel).
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 60, 190),
    "orange": (240, 130, 20),
    "cyan": (40, 200, 210),
    "white": (245, 245, 245),
}
COLOURS: tuple[str, ...] = tuple(COLOUR_RGB)

# Diameter of the shape's circumscribed circle as a fraction of the image's shorter side.
SIZE_FRACTIONS: dict[str, float] = {"small": 0.18, "medium": 0.27, "large": 0.38}
SIZES: tuple[str, ...] = tuple(SIZE_FRACTIONS)

# Image-wide style families (background texture and sensor noise): the BLINK "art style" analogue.
STYLES: tuple[str, ...] = ("flat", "noisy", "striped", "checkered", "gradient")

# Background colours: dull greys and earth tones, far from every object colour (see above).
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "black": (25, 25, 25),
    "darkgrey": (70, 70, 70),
    "grey": (128, 128, 128),
    "lightgrey": (185, 185, 185),
    "brown": (110, 80, 60),
    "navy": (30, 40, 80),
    "olive": (95, 100, 50),
    "slate": (70, 100, 110),
}
BACKGROUNDS: tuple[str, ...] = tuple(BACKGROUND_RGB)

NUMBERS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom")
QTYPES: tuple[str, ...] = ("shape", "colour", "size", "position", "count", "presence", "caption", "refexp")

# Every short answer a question can have (captions excepted: they are phrases).
ANSWERS: tuple[str, ...] = SHAPES + COLOURS + SIZES + POSITIONS + NUMBERS + ("yes", "no")


def plural(shape: str) -> str:
    """'crosses', 'circles', ...: the plural of a shape name."""
    return shape + ("es" if shape.endswith(("s", "x", "sh", "ch")) else "s")


def answer_family(answer: str, max_count: int = 4) -> tuple[str, ...] | None:
    """Every answer the world allows to a question with this short answer: its shapes, colours, sizes,
    left/right, top/bottom, yes/no, or the counts zero..max_count (a scene holds at most max_count
    objects; 4 by default, as WorldConfig's count_probs); None for a phrase (a caption) or a word outside
    the world. Chance on a question is 1 / len(answer_family(answer))."""
    families = (SHAPES, COLOURS, SIZES, ("left", "right"), ("top", "bottom"), ("yes", "no"),
                NUMBERS[: max_count + 1])
    return next((f for f in families if answer in f), None)
