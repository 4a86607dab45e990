"""Shared data layer: sources, schemas, prompt templates and synthetic tasks."""

from posttrain.data.arithmetic import arithmetic_split
from posttrain.data.schemas import SCHEMAS, ImageRow, validate
from posttrain.data.sources import load_source
from posttrain.data.templates import format_prompts, render_prompt

__all__ = ["SCHEMAS", "ImageRow", "arithmetic_split", "format_prompts", "load_source", "render_prompt", "validate"]
