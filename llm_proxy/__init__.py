"""llm_proxy."""
