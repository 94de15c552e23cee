"""The continuous-batching generation engine.

config (EngineConfig) · sampling_params · outputs (TokenEvent) · sampler ·
detokenizer · layer_config (pinned layer -> module mapping) · cache_pool (one
byte pool for KV blocks and DSLA state pairs) · seq_cache · request · scheduler
· attention (paged attention) · runner (the decoder forward) · cuda_graphs ·
engine (synchronous core) · async_engine (background thread, asyncio streams).
"""
from dsla_model.engine.async_engine import AsyncEngine
from dsla_model.engine.config import EngineConfig
from dsla_model.engine.engine import Engine
from dsla_model.engine.outputs import TokenEvent
from dsla_model.engine.sampling_params import SamplingParams

__all__ = ["Engine", "AsyncEngine", "EngineConfig", "SamplingParams", "TokenEvent"]
