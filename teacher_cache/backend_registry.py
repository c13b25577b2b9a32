"""The teacher backends by name: `load_teacher` loads the one a build's `--backend` names.

Sits above both backends (`teacher_cache.teacher`: transformers, `teacher_cache.vllm_backend`: vLLM), which share
`teacher_cache.backend` and never import each other. vLLM is imported only when its backend is asked for: it is heavy
and optional.
"""

from __future__ import annotations

from teacher_cache.backend import TeacherBackend
from teacher_cache.teacher import TransformersTeacher


def load_teacher(config) -> TeacherBackend:
    """The backend `config.backend` names, loaded from `config.model` (a BuildConfig)."""
    if config.backend == "vllm":
        from teacher_cache.vllm_backend import VLLMTeacher

        return VLLMTeacher(
            config.model, top_k=config.top_k, seq_len=config.seq_len, dtype=config.dtype,
            tensor_parallel_size=config.tensor_parallel_size, gpu_memory_utilization=config.gpu_memory_utilization,
            max_num_batched_tokens=config.max_num_batched_tokens, seed=config.seed,
        )
    return TransformersTeacher(config.model, device=config.device, dtype=config.dtype)
