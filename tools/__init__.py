"""Developer tools that support the distillation pipeline (demo teachers, fixtures)."""
