"""Using a trained model: jitted generation with a KV cache."""
