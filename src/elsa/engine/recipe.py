"""The one recipe type of the tasks (detection, segmentation): a frozen dataclass of plain values, stored in
checkpoints, changed only through a strict ``replace``.

Why frozen and strict: a recipe is what a run was trained with and what test/predict rebuild the model from, so a
typo in an override (``--lr`` mapped to ``lrr``) or a field of a newer version must fail loudly with the key's name,
never pass silently.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Type, TypeVar

R = TypeVar("R", bound="Recipe")


def _tuples(value: Any) -> Any:
    """JSON/YAML lists back to the tuples the fields are declared with (nested too)."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Base of the task recipes: ``name`` plus the subclass's typed fields with their official defaults."""
    name: str

    @classmethod
    def _check(cls, keys) -> None:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(keys) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; expected some of {sorted(names)}")

    def replace(self: R, **changes: Any) -> R:
        """A copy with some fields changed; unknown names raise a ValueError naming them."""
        self._check(changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        """Plain values (what checkpoints store)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: Type[R], d: Dict[str, Any]) -> R:
        """Inverse of ``to_dict`` (lists become tuples again); unknown keys raise a ValueError naming them."""
        cls._check(d)
        return cls(**{k: v if isinstance(v, dict) else _tuples(v) for k, v in d.items()})
