"""What runs read and write, without the training framework: atomic file writes
(:mod:`~innerloop.data.atomic`), tokenizers (:mod:`~innerloop.data.tokenizer`), text corpora
(:mod:`~innerloop.data.text`), local Hugging Face datasets (:mod:`~innerloop.data.hf`) packed into
resumable windows (:mod:`~innerloop.data.packing`), and the synthetic recall task
(:mod:`~innerloop.data.recall`). The run config's checks use them before anything is built;
:mod:`innerloop.train` builds its DataModules and checkpoints on them.
"""
