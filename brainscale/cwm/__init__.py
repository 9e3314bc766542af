"""CWM: the Counterfactual World Model family (local patch tokenizer, pointer-token world model)."""
