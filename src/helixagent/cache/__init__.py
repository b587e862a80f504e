"""Response cache and in-flight request de-duplication (memory LRU or Redis), streaming included.

See docs/cache.md.  ``install(gw)`` adds the :class:`CacheStage` (when ``cache.enabled``), wraps the
router's chat handler for de-duplication and registers ``gw.services["cache"]``."""
from .backends import BackendUnavailable, CacheStats, MemoryBackend, RedisBackend
from .key import IGNORED_PARAMS, cache_key, canonical_form, scope_of
from .service import BYPASS, HEADER, HIT, MISS, CacheService, CacheStage, install

__all__ = ["BYPASS", "HEADER", "HIT", "MISS", "IGNORED_PARAMS", "BackendUnavailable", "CacheService",
           "CacheStage", "CacheStats", "MemoryBackend", "RedisBackend", "cache_key", "canonical_form",
           "install", "scope_of"]
