"""Integrations with other libraries; each module imports its library on first use of that module
(`sparsegraph.integrations.hf`: Hugging Face transformers)."""
