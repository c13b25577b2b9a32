"""Phase 1: run a teacher LLM over a dataset and cache its next-token targets (`build_cache`)."""

from teacher_cache.build import build_cache
from teacher_cache.config import BuildConfig

__all__ = ["BuildConfig", "build_cache"]
