"""Phase 2: train a student from a teacher-cache store, with the teacher out of memory."""
