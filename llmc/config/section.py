"""The base of every config section: unknown keys are errors."""
from typing import Literal

from pydantic import BaseModel, ConfigDict

Granularity = Literal["per_tensor", "per_channel", "per_group", "per_token", "per_head", "per_block"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
