"""EI: Early Intervention for multimodal imaging based disease recognition."""
