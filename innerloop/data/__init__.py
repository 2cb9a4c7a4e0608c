"""What runs read and write, without the training framework: atomic file writes
(:mod:`~innerloop.data.atomic`), byte-level text corpora (:mod:`~innerloop.data.text`) and the
synthetic recall task (:mod:`~innerloop.data.recall`). The run config's checks use them before
anything is built; :mod:`innerloop.train` builds its DataModules and checkpoints on them.
"""
