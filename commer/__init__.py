"""ComMer: personalize a frozen LLM by compressing each user's documents into soft prompts and merging them."""

__version__ = "0.1.0"

from commer.backbone import Backbone, load_backbone  # noqa: E402
from commer.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from commer.config import ComMerConfig  # noqa: E402
from commer.merge import ProfileState  # noqa: E402
from commer.model import ComMer, PromptTuning, build_model  # noqa: E402
from commer.serving import Personalizer  # noqa: E402

__all__ = [
    "Backbone",
    "ComMer",
    "ComMerConfig",
    "Personalizer",
    "ProfileState",
    "PromptTuning",
    "build_model",
    "load_backbone",
    "load_checkpoint",
    "save_checkpoint",
]
