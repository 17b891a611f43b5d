"""moetune: fine-tune Hugging Face language models with a mixture of LoRA experts."""

from moetune.config import MoEConfig
from moetune.model import MoEModel, get_moe_model
from moetune.routing import Routing
from moetune.upcycle import upcycle_lora

__all__ = ["MoEConfig", "MoEModel", "Routing", "get_moe_model", "upcycle_lora"]
__version__ = "0.1.0"
