"""Integrations: transformers models (hf), torch.distributed (distributed); imported lazily."""
