"""Reading one recipe file: UTF-8 YAML whose top level is a mapping, no key given twice (PyYAML would keep the last
one silently). `posttrain.recipe` follows `extends:` and applies `--set` on top."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from posttrain.errors import RecipeError


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' on line {line} repeats the one on line {seen[key]}", key_node.start_mark
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_recipe_yaml(path: Path) -> dict[str, Any]:
    """The mapping a recipe file holds; every way it can fail to be one is a RecipeError naming the file."""
    if path.is_dir():
        raise RecipeError(f"{path}: is a directory, not a recipe file (give a .yaml file, e.g. {path}/<name>.yaml)")
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise RecipeError(
            f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} on line {line}); save the recipe as UTF-8"
        ) from None
    except OSError as err:
        raise RecipeError(f"{path}: cannot read the recipe file ({err.strerror or err})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    return data


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge `update` into a copy of `base`; mappings merge, everything else is replaced."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged
