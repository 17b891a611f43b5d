"""moetune: fine-tune Hugging Face language models with a mixture of LoRA experts."""

from moetune.config import MoEConfig
from moetune.core.routing import Routing
from moetune.interop.upcycle import upcycle_lora
from moetune.model import MoEModel, get_moe_model

__all__ = ["MoEConfig", "MoEModel", "Routing", "get_moe_model", "upcycle_lora"]
__version__ = "0.1.0"
