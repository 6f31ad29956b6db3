"""Reading a manifest's shards with webdataset: decode, augment, tokenize, batch.

Order and splitting. Each epoch the shard list is shuffled with (seed, epoch) and dealt out to
the ``world_size * num_workers`` reader slots (rank-major), so every sample is read exactly once
per epoch across all ranks and workers. With fewer shards than slots, every slot reads all
shards and keeps every n-th sample instead. A slot's stream is endless (epoch after epoch), so
no rank runs dry before another; the trainer stops all ranks at the same step.

Determinism. The raw sample stream of a slot is a pure function of (seed, slot, shards): resuming
after ``skip_batches`` batches drops the right raw samples before any decoding. Per-sample
randomness (which caption, which crop) is seeded from (seed, epoch, index), so it does not depend
on worker count or on resuming.

Distinct images. The shuffle buffer is drained at each epoch's end, so it never mixes two
epochs, and a sample whose image is already in the batch being filled (possible only in the
batch that spans an epoch boundary) waits for the next batch: no training batch of a rank holds
an image twice, and every sample is still read once per epoch. A resumed reader keeps the
samples that were waiting at its checkpoint (``skip_pending``).

Corrupt samples (undecodable image, no caption) are skipped and counted; each batch reports how
many its reader skipped since its previous batch in ``batch["corrupt"]``.
"""
