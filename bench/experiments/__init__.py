"""Paper experiments at quick scale: TinyMem runs, every method on them, and the sweeps that rank them."""
