"""Where Hugging Face internals are touched: MLP adapters per architecture, the attention
swap of mixed-precision training."""
