"""pytest plugin (``-p timm_contract_plugin``) that runs timm's own ``tests/test_models.py`` on the ELSA models.

timm's test module picks its models with ``list_models`` at import time, by timm's own module names
(``swin_transformer``, ``volo``) and name patterns (``volo_*`` marks VOLO as a "non-standard" model whose
features are tokens). This plugin, loaded before that module is collected:

- imports ``elsa`` so the ELSA models are registered with timm;
- treats each ELSA family as a member of the timm family it extends: ``elsa_swin`` wherever timm lists
  ``swin_transformer`` and ``elsa_volo`` wherever it lists ``volo`` (module filters and ``volo_*`` patterns), so the
  ELSA models get exactly the tests timm runs on Swin and VOLO;
- keeps only the models named in ``ELSA_TIMM_MODELS`` (comma-separated) in every listing, so collection stays small.
"""
from __future__ import annotations

import os
from typing import Iterable, List, Union

import timm
import timm.models

import elsa.models  # noqa: F401  (registers the ELSA models)

_FAMILY_MODULES = {"swin_transformer": "elsa_swin", "volo": "elsa_volo"}
_FAMILY_PATTERNS = {"volo_*": "elsa_volo_*"}
_list_models = timm.list_models


def _as_list(x: Union[str, Iterable[str]]) -> List[str]:
    return [x] if isinstance(x, str) else list(x)


def _with_family(items: Union[str, Iterable[str]], mapping: dict) -> Union[str, List[str]]:
    items = _as_list(items)
    return items + [mapping[i] for i in items if i in mapping]


def list_models(filter: Union[str, Iterable[str]] = "", module: Union[str, Iterable[str]] = "", *args, **kwargs):
    """timm's ``list_models`` with the ELSA families added to their timm families, restricted to ELSA_TIMM_MODELS."""
    if filter:
        filter = _with_family(filter, _FAMILY_PATTERNS)
    if module:
        module = _with_family(module, _FAMILY_MODULES)
    if "exclude_filters" in kwargs and kwargs["exclude_filters"]:
        kwargs["exclude_filters"] = _with_family(kwargs["exclude_filters"], _FAMILY_PATTERNS)
    names = _list_models(filter, module, *args, **kwargs)
    keep = {n for n in os.environ.get("ELSA_TIMM_MODELS", "").split(",") if n}
    if not keep:
        return names
    return [n for n in names if n.split(".")[0] in keep]


timm.list_models = list_models
timm.models.list_models = list_models
