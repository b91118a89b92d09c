"""Models larger than memory: a checkpoint's weights read piece by piece (embedding, each decoder layer,
head) from its memory-mapped safetensors shards under `model.memory_budget_gb`.

`open` decides and opens (`residency`, `open_streamed`); `residency` holds pieces while they run
(`hold`, `hold_layer`, `streamed`); `shards` reads tensors; `budget` weighs; `write` saves a streamed
model shard by shard.
"""
