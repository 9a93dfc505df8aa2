"""fedllm: privacy-preserving federated fine-tuning of LLM adapters."""

__version__ = "0.1.0"
