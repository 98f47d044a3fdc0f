"""The reference MoE transformer and its configuration."""

from speq.models.config import MoEConfig
from speq.models.demo import demo_model
from speq.models.export import export_hf
from speq.models.kv_cache import KVCache
from speq.models.model import MoEForCausalLM

__all__ = ["KVCache", "MoEConfig", "MoEForCausalLM", "demo_model", "export_hf"]
