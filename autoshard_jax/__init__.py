"""autoshard-jax: a DLRM research core: data, model, sparse optimizers, sharding, training.

Shapes are written into tensor names (`ids_BxH`, `slab_RxW`) with these letters, one meaning each
across the package:

  B   batch (samples per step); b  one device's shard of it (B / D) inside shard_map
  D   devices of the mesh (only ever devices)
  T   tables (= categorical features)
  Q   dense (count) features
  E   a table's embedding width (its dim)
  H   a table's hotness: id slots per bag (-1 pads)
  R   rows: of a table [R, E], or physical rows of a device's packed slab [R, W]
  W   slab width (the widest table's dim); c  a width class's packed width (divides W)
  A   logical rows (dedup keys) of a device: the length of row-wise optimizer state
  L   id positions per sample of a lookup group on a device (L_c: those of width class c)
  S   pooled slots of a width class; O  output columns of a lookup group
  N   samples a device's lookup processes (B after the all_to_all, b for replicated tables)
  M   flattened ids of a class (N x L_c); U  unique keys among them
  K   a small inner width: rows per optimizer call; the synthetic teacher's hidden width
  F   a flattened array (slab_F); I  input width of an MLP or cross layer
  G   hashed Gaussian components (synthetic teacher)

Layout (imports flow downward only):
  tables/, data/   table specs; the batch contract, synthetic stream, Criteo TSV, DataSource
  models/, optim/  embedding bags and DLRM; sparse row optimizers, state kinds, BYTES_PER_VALUE
  embedding/       the EmbeddingStage protocol, LocalEmbeddingStage, TrainState and its init
  sharding/        plans, layouts, typed lookup metadata, the per-device step, the sharded stage
  cost/, train/    cost oracle; the train step + setup, loop, metrics, checkpoints, run identity
  placement/       plan search
"""
