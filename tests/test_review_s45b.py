"""Review s45b: the grader of issues 11 (Hugging Face, tokenizers, datasets, evaluation) and 15 (the
official TTT-E2E checkpoints), with tools, data and inputs the other tests do not use.

Kept here, each a finding (the commit that fixes it names it):

- A right-padded batch holding a row of padding alone (an empty text: ``DataCollatorForLanguageModeling``
  pads one so, as wikitext's blank lines give in transformers' ``Trainer``) was refused as "an empty
  row", saying the tokens after the zeros would read the pads, where there are none; GPT-2 scores it. It
  is scored as right padding now, and refused where right padding is (a cache, ``generate()``).
"""
