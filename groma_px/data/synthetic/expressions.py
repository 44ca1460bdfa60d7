"""Referring expressions over synthetic scenes: one semantics (``matches``), one rendering, and
the checker that proves an expression names exactly one object.

An expression is a :class:`Description` (optional size, optional colour, shape or "object"),
optionally followed by a spatial relation to an anchor description: "the small red circle",
"the square to the left of the green star". Relations compare visible boxes (absolute xyxy, pixel
edges) of two *different* objects A and B:

- A ``left`` of B  ⇔ centre_x(A) < x0(B)
- A ``right`` of B ⇔ centre_x(A) > x1(B)
- A ``above`` B    ⇔ centre_y(A) < y0(B)
- A ``below`` B    ⇔ centre_y(A) > y1(B)

with centre_x = (x0 + x1) / 2 and centre_y = (y0 + y1) / 2 (compared in doubled integer units,
so there is no rounding).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from .scene import Scene, SceneObject

RELATIONS = ("left", "right", "above", "below")
RELATION_PHRASES = {
    "left": "to the left of",
    "right": "to the right of",
    "above": "above",
    "below": "below",
}


def relation_holds(relation: str, box_a: tuple[int, ...], box_b: tuple[int, ...]) -> bool:
    """Whether a box with ``box_a`` stands in ``relation`` to one with ``box_b`` (module rules).

    Args:
        relation: One of ``RELATIONS``.
        box_a: Box of A, absolute xyxy pixel edges.
        box_b: Box of B, absolute xyxy pixel edges.

    Returns:
        True when "A <relation> B" holds.
    """
    ax0, ay0, ax1, ay1 = box_a
    bx0, by0, bx1, by1 = box_b
    if relation == "left":
        return ax0 + ax1 < 2 * bx0
    if relation == "right":
        return ax0 + ax1 > 2 * bx1
    if relation == "above":
        return ay0 + ay1 < 2 * by0
    if relation == "below":
        return ay0 + ay1 > 2 * by1
    raise ValueError(f"unknown relation {relation!r}; known: {RELATIONS}")


def _plural(noun: str) -> str:
    return noun + "es" if noun.endswith(("s", "x", "ch", "sh")) else noun + "s"


def with_article(phrase: str) -> str:
    """Prefixes "a" or "an" to a singular noun phrase."""
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


@dataclass(frozen=True)
class Description:
    """Attribute description of one kind of object; ``None`` fields match anything."""

    shape: str | None = None
    color: str | None = None
    size: str | None = None

    def accepts(self, obj: SceneObject) -> bool:
        """Whether ``obj`` has every attribute this description names."""
        return (
            (self.shape is None or obj.shape == self.shape)
            and (self.color is None or obj.color == self.color)
            and (self.size is None or obj.size == self.size)
        )

    def matches(self, scene: Scene) -> list[int]:
        """Indices (ascending) of the scene objects this description accepts."""
        return [i for i, obj in enumerate(scene.objects) if self.accepts(obj)]

    def render(self, *, plural: bool = False) -> str:
        """Noun phrase without article: "small red circle", "red objects", "object"."""
        noun = self.shape or "object"
        words = [w for w in (self.size, self.color) if w is not None]
        return " ".join([*words, _plural(noun) if plural else noun])

    @property
    def num_words(self) -> int:
        """Words of the singular rendering."""
        return 1 + (self.size is not None) + (self.color is not None)


@dataclass(frozen=True)
class ReferringExpression:
    """ "the <target>" or "the <target> <relation> the <anchor>"."""

    target: Description
    relation: str | None = None
    anchor: Description | None = None

    def __post_init__(self) -> None:
        if (self.relation is None) != (self.anchor is None):
            raise ValueError("relation and anchor must be given together")
        if self.relation is not None and self.relation not in RELATIONS:
            raise ValueError(f"unknown relation {self.relation!r}; known: {RELATIONS}")

    def matches(self, scene: Scene) -> list[int]:
        """Indices (ascending) of objects the expression can denote.

        Without a relation: the objects the target description accepts. With one: those
        accepted objects A for which some *other* object B accepted by the anchor description
        satisfies "A <relation> B".
        """
        candidates = self.target.matches(scene)
        if self.relation is None or self.anchor is None:
            return candidates
        anchors = self.anchor.matches(scene)
        objs = scene.objects
        return [
            i
            for i in candidates
            if any(
                j != i and relation_holds(self.relation, objs[i].box, objs[j].box) for j in anchors
            )
        ]

    def render(self) -> str:
        """The expression as text: "the small red circle", "the square above the green star"."""
        text = "the " + self.target.render()
        if self.relation is not None and self.anchor is not None:
            text += f" {RELATION_PHRASES[self.relation]} the {self.anchor.render()}"
        return text

    @property
    def num_words(self) -> int:
        """Words of :meth:`render`."""
        return len(self.render().split())


def is_unambiguous(expression: ReferringExpression, scene: Scene) -> bool:
    """Whether the expression provably names exactly one object of ``scene``.

    Requires exactly one match and, for a relational expression, an anchor description that
    itself matches exactly one object, so that neither part leaves a reader guessing.
    """
    if len(expression.matches(scene)) != 1:
        return False
    return expression.anchor is None or len(expression.anchor.matches(scene)) == 1


def descriptions_of(obj: SceneObject) -> list[Description]:
    """All 8 descriptions that accept ``obj`` (each of shape, colour, size named or not)."""
    return [
        Description(
            obj.shape if shape else None, obj.color if color else None, obj.size if size else None
        )
        for shape, color, size in itertools.product((False, True), repeat=3)
    ]


def _relational_candidates(scene: Scene, target: int) -> list[ReferringExpression]:
    """Relational expressions for ``target`` whose anchor is unique and not the target."""
    unique_anchors = [
        (j, d)
        for j, obj in enumerate(scene.objects)
        if j != target
        for d in descriptions_of(obj)
        if d.matches(scene) == [j]
    ]
    target_obj = scene.objects[target]
    return [
        ReferringExpression(d, relation, anchor)
        for j, anchor in unique_anchors
        for relation in RELATIONS
        if relation_holds(relation, target_obj.box, scene.objects[j].box)
        for d in descriptions_of(target_obj)
    ]


def _shortest(candidates: list[ReferringExpression], scene: Scene) -> list[ReferringExpression]:
    """Unambiguous candidates of the fewest words (all of them, in input order)."""
    for num_words in sorted({c.num_words for c in candidates}):
        found = [c for c in candidates if c.num_words == num_words and is_unambiguous(c, scene)]
        if found:
            return found
    return []


def find_unique_expression(
    scene: Scene, target: int, rng: np.random.Generator
) -> ReferringExpression | None:
    """Shortest unambiguous expression for one object, ties broken with ``rng``.

    Attribute-only expressions (at most 4 words) are always shorter than relational ones (at
    least 6), so a relation is used only when attributes cannot single the object out.

    Args:
        scene: The scene.
        target: Index of the object to refer to.
        rng: Random stream used to pick among equally short expressions.

    Returns:
        An expression whose :meth:`ReferringExpression.matches` is exactly ``[target]``, or
        ``None`` when no expression of this grammar is unambiguous.
    """
    plain = [ReferringExpression(d) for d in descriptions_of(scene.objects[target])]
    found = _shortest(plain, scene) or _shortest(_relational_candidates(scene, target), scene)
    if not found:
        return None
    chosen = found[int(rng.integers(len(found)))]
    if chosen.matches(scene) != [target]:
        raise AssertionError(f"{chosen.render()!r} does not denote object {target}")
    return chosen
